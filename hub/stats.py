"""In-memory counters of one broker link and its chunk server (``GET /api/v1/hub/stats``).

Rules:
- Counters are touched only on the event loop thread (the link's tasks and async
  route handlers), so they need no lock.
- Keys are stable strings: channels, ``protocols.Reason`` values, ``hub.devices.rules`` reasons.
- These are observations, not state: losing them on restart loses nothing.
- Other threads read them only through a copy :meth:`LinkStats.as_dict` made on the
  event loop (``/metrics`` takes one there before it renders, :mod:`hub.metrics`).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("hub.mqtt")  # rejections are the MQTT side's to report


@dataclass
class LinkStats:
    """Counters of the link's session and of everything registered on it."""

    broker: str
    mqtt_connected: bool = False
    connects: int = 0
    reconnects: int = 0
    connect_failures: int = 0
    received: Counter[str] = field(default_factory=Counter)  # per channel, plus "total"
    rejected: Counter[str] = field(default_factory=Counter)  # per reason
    stale: Counter[str] = field(default_factory=Counter)  # stale_birth/_status/_report
    errors: Counter[str] = field(default_factory=Counter)  # local faults: internal_error ...
    applied: int = 0
    ingest_batches: int = 0
    ingest_batch_max_seen: int = 0
    desired_published: int = 0
    desired_cleared: int = 0
    publish_failures: int = 0
    sweeps: int = 0
    pending_desired: int = 0
    feed_changes: int = 0  # devices queued from the database's change feed
    cutoffs_requested: int = 0  # decommissioned devices the broker was asked to cut off
    cutoffs_confirmed: int = 0
    cutoff_errors: Counter[str] = field(default_factory=Counter)  # per broker error text
    renewals: Counter[str] = field(default_factory=Counter)  # granted / refused

    def as_dict(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "mqtt_connected": self.mqtt_connected,
            "connects": self.connects,
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "received": dict(self.received),
            "rejected": dict(self.rejected),
            "stale": dict(self.stale),
            "errors": dict(self.errors),
            "applied": self.applied,
            "ingest_batches": self.ingest_batches,
            "ingest_batch_max_seen": self.ingest_batch_max_seen,
            "desired_published": self.desired_published,
            "desired_cleared": self.desired_cleared,
            "publish_failures": self.publish_failures,
            "sweeps": self.sweeps,
            "pending_desired": self.pending_desired,
            "feed_changes": self.feed_changes,
            "cutoffs_requested": self.cutoffs_requested,
            "cutoffs_confirmed": self.cutoffs_confirmed,
            "cutoff_errors": dict(self.cutoff_errors),
            "renewals": dict(self.renewals),
        }

    def count_internal_error(self) -> None:
        """A local fault (logged with its traceback where it happened)."""
        self.errors["internal_error"] += 1

    def reject(self, topic_name: str, device_id: str | None, reason: str, detail: str) -> None:
        """Count a refused device message by ``reason`` and log it (truncated)."""
        self.rejected[reason] += 1
        log.warning(
            "device message rejected",
            extra={
                "topic": topic_name[:200],
                "device": device_id,
                "reason": reason,
                "detail": detail[:300],
            },
        )


@dataclass
class ChunkServerStats:
    """Counters of the chunk server, served under ``bundles`` at ``GET /api/v1/hub/stats``.

    Touched only on the event loop thread.
    """

    mqtt_connected: bool = False
    connects: int = 0
    reconnects: int = 0  # kept by the session; not shown (it never was)
    connect_failures: int = 0
    requests: int = 0
    chunks_served: int = 0
    bytes_served: int = 0
    errors_sent: Counter[str] = field(default_factory=Counter)  # per ChunkErrorCode label
    rejected: Counter[str] = field(default_factory=Counter)  # per protocols.Reason value
    dropped: Counter[str] = field(default_factory=Counter)  # overloaded, disconnected, unsent
    internal_errors: int = 0
    queued: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "mqtt_connected": self.mqtt_connected,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "requests": self.requests,
            "chunks_served": self.chunks_served,
            "bytes_served": self.bytes_served,
            "errors_sent": dict(self.errors_sent),
            "rejected": dict(self.rejected),
            "dropped": dict(self.dropped),
            "internal_errors": self.internal_errors,
            "queued": self.queued,
        }

    def count_internal_error(self) -> None:
        self.internal_errors += 1
