"""The simulated devices' disks: one append-only journal of agent states per worker.

A real device keeps its agent state (boot epoch, session, applied and failed
generations) on disk, so a crash or reboot does not reset it; the hub relies on
that (a birth from an older session is ignored). Simulated devices keep theirs
here, so a worker process that is SIGKILLed and started again, or a second
``driftless sim run`` against the same hub, continues where its devices were.

Rules:
- One line per saved state: ``{"d": device id, "s": AgentState}`` (msgspec JSON),
  written with one ``os.write`` on an ``O_APPEND`` descriptor, so a killed
  process loses at most the state it was writing; a torn or malformed line is
  skipped when read. Within a file the last line of a device wins.
- Across files (another split of devices over workers) the state with the
  greater ``(boot_epoch, session)`` wins: both only grow on a device.
- A journal rewrites itself compactly (temporary file + ``os.replace``) when it
  holds more than ``compact_factor`` lines per device, so it stays bounded.
- Nothing here runs in the event loop's way for long: a save is one small write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import msgspec

from edge_agent.core import AgentState

JOURNAL_GLOB = "worker-*.jsonl"
MAX_JOURNAL_LINE_BYTES = 64 * 1024


class Entry(msgspec.Struct, frozen=True):
    d: str
    s: AgentState


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Entry)


def journal_path(state_dir: Path, worker: int) -> Path:
    return state_dir / f"worker-{worker}.jsonl"


def _newer(a: AgentState, b: AgentState) -> bool:
    return (a.boot_epoch, a.session) > (b.boot_epoch, b.session)


def read_journal(path: Path) -> tuple[dict[str, AgentState], int]:
    """The newest state per device in one journal, and how many lines were unreadable.

    A missing file is an empty journal. Raises OSError only for an unreadable file.
    """
    states: dict[str, AgentState] = {}
    bad = 0
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        return states, 0
    with handle:
        for line in handle:
            if len(line) > MAX_JOURNAL_LINE_BYTES:
                bad += 1
                continue
            try:
                entry = _decoder.decode(line)
            except msgspec.DecodeError:
                bad += 1  # a line torn by a kill, or not ours
                continue
            states[entry.d] = entry.s
    return states, bad


def write_states(path: Path, states: Mapping[str, AgentState]) -> None:
    """Replace ``path`` atomically with one line per device (temporary file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        for device_id, state in states.items():
            handle.write(_encoder.encode(Entry(device_id, state)) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_all(state_dir: Path) -> dict[str, AgentState]:
    """Every device's newest state across all journals in ``state_dir``."""
    merged: dict[str, AgentState] = {}
    for path in [*sorted(state_dir.glob(JOURNAL_GLOB)), state_dir / "others.jsonl"]:
        states, _bad = read_journal(path)
        for device_id, state in states.items():
            known = merged.get(device_id)
            if known is None or _newer(state, known):
                merged[device_id] = state
    return merged


def redistribute(state_dir: Path, slices: Sequence[Iterable[str]]) -> list[Path]:
    """Merge every journal in ``state_dir`` and write one per slice of device ids.

    Run by the parent before workers start, so a run with a different number of
    workers still finds each device's state. Returns the journal for each slice.
    States of devices in no slice are kept in ``others.jsonl``, so a run with
    another prefix or fewer devices loses nothing.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    merged = read_all(state_dir)
    paths: list[Path] = []
    for index, ids in enumerate(slices):
        part = {d: merged.pop(d) for d in ids if d in merged}
        path = journal_path(state_dir, index)
        write_states(path, part)
        paths.append(path)
    write_states(state_dir / "others.jsonl", merged)
    wanted = set(paths)
    for path in state_dir.glob(JOURNAL_GLOB):
        if path not in wanted:
            path.unlink(missing_ok=True)
    return paths


class Journal:
    """One worker's journal, open for appending; :meth:`save` is the fleet's ``persist``."""

    def __init__(self, path: Path, *, compact_factor: int = 8, min_lines: int = 10_000) -> None:
        self.path = path
        self.states, self.unreadable = read_journal(path)
        self._compact_factor = compact_factor
        self._min_lines = min_lines
        self._lines = 0
        self._fd = -1
        self._compact()  # start from one line per device

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _compact(self) -> None:
        self.close()
        write_states(self.path, self.states)
        self._lines = len(self.states)
        self._open()

    def save(self, device_id: str, state: AgentState) -> None:
        """Record a device's newest state (one write); compacts when the file grows too long."""
        self.states[device_id] = state
        if self._fd < 0:
            return  # closed: the fleet is stopping and the state is still kept in memory
        os.write(self._fd, _encoder.encode(Entry(device_id, state)) + b"\n")
        self._lines += 1
        if self._lines > max(self._min_lines, self._compact_factor * len(self.states)):
            self._compact()

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
