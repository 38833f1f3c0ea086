"""The device resource: registered devices, their desired documents and what they report.

Modules, each importing only those above it:

- ``errors``: the resource's domain errors (turned into HTTP statuses only in ``routes``).
- ``models``: the ``device`` and ``device_deletion`` tables and the API's model family.
- ``rules``: pure; what one message from a device (birth, status, report) changes.
- ``store``: data access; the only code that writes a device row.
- ``views``: JSON answers built straight from rows (the API's hot reads).
- ``routes``: ``/devices`` and ``/fleet``.

Rules:
- The database is the only source of truth for desired state (docs/architecture.md,
  rule 1): every change bumps the device's ``desired_generation`` in the
  transaction that makes it.
"""
