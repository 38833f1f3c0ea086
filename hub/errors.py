"""The root of the hub's domain errors.

Rules:
- Each feature package has its own errors under :class:`HubError`
  (``hub.devices.errors``, ``hub.bundles.errors``); its store raises them and
  only its routes turn them into HTTP status codes.
- A domain error is the caller's fault (a bad request, a conflict with the current
  state); local bugs and database outages propagate as they are.
"""

from __future__ import annotations


class HubError(Exception):
    """Root of the hub's domain errors."""
