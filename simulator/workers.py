"""Worker processes: each runs a :class:`simulator.fleet.Fleet` over its slice of the devices.

The parent (:class:`WorkerPool`) starts ``python -m simulator.workers`` once per
slice and talks to it over its standard streams, one JSON object per line:

- parent -> worker (stdin): first the :class:`WorkerSpec`, later commands
  ``{"cmd": "heal"}`` (end every fault) and ``{"cmd": "stop"}``;
- worker -> parent (stdout): ``started``, then a ``snapshot`` of its counters
  about every ``snapshot_interval_s``, and ``final`` after an orderly stop
  (or ``error`` if it could not start). Its log goes to stderr (a file).

Rules:
- The split is pure and deterministic (:func:`split`): contiguous slices of
  ``device_ids(count, prefix)`` whose sizes differ by at most one.
- A worker raises RLIMIT_NOFILE for its slice (``Fleet.start``) and sets the
  cyclic collector's thresholds for a heap of thousands of devices
  (``simulator.fleet.GC_THRESHOLDS``).
- A worker never outlives its parent: it asks the kernel for SIGTERM when the
  parent dies (``PR_SET_PDEATHSIG``), treats end-of-file on stdin as "stop",
  and checks its parent pid once per snapshot. SIGTERM is an orderly stop
  (status offline, DISCONNECT); SIGINT is ignored, so a Ctrl-C on the terminal
  stops the workers only through the parent, in order.
- Workers stay in the parent's process group, so ``kill -- -PGID`` reaches all.
- The parent survives a worker's death: it records the exit status, keeps the
  dead incarnation's last counters, and (``respawn``) starts the same slice
  again after ``respawn_delay_s``, at most ``max_respawns`` times per slice.
  The devices' states come back from the worker's journal
  (``simulator.journal``), as from a device's disk.
- Every wait has a deadline; a worker that does not stop in time is SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from simulator.profiles import Profile

log = logging.getLogger("driftless.sim.workers")

MAX_LINE_BYTES = 4 * 1024 * 1024  # one protocol line, parent side
GAUGES = frozenset({"connected", "offline_now"})  # counters that are levels, not totals
PR_SET_PDEATHSIG = 1


class WorkerError(RuntimeError):
    """A worker could not be started, or said it could not run its slice."""


class WorkerSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything one worker needs; sent as its first line on stdin."""

    index: int
    prefix: str
    count: int  # the whole fleet: ids are device_ids(count, prefix)
    start: int  # this worker's slice is ids[start:stop]
    stop: int
    broker_url: str
    seed: int
    profile: Profile
    epoch: float  # wall-clock t = 0 of the fault schedule, shared by every worker
    parent_pid: int
    journal: str | None = None
    snapshot_interval_s: float = 1.0
    max_concurrent_connects: int = 64
    stop_timeout_s: float = 15.0
    log_level: str = "info"
    root: str | None = None  # the fleet's root.json, for bundle transfers (``--root``)
    fetch_chunk_bytes: int | None = None  # None: the simulator's defaults (fleet.SIM_FETCH)
    fetch_window_chunks: int | None = None
    identity_dir: str | None = None  # enrolled identities (``--enroll``): mqtts:// per device


