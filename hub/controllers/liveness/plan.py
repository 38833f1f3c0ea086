"""The liveness controller's planner (pure): which online devices are gone, when to look again.

Nothing here does I/O or reads a clock: the driver passes the online devices it
read (each with its ``last_seen`` and announced ``heartbeat_s``), ``now`` and
``listening_since`` (when the hub's link connected), and carries out the plan.

Rules:
- A device is expected to say something (a heartbeat is a report) every
  ``heartbeat_s`` seconds: its own, from its birth, else the hub's default. It is
  **silent** for ``now - max(last_seen, listening_since)``: the hub can only hear
  silence while it listens, so a hub that was down or disconnected does not mark
  the whole fleet offline when it comes back (their heartbeats, queued at the
  broker or still to come, arrive first).
- A device silent for ``missed`` intervals or more (``>=``) is marked offline.
  ``missed`` is at least 1. The Will (MQTT keepalive) usually comes first; this is
  for the connection the broker still believes in: a half-open link, a hung agent,
  a broker that lost the Will.
- ``wake_after_s``: the time until the next online device could become due (the
  earliest deadline among those not marked now), never below ``min_wake_s`` (a
  burst of deadlines costs one look); None when no device is online.
- A device with no ``last_seen`` counts from ``listening_since``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Seen:
    """One online device as the driver read it (epoch seconds)."""

    device_id: str
    last_seen: float | None
    heartbeat_s: float | None


@dataclass(frozen=True, slots=True)
class Plan:
    """Mark ``offline`` (in this order; why: ``reasons`` by device), look again after
    ``wake_after_s`` (None: only when woken)."""

    offline: tuple[str, ...]
    reasons: dict[str, str]
    wake_after_s: float | None


def deadline(
    seen: Seen, *, listening_since: float, default_heartbeat_s: float, missed: int
) -> float:
    """Pure: when ``seen`` becomes due to be marked offline (epoch seconds)."""
    interval = seen.heartbeat_s if seen.heartbeat_s else default_heartbeat_s
    last = max(seen.last_seen if seen.last_seen is not None else listening_since, listening_since)
    return last + missed * interval


def plan(
    online: Sequence[Seen],
    *,
    now: float,
    listening_since: float,
    default_heartbeat_s: float,
    missed: int,
    min_wake_s: float = 1.0,
) -> Plan:
    """Pure: which ``online`` devices to mark offline now (see the module rules).

    Raises ValueError when ``missed`` < 1 or ``default_heartbeat_s`` <= 0."""
    if missed < 1:
        raise ValueError(f"missed must be at least 1, got {missed}")
    if default_heartbeat_s <= 0:
        raise ValueError(f"default_heartbeat_s must be above 0, got {default_heartbeat_s}")
    offline: list[str] = []
    reasons: dict[str, str] = {}
    next_due: float | None = None
    for seen in online:
        due = deadline(
            seen,
            listening_since=listening_since,
            default_heartbeat_s=default_heartbeat_s,
            missed=missed,
        )
        if due <= now:
            offline.append(seen.device_id)
            interval = seen.heartbeat_s or default_heartbeat_s
            reasons[seen.device_id] = (
                f"no message for {now - (due - missed * interval):.1f} s: "
                f"{missed} heartbeats of {interval:g} s missed"
            )
        elif next_due is None or due < next_due:
            next_due = due
    wake = None if next_due is None else max(min_wake_s, next_due - now)
    return Plan(tuple(offline), reasons, wake)
