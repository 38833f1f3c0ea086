"""The device's outbox: what it produced while it could not publish (architecture rule 5).

The reconcile core puts a message here instead of publishing it when the
device has no connection, or when a publish was refused; on the next
connection the core drains it, oldest first, before the status and the birth.
The driver keeps the outbox's :class:`OutboxSnapshot`: on disk on a device
(``edge_agent.store.OutboxStore``, replaced atomically), in memory in the
simulator.

Rules:
- Two lanes. **State** entries have a key (``reported``): a newer entry
  replaces the older one with the same key, because for state only the newest
  matters. **Events** are kept in order, at most ``max_events`` of them and
  ``max_event_bytes`` of payload; past either bound the oldest event is
  dropped and ``dropped`` grows by one (an event larger than the byte bound on
  its own is dropped at once). ``dropped`` only grows, also across restarts.
- Entries leave in the order they were put (``order``), across lanes: a
  report carries its ``(boot_epoch, seq)`` and the hub drops one older than
  the newest it has, so an older report must never follow a newer one.
- Pure: no I/O, no clock. A snapshot is a value the driver stores as it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Lane(enum.StrEnum):
    """How the outbox keeps a message: newest per key (state), or in order (event)."""

    STATE = "state"
    EVENT = "event"


@dataclass(frozen=True)
class OutboxLimits:
    """Bounds of the event lane (the state lane holds one entry per key)."""

    max_events: int = 1000
    max_event_bytes: int = 512 * 1024

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.max_event_bytes < 1:
            raise ValueError("max_events and max_event_bytes must be at least 1")


@dataclass(frozen=True)
class Entry:
    """One message waiting for a connection; ``key`` names its state ("" for an event)."""

    order: int
    lane: Lane
    key: str
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class OutboxSnapshot:
    """Everything the outbox holds: what the driver stores, and what a new one starts from."""

    entries: tuple[Entry, ...] = ()
    dropped: int = 0
    next_order: int = 0


class Outbox:
    """The two lanes, bounded; call :meth:`put` while offline and :meth:`drain` on connect."""

    def __init__(self, limits: OutboxLimits, snapshot: OutboxSnapshot | None = None) -> None:
        self.limits = limits
        start = snapshot or OutboxSnapshot()
        self._state: dict[str, Entry] = {}
        self._events: list[Entry] = []
        self.dropped = start.dropped
        self._next = start.next_order
        for entry in sorted(start.entries, key=lambda e: e.order):
            self._next = max(self._next, entry.order + 1)
            self._add(entry)

    def __len__(self) -> int:
        return len(self._state) + len(self._events)

    @property
    def event_bytes(self) -> int:
        return sum(len(e.payload) for e in self._events)

    def put(
        self, lane: Lane, key: str, topic: str, payload: bytes, *, retain: bool = False
    ) -> None:
        """Keep one message; an event past the bounds pushes out the oldest (counted)."""
        entry = Entry(self._next, lane, key if lane is Lane.STATE else "", topic, payload, retain)
        self._next += 1
        self._add(entry)

    def _add(self, entry: Entry) -> None:
        if entry.lane is Lane.STATE:
            self._state.pop(entry.key, None)  # the newer one replaces it, and goes last
            self._state[entry.key] = entry
            return
        if len(entry.payload) > self.limits.max_event_bytes:
            self.dropped += 1
            return
        self._events.append(entry)
        held = self.event_bytes
        while len(self._events) > self.limits.max_events or held > self.limits.max_event_bytes:
            held -= len(self._events.pop(0).payload)
            self.dropped += 1

    def drain(self) -> tuple[Entry, ...]:
        """Every entry in the order it was put; the outbox is empty afterwards."""
        entries = tuple(sorted([*self._state.values(), *self._events], key=lambda e: e.order))
        self._state.clear()
        self._events.clear()
        return entries

    def snapshot(self) -> OutboxSnapshot:
        entries = tuple(sorted([*self._state.values(), *self._events], key=lambda e: e.order))
        return OutboxSnapshot(entries, self.dropped, self._next)