def split(count: int, workers: int) -> list[range]:
    """Pure: contiguous index ranges over ``count`` devices, sizes differing by at most 1.

    Never more ranges than devices (no empty workers); raises ValueError for
    ``workers < 1`` or a negative count.
    """
    if workers < 1 or count < 0:
        raise ValueError("need workers >= 1 and count >= 0")
    parts = min(workers, count) or 1
    size, extra = divmod(count, parts)
    out: list[range] = []
    start = 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def sum_counts(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: add two counter snapshots key by key (nested dicts too); other values from ``b``."""
    out: dict[str, Any] = dict(a)
    for key, value in b.items():
        mine = out.get(key)
        if isinstance(value, Mapping) and isinstance(mine, Mapping):
            out[key] = sum_counts(mine, value)
        elif isinstance(value, int) and isinstance(mine, int) and not isinstance(value, bool):
            out[key] = mine + value
        else:
            out[key] = value
    return out


def totals_only(counters: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: a snapshot without its gauges (what a dead incarnation leaves behind)."""
    return {k: v for k, v in counters.items() if k not in GAUGES}


def rss_bytes() -> int:
    """Resident memory of this process (Linux ``/proc/self/statm``); 0 where unknown."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# ---------------------------------------------------------------- the worker side


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux for SIGTERM when the parent dies; exit at once if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:
        raise SystemExit(3)


class _Out:
    """The worker's protocol stream: the original stdout, with fd 1 pointed at stderr."""

    def __init__(self) -> None:
        self._fd = os.dup(1)
        os.dup2(2, 1)  # a stray print() must not corrupt the protocol
        self.broken = False

    def send(self, message: Mapping[str, Any]) -> None:
        if self.broken:
            return
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError:  # the parent is gone
            self.broken = True


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def _serve(out: _Out) -> int:
    from simulator.fleet import (
        SIM_FETCH,
        Fleet,
        FleetConfig,
        FleetError,
        device_ids,
        tune_gc_for_many_devices,
    )
    from simulator.journal import Journal

    tune_gc_for_many_devices()

    commands = await _stdin_reader()
    first = await commands.readline()
    try:
        spec = msgspec.json.decode(first, type=WorkerSpec)
    except msgspec.DecodeError as exc:
        out.send({"type": "error", "message": f"bad worker spec: {exc}"})
        return 2
    _die_with_parent(spec.parent_pid)
    logging.getLogger().setLevel(spec.log_level.upper())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    ids = device_ids(spec.count, spec.prefix)[spec.start : spec.stop]
    rss_base = rss_bytes()
    journal = Journal(Path(spec.journal)) if spec.journal else None
    try:
        fetch = dataclasses.replace(
            SIM_FETCH,
            chunk_bytes=spec.fetch_chunk_bytes or SIM_FETCH.chunk_bytes,
            window_chunks=spec.fetch_window_chunks or SIM_FETCH.window_chunks,
        )
        config = FleetConfig.from_profile(
            spec.profile,
            broker_url=spec.broker_url,
            device_ids=ids,
            seed=spec.seed,
            max_concurrent_connects=spec.max_concurrent_connects,
            stop_timeout_s=spec.stop_timeout_s,
            root_path=Path(spec.root) if spec.root else None,
            fetch=fetch,
            identity_dir=Path(spec.identity_dir) if spec.identity_dir else None,
        )
        fleet = Fleet(
            config,
            epoch=spec.epoch,
            states=journal.states if journal else None,
            persist=journal.save if journal else None,
        )
        await fleet.start()
    except (FleetError, ValueError) as exc:
        out.send({"type": "error", "message": str(exc)})
        if journal:
            journal.close()
        return 2

    def snapshot(kind: str) -> dict[str, Any]:
        return {
            "type": kind,
            "worker": spec.index,
            "pid": os.getpid(),
            "t": time.time(),
            "devices": len(ids),
            "counters": fleet.counters.snapshot(),
            "generations": {str(g): n for g, n in sorted(fleet.applied_generations().items())},
            "rss_bytes": rss_bytes(),
            "rss_base_bytes": rss_base,
        }

    async def obey() -> None:
        while not stop.is_set():
            line = await commands.readline()
            if not line:  # EOF: the parent is gone
                stop.set()
                return
            with contextlib.suppress(ValueError):
                cmd = json.loads(line).get("cmd")
                if cmd == "stop":
                    stop.set()
                elif cmd == "heal":
                    await fleet.heal()

    out.send({"type": "started", "worker": spec.index, "pid": os.getpid(), "devices": len(ids)})
    obeying = asyncio.create_task(obey())
    try:
        while not stop.is_set():
            out.send(snapshot("snapshot"))
            if out.broken or os.getppid() != spec.parent_pid:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), spec.snapshot_interval_s)
    finally:
        obeying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await obeying
        await fleet.stop()
        out.send(snapshot("final"))
        if journal:
            journal.close()
    return 0


