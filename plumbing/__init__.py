"""The bottom of the package stack: what every other package may use, and nothing more.

Rule: it imports none of Driftless's packages (a test holds the directions,
``docs/architecture.md``), and only the standard library, since the edge agent
imports it on every device: broker URLs and reconnect backoff (``net``),
structured logging (``logs``), and the version every component reports.
"""

__version__ = "0.1.0"
