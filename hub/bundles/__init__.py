"""The hub's bundle store: signed bundles uploaded by operators, kept for devices to fetch.

Layers, each importing only those above it:

- ``errors``: the store's domain errors (turned into HTTP statuses only in the routes).
- ``refs``: pure; how a desired config references a bundle (``workloads[i].bundle``).
- ``models``: the ``Bundle`` table and its API views.
- ``root``: the fleet's root metadata, read from the file the operator configured.
- ``files``: content-addressed files on disk and uploads in progress.
- ``intake``: verification of an uploaded file against the fleet root.
- ``store``: data access; the only code that changes a row or a stored file.
- ``chunks``: the chunk server that answers devices' MQTT requests from the
  stored files (read only; its own broker connection, no database).
- ``routes``: ``/bundles``: upload, list, read, delete, and the open file download.

Rules:
- A bundle is identified by the SHA-256 of the whole bundle file (header,
  signed manifest with its signatures, payload), not of the payload: the hash
  pins the exact bytes a device downloads and verifies. See ``docs/bundles.md``.
- Nothing reaches ``<bundles_dir>/<sha256>.bundle`` or the table before
  :func:`firmware_bundles.archive.verify` has accepted it against the fleet root.
- Row and file change together under the database's write lock: a file is
  moved into place before its row commits and moved away before its row's
  deletion commits, so a crash can leave an orphan file (harmless, adopted by
  the next upload of the same bytes) but never a row without its file.
"""