def worker_main() -> int:
    """``python -m simulator.workers``: run one slice until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from plumbing import logs

    logs.configure("info", fmt="json")
    out = _Out()
    try:
        return asyncio.run(_serve(out))
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- the parent side


@dataclass
class WorkerState:
    """What the parent knows about one slice, across its incarnations."""

    spec: WorkerSpec
    log_path: Path
    proc: asyncio.subprocess.Process | None = None
    pids: list[int] = field(default_factory=list)
    restarts: int = 0
    deaths: list[dict[str, Any]] = field(default_factory=list)
    latest: dict[str, Any] | None = None  # the current incarnation's newest snapshot
    retired: dict[str, Any] = field(default_factory=dict)  # totals of dead incarnations
    finished: bool = False  # sent "final" after an orderly stop
    error: str | None = None
    respawn_at: float | None = None
    pump: asyncio.Task[None] | None = None
    rss_bytes: int = 0  # from the newest running snapshot, kept after the worker ends
    rss_base_bytes: int = 0  # the same worker's resident size before its fleet started

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def pid(self) -> int | None:
        return self.pids[-1] if self.pids else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def counters(self) -> dict[str, Any]:
        """Totals over every incarnation; gauges from the current (or final) snapshot only."""
        current = self.latest["counters"] if self.latest is not None else {}
        return sum_counts(self.retired, current)

    def figures(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "pid": self.pid,
            "pids": list(self.pids),
            "alive": self.alive,
            "devices": self.spec.stop - self.spec.start,
            "first_device": self.spec.start,
            "restarts": self.restarts,
            "deaths": list(self.deaths),
            "error": self.error,
            "rss_bytes": self.rss_bytes,
            "rss_base_bytes": self.rss_base_bytes,
            "counters": self.counters(),
            "log": str(self.log_path),
        }


class WorkerPool:
    """Starts, watches, respawns and stops the workers of one run."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        log_dir: Path,
        respawn: bool = True,
        max_respawns: int = 5,
        respawn_delay_s: float = 1.0,
        stop_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.workers = [
            WorkerState(spec=s, log_path=log_dir / f"worker-{s.index}.log") for s in specs
        ]
        self.respawn = respawn
        self.max_respawns = max_respawns
        self.respawn_delay_s = respawn_delay_s
        self.stop_timeout_s = stop_timeout_s
        self._clock = clock
        self._stopping = False
        self._changed = asyncio.Event()

    # -- lifecycle

    async def start(self) -> None:
        for worker in self.workers:
            await self._launch(worker)

    async def _launch(self, worker: WorkerState) -> None:
        worker.log_path.parent.mkdir(parents=True, exist_ok=True)
        with worker.log_path.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "simulator.workers",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                limit=MAX_LINE_BYTES,
            )
        assert proc.stdin is not None
        proc.stdin.write(msgspec.json.encode(worker.spec) + b"\n")
        worker.proc = proc
        worker.pids.append(proc.pid)
        worker.latest = None
        worker.finished = False
        worker.respawn_at = None
        worker.pump = asyncio.create_task(self._pump(worker, proc), name=f"worker:{worker.index}")
        log.debug("worker started", extra={"worker": worker.index, "pid": proc.pid})

    async def _pump(self, worker: WorkerState, proc: asyncio.subprocess.Process) -> None:
        """Read the worker's lines until EOF, then record how it ended."""
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError):
                continue  # an oversized line: skip it, the next snapshot supersedes it
            if not line:
                break
            try:
                message = json.loads(line)
            except ValueError:
                continue
            kind = message.get("type")
            if kind in ("snapshot", "final"):
                worker.latest = message
                worker.finished = kind == "final"
                if kind == "snapshot":
                    worker.rss_bytes = int(message.get("rss_bytes", 0))
                    worker.rss_base_bytes = int(message.get("rss_base_bytes", 0))
            elif kind == "error":
                worker.error = str(message.get("message"))
            self._changed.set()
        returncode = await proc.wait()
        keep_final = self._stopping and worker.finished  # the final snapshot stands for it
        if worker.latest is not None and not keep_final:
            worker.retired = sum_counts(worker.retired, totals_only(worker.latest["counters"]))
            worker.latest = None
        if not self._stopping:
            death = {"pid": proc.pid, "returncode": returncode, "at": time.time()}
            worker.deaths.append(death)
            log.debug("worker died", extra={"worker": worker.index, **death})
            if self.respawn and worker.restarts < self.max_respawns and worker.error is None:
                worker.respawn_at = self._clock() + self.respawn_delay_s
        self._changed.set()

    async def supervise(self) -> list[int]:
        """Respawn every dead worker whose delay has passed; returns their indexes."""
        now = self._clock()
        started = []
        for worker in self.workers:
            if self._stopping or worker.respawn_at is None or worker.respawn_at > now:
                continue
            worker.restarts += 1
            try:
                await self._launch(worker)
            except OSError as exc:
                worker.error = f"respawn failed: {exc}"
                worker.respawn_at = None
                continue
            started.append(worker.index)
        return started

    async def send(self, command: str) -> None:
        """Send ``{"cmd": command}`` to every living worker (best effort)."""
        line = json.dumps({"cmd": command}).encode() + b"\n"
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.returncode is not None or proc.stdin is None:
                continue
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.write(line)
                await proc.stdin.drain()

    async def stop(self, *, kill: bool = False) -> None:
        """Orderly stop (``stop``, then SIGTERM, then SIGKILL at the deadlines); idempotent."""
        self._stopping = True
        for worker in self.workers:
            worker.respawn_at = None
        if not kill:
            await self.send("stop")
        procs = [w.proc for w in self.workers if w.proc is not None]
        steps: list[tuple[signal.Signals | None, float]] = [
            (None, self.stop_timeout_s),
            (signal.SIGTERM, 5.0),
            (signal.SIGKILL, 5.0),
        ]
        if kill:
            steps = [(signal.SIGKILL, 5.0)]
        for signum, wait_s in steps:
            living = [p for p in procs if p.returncode is None]
            if not living:
                break
            for proc in living:
                if signum is not None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signum)
            waits = [asyncio.create_task(p.wait()) for p in living]
            _done, pending = await asyncio.wait(waits, timeout=wait_s)
            for task in pending:
                task.cancel()
        pumps = [w.pump for w in self.workers if w.pump is not None]
        if pumps:
            await asyncio.wait(pumps, timeout=5.0)
        for worker in self.workers:
            if worker.proc is not None and worker.proc.stdin is not None:
                worker.proc.stdin.close()

    async def wait_changed(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for a worker message or death."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    # -- figures

    def alive(self) -> int:
        return sum(w.alive for w in self.workers)

    def counters(self) -> dict[str, Any]:
        total: dict[str, Any] = {}
        for worker in self.workers:
            total = sum_counts(total, worker.counters())
        return total

    def generations(self) -> dict[int, int]:
        """Devices per applied generation, over each worker's newest (or final) snapshot;
        a dead worker's devices are not counted until it is back."""
        out: dict[int, int] = {}
        for worker in self.workers:
            if worker.latest is not None:
                for gen, n in worker.latest.get("generations", {}).items():
                    out[int(gen)] = out.get(int(gen), 0) + int(n)
        return out

    def rss(self) -> tuple[int, int]:
        """(resident bytes, resident bytes before the fleets started), summed over workers,
        from each one's newest running snapshot."""
        return (
            sum(w.rss_bytes for w in self.workers),
            sum(w.rss_base_bytes for w in self.workers),
        )

    def errors(self) -> list[str]:
        return [f"worker {w.index}: {w.error}" for w in self.workers if w.error]

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive and w.pid is not None]


if __name__ == "__main__":
    sys.exit(worker_main())
