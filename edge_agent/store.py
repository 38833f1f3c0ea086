"""The agent's on-disk state and outbox: atomic writes only.

Rules:
- Every write goes to a temporary file in the same directory, is fsynced, then
  renamed over the target, and the directory is fsynced
  (:mod:`firmware_bundles.atomic`): a crash at any instant leaves the old file
  or the new one, never a torn mix (invariant 4). Files are mode 0600.
- A state file that cannot be read is moved aside (``.corrupt``), never deleted,
  and the agent starts from defaults; the core's clock-based boot epoch keeps
  report ordering intact. So is an unreadable outbox: it starts empty.
- ``outbox.json`` holds :class:`edge_agent.outbox.OutboxSnapshot`: every
  entry with its order, lane, key, topic and payload (base64), the count of
  dropped events and the next order number. It is rewritten whole on every
  change (the outbox is bounded: at most ``max_events`` events and one entry
  per state key).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import msgspec

from edge_agent.core import AgentState, HistoryEntry
from edge_agent.outbox import Entry, Lane, OutboxSnapshot
from firmware_bundles import atomic

log = logging.getLogger("driftless.agent.store")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` (mode 0600) with ``data`` atomically and durably, creating its
    directory if needed; raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write_bytes(path, data, mode=0o600)


def remove_stale_temporaries(directory: Path) -> int:
    """Delete temp files a crash left behind; returns how many."""
    removed = 0
    for leftover in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
            removed += 1
    return removed


class _StateFile(msgspec.Struct):
    applied_generation: int = 0
    failed_generation: int = 0
    last_error: str | None = None
    boot_epoch: int = 0
    session: int = 0
    history: list[tuple[int, bool, float]] = []


class StateStore:
    """``state.json`` in the agent's data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "state.json"

    def load(self) -> AgentState:
        """Read the state; a missing file gives defaults. Never touches other files."""
        try:
            raw = msgspec.json.decode(self.path.read_bytes(), type=_StateFile)
        except FileNotFoundError:
            return AgentState()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)  # the owner's job; only the agent calls load on start
            log.error(
                "state file unreadable; moved aside", extra={"path": str(aside), "error": str(exc)}
            )
            return AgentState()
        return AgentState(
            applied_generation=raw.applied_generation,
            failed_generation=raw.failed_generation,
            last_error=raw.last_error,
            boot_epoch=raw.boot_epoch,
            session=raw.session,
            history=tuple(HistoryEntry(g, ok, at) for g, ok, at in raw.history),
        )

    def save(self, state: AgentState) -> None:
        raw = _StateFile(
            applied_generation=state.applied_generation,
            failed_generation=state.failed_generation,
            last_error=state.last_error,
            boot_epoch=state.boot_epoch,
            session=state.session,
            history=[(h.generation, h.ok, h.at) for h in state.history],
        )
        atomic_write_bytes(self.path, msgspec.json.format(msgspec.json.encode(raw)))


class _OutboxEntry(msgspec.Struct):
    order: int
    lane: Lane
    key: str
    topic: str
    payload: bytes  # base64 in the file
    retain: bool = False


class _OutboxFile(msgspec.Struct):
    format: int = 1
    dropped: int = 0
    next_order: int = 0
    entries: list[_OutboxEntry] = []


class OutboxStore:
    """``outbox.json`` in the agent's data directory: what waits for a connection."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "outbox.json"

    def load(self) -> OutboxSnapshot:
        """The outbox as last saved; a missing file is an empty outbox."""
        try:
            raw = msgspec.json.decode(self.path.read_bytes(), type=_OutboxFile)
        except FileNotFoundError:
            return OutboxSnapshot()
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            aside = self.path.with_suffix(".corrupt")
            os.replace(self.path, aside)
            log.error(
                "outbox file unreadable; moved aside", extra={"path": str(aside), "error": str(exc)}
            )
            return OutboxSnapshot()
        entries = tuple(
            Entry(e.order, e.lane, e.key, e.topic, e.payload, e.retain) for e in raw.entries
        )
        return OutboxSnapshot(entries, raw.dropped, raw.next_order)

    def save(self, snapshot: OutboxSnapshot) -> None:
        raw = _OutboxFile(
            dropped=snapshot.dropped,
            next_order=snapshot.next_order,
            entries=[
                _OutboxEntry(e.order, e.lane, e.key, e.topic, e.payload, e.retain)
                for e in snapshot.entries
            ],
        )
        atomic_write_bytes(self.path, msgspec.json.encode(raw))
