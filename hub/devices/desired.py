"""Desired-state changes and the signal that tells delivery about them.

Rules:
- The database is the truth (ARCHITECTURE invariant 1): a change is committed
  first, then delivery is told which devices changed. The signal is only a hint
  that saves waiting for the next sweep or poll; losing it loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class DeliverySignal(Protocol):
    """Implemented by the MQTT link (:class:`hub.link.BrokerLink`)."""

    def desired_changed(self, device_ids: Iterable[str]) -> None:
        """Thread-safe: these devices' desired documents changed (or they were deleted),
        and the change is committed."""
