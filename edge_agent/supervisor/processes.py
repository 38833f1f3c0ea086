"""The process table: spawn workloads, stop them, notice their exits, re-adopt them after a restart.

This is the supervisor's only process I/O. What to start, when to restart and
whether a workload is healthy are decided by the pure modules beside it; this
layer carries those decisions out and reports what the processes did.

Rules:
- Every workload is the leader of its own session and process group
  (``start_new_session=True``); stop and kill act on the group, so a workload's
  children go with it. Stop sends the stop signal, waits up to the grace
  period, then SIGKILLs the group, and returns only when the group is empty.
  A leader that exits on its own takes its group with it too (SIGKILL to what
  is left), so a restart never meets a stray child holding the old port.
- No ``preexec_fn`` (the agent is multi-threaded): limits come from prlimit(1)
  wrapping the command (:mod:`edge_agent.supervisor.limits`), which execs, so
  the pid and its start time are the workload's.
- Exits are noticed by one watcher thread blocked in ``select`` over a pidfd per
  process (``os.pidfd_open``): no polling, and it works for adopted processes
  that are not the agent's children. Children are reaped with ``waitpid`` when
  their pidfd is ready (exit code known); an adopted process that is not our
  child has ``exit_code=None``. A death by signal has ``exit_code=None`` and the
  signal in ``signal``. ``on_exit`` is called from the watcher thread for every
  exit the table was not asked for; never for :meth:`ProcessTable.stop`.
- The agent is a child subreaper (``PR_SET_CHILD_SUBREAPER``, where the kernel
  allows; :attr:`ProcessTable.subreaper` says), so a workload's double-forked
  daemons reparent to it. The watcher reaps only processes it can prove are a
  workload's (they carry this agent's marker, or they are in a workload's
  process group), never another child of the agent: a ``subprocess`` owner
  would lose its exit status. It looks for such orphans whenever it wakes and
  every ``orphan_scan_s``; an orphan that exits before it was seen and left its
  workload's group stays a zombie until the agent exits. :meth:`stop` kills a
  workload's known orphans with it.
- The record (``processes.json``: pid, start ticks from ``/proc/<pid>/stat``
  field 22, the launch) is replaced atomically right after every spawn and
  every removal. Each child also carries ``DRIFTLESS_INSTANCE=<tag>:<instance>``
  in its environment (and ``DRIFTLESS_WORKLOAD=<workload>``), so
  :meth:`ProcessTable.adopt` finds a workload whose record was never written
  (the agent died between the spawn and the write).
- A pid is trusted only with its start ticks: a record whose pid is gone, or
  now belongs to a process started at another time, is dropped and that
  process is never signalled. Signals to a single process go through its pidfd.
- ``tag`` names this agent's data directory, so two agents on one machine (the
  tests, the demo, the simulator) never adopt or reap each other's processes.
- A command that cannot start (missing file, not executable, missing working
  directory) raises :class:`SpawnError` with the reason, before anything runs.
- Light to import: standard library only (no urllib, asyncio, paho or
  cryptography); a test checks it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.supervisor import logs
from edge_agent.supervisor.limits import (
    CGROUP_ROOT,
    CgroupError,
    CgroupSupport,
    Limits,
    cgroup_support,
    place_in_cgroup,
    remove_cgroup,
    wrap_argv,
)
from firmware_bundles.atomic import atomic_write_bytes

log = logging.getLogger("driftless.agent.supervisor")

MARKER = "DRIFTLESS_INSTANCE"
WORKLOAD_MARKER = "DRIFTLESS_WORKLOAD"
RECORD_FILE = "processes.json"
RECORD_VERSION = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
KILL_WAIT_S = 5.0
"""How long a SIGKILLed group may take to disappear before stop() gives up and logs."""
GROUP_POLL_S = 0.01
PR_SET_CHILD_SUBREAPER = 36
NO_LIMITS = Limits()
DEFAULT_LOG_MAX_BYTES = 1 << 20
DEFAULT_LOG_KEEP = 3


class SpawnError(Exception):
    """A workload could not be started; the message says why, in terms an operator can act on."""


@dataclass(frozen=True)
class Launch:
    """Everything needed to start one instance of a workload (and to find it again)."""

    workload: str
    instance: str
    """Unique among running processes ("web.g7"): old and new may overlap in a hand-over."""
    argv: tuple[str, ...]
    cwd: Path
    env: Mapping[str, str]
    """The complete environment; the table adds its marker variable."""
    limits: Limits = NO_LIMITS
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    log_keep: int = DEFAULT_LOG_KEEP
    stop_signal: int = signal.SIGTERM
    stop_grace_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("workload", "instance"):
            value = getattr(self, name)
            if not isinstance(value, str) or not NAME.fullmatch(value):
                raise ValueError(f"launch.{name} must match {NAME.pattern}, got {value!r}")
        if not self.argv or not all(isinstance(arg, str) and arg for arg in self.argv[:1]):
            raise ValueError("launch.argv needs a command")
        if self.log_max_bytes <= 0 or self.log_keep < 0:
            raise ValueError("launch.log_max_bytes must be positive and log_keep not negative")
        if self.stop_grace_s < 0:
            raise ValueError("launch.stop_grace_s must not be negative")


@dataclass(frozen=True)
class Running:
    """A process the table watches."""

    workload: str
    instance: str
    pid: int
    start_ticks: int
    """``/proc/<pid>/stat`` field 22: with the pid, the process's identity."""
    started_at: float
    adopted: bool
    launch: Launch | None
    """None when adopted without a record (found by its marker)."""
    cgroup: Path | None = None
    """The cgroup v2 group it was placed in, if any."""


@dataclass(frozen=True)
class Exited:
    """A watched process ended."""

    workload: str
    instance: str
    pid: int
    exit_code: int | None
    """None when unknowable (adopted, not our child) or when a signal ended it."""
    signal: int | None
    at: float


@dataclass
class _Entry:
    running: Running
    pidfd: int
    popen: subprocess.Popen[bytes] | None
    stopping: bool = False
    exited: Exited | None = None
    gone: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Orphan:
    pid: int
    pidfd: int
    instance: str


@dataclass(frozen=True)
class _Stat:
    state: str
    ppid: int
    pgrp: int
    session: int
    start_ticks: int


class ProcessTable:
    """The workloads this agent runs: spawn, stop, watch, re-adopt. Thread-safe."""

    def __init__(
        self,
        state_dir: Path,
        *,
        on_exit: Callable[[Exited], None],
        clock: Callable[[], float] = time.time,
        tag: str | None = None,
        cgroup_root: Path = CGROUP_ROOT,
        orphan_scan_s: float = 5.0,
        prlimit: str = "/usr/bin/prlimit",
    ) -> None:
        self.state_dir = Path(state_dir)
        self.logs_root = self.state_dir / "logs"
        self.tag = tag if tag is not None else _default_tag(self.state_dir)
        if not NAME.fullmatch(self.tag):
            raise ValueError(f"tag must match {NAME.pattern}, got {self.tag!r}")
        self._on_exit = on_exit
        self._clock = clock
        self._prlimit = prlimit
        self._scan_s = orphan_scan_s
        self.cgroups: CgroupSupport = cgroup_support(cgroup_root)
        """Whether cgroup v2 limits can be set, or why not (for the device's report)."""
        self.subreaper, self.subreaper_reason = _become_subreaper()
        self._lock = threading.Lock()
        self._spawn_lock = threading.Lock()  # a child is registered before the scan may see it
        self._entries: dict[str, _Entry] = {}
        self._orphans: dict[int, _Orphan] = {}
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closing = False
        self._thread = threading.Thread(target=self._watch, name="supervisor-watch", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public

    def start(self, launch: Launch) -> Running:
        """Spawn one instance, record it and watch it; raises SpawnError (nothing runs then).

        A process that dies at once may be reported to ``on_exit`` before this returns.
        """
        command = _resolve(launch)
        log_fd = logs.open_for_child(self.log_path(launch.workload))
        env = {
            **launch.env,
            MARKER: self._marker(launch.instance),
            WORKLOAD_MARKER: launch.workload,
        }
        try:
            with self._spawn_lock:
                with self._lock:
                    if launch.instance in self._entries:
                        raise SpawnError(f"instance {launch.instance} is already running")
                popen = subprocess.Popen(
                    wrap_argv(command, launch.limits, prlimit=self._prlimit),
                    cwd=launch.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    start_new_session=True,
                    close_fds=True,
                )
                stat = _read_stat(popen.pid)
                running = Running(
                    workload=launch.workload,
                    instance=launch.instance,
                    pid=popen.pid,
                    start_ticks=stat.start_ticks if stat else 0,
                    started_at=self._clock(),
                    adopted=False,
                    launch=launch,
                )
                # our unreaped child: its pidfd opens even if it already exited
                entry = _Entry(running, os.pidfd_open(popen.pid), popen)
                self._register(entry)
        except OSError as exc:
            raise SpawnError(f"cannot start {launch.argv[0]}: {exc.strerror or exc}") from exc
        finally:
            os.close(log_fd)
        if launch.limits.wants_cgroup and self.cgroups.available:
            try:
                group = place_in_cgroup(
                    self.cgroups, self.tag, launch.instance, popen.pid, launch.limits
                )
            except CgroupError as exc:
                self.stop(launch.instance, grace_s=0)
                raise SpawnError(str(exc)) from exc
            with self._lock:
                entry.running = running = _with_cgroup(running, group)
        elif launch.limits.wants_cgroup:
            log.warning(
                "cgroup limits not applied",
                extra={"instance": launch.instance, "reason": self.cgroups.reason},
            )
        self._write_records()
        return running

    def stop(self, instance: str, *, grace_s: float | None = None) -> Exited | None:
        """Stop an instance's whole group (signal, grace, SIGKILL); blocks until it is gone.

        Returns None if the instance is not running. Does not call ``on_exit``.
        """
        with self._lock:
            entry = self._entries.get(instance)
            if entry is None or entry.stopping:
                return None
            entry.stopping = True
        launch = entry.running.launch
        stop_signal = launch.stop_signal if launch else signal.SIGTERM
        grace = grace_s if grace_s is not None else (launch.stop_grace_s if launch else 10.0)
        pgid = entry.running.pid
        deadline = time.monotonic() + grace
        _killpg(pgid, stop_signal)  # the leader is alive or an unreaped zombie: pgid is ours
        if not entry.gone.wait(grace):
            _killpg(pgid, signal.SIGKILL)
            entry.gone.wait(KILL_WAIT_S)
        # the watcher SIGKILLed what was left of the group when the leader ended
        if not self._wait_group_empty(pgid, max(deadline, time.monotonic() + KILL_WAIT_S)):
            log.error("workload group outlived SIGKILL", extra={"instance": instance})
        self._kill_orphans(instance)
        return entry.exited

    def adopt(self) -> list[Running]:
        """Watch again what this agent started before it restarted; returns what it adopted.

        A record counts only if its pid is alive with the recorded start ticks; a
        live process with this agent's marker and no record (the agent died between
        spawn and write) is adopted without a launch. Everything else is dropped.
        """
        records = self._read_records()
        adopted: list[Running] = []
        with self._lock:
            known = {entry.running.instance for entry in self._entries.values()}
        for record in records:
            if record.instance in known:
                continue
            stat = _read_stat(record.pid)
            if (
                stat is None
                or stat.start_ticks != record.start_ticks
                or stat.state == "Z"
                or stat.pgrp != record.pid
            ):
                log.info("record dropped", extra={"instance": record.instance, "pid": record.pid})
                continue
            adopted.append(_adopted(record, record.launch, record.started_at))
            known.add(record.instance)
        for pid, instance in self._marked_leaders():
            if instance in known:
                continue
            stat = _read_stat(pid)
            if stat is None:
                continue
            found = Running(
                workload=_workload_of(pid) or instance,
                instance=instance,
                pid=pid,
                start_ticks=stat.start_ticks,
                started_at=_started_at(stat.start_ticks),
                adopted=True,
                launch=None,
            )
            adopted.append(found)
            known.add(instance)
        watched: list[Running] = []
        for running in adopted:
            try:
                pidfd = os.pidfd_open(running.pid)
            except ProcessLookupError:
                continue
            stat = _read_stat(running.pid)
            if stat is None or stat.start_ticks != running.start_ticks:  # gone since we looked
                os.close(pidfd)
                continue
            self._register(_Entry(running, pidfd, None))
            watched.append(running)
        self._write_records()
        return watched

    def running(self) -> dict[str, Running]:
        """What runs now, by instance."""
        with self._lock:
            return {name: entry.running for name, entry in self._entries.items()}

    def log_path(self, workload: str) -> Path:
        """Where a workload's stdout and stderr go."""
        return logs.log_dir(self.logs_root, workload) / logs.CURRENT

    def log_tail(self, workload: str, lines: int = 20, max_bytes: int = 4096) -> list[str]:
        """The last lines of a workload's log (for failure reports)."""
        return logs.tail(self.log_path(workload), lines, max_bytes)

    def rotate_logs(self) -> None:
        """Rotate every running workload's log that is over its size; call periodically."""
        sizes: dict[str, tuple[int, int]] = {}
        for running in self.running().values():
            launch = running.launch
            size = (launch.log_max_bytes, launch.log_keep) if launch else None
            sizes.setdefault(running.workload, size or (DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_KEEP))
        for workload, (max_bytes, keep) in sizes.items():
            try:
                logs.rotate(self.log_path(workload), max_bytes=max_bytes, keep=keep)
            except OSError as exc:
                log.warning("log rotation failed", extra={"workload": workload, "error": str(exc)})

    def close(self) -> None:
        """Stop the watcher; the processes keep running (the next agent adopts them)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        self._wake()
        self._thread.join()
        with self._lock:
            for entry in self._entries.values():
                os.close(entry.pidfd)
            for orphan in self._orphans.values():
                os.close(orphan.pidfd)
            self._orphans.clear()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---------------------------------------------------------------- the watcher

    def _register(self, entry: _Entry) -> None:
        with self._lock:
            self._entries[entry.running.instance] = entry
            self._selector.register(entry.pidfd, selectors.EVENT_READ, entry)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _watch(self) -> None:
        while True:
            ready = self._selector.select(timeout=self._scan_s)
            with self._lock:
                if self._closing:
                    return
            for key, _ in ready:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                elif isinstance(key.data, _Orphan):
                    self._reap_orphan(key.data)
                else:
                    self._ended(key.data)
            try:
                self._scan_orphans()
            except OSError as exc:  # /proc unreadable: keep watching exits
                log.warning("orphan scan failed", extra={"error": str(exc)})

    def _ended(self, entry: _Entry) -> None:
        running = entry.running
        if entry.popen is not None:
            _killpg(running.pid, signal.SIGKILL)  # before the reap: the pgid cannot be reused yet
            code = entry.popen.poll()
            if code is None:  # not possible for a ready pidfd; be safe
                code = entry.popen.wait()
        else:  # adopted: its pid may be reaped by another parent by now, so kill by marker
            code = _reap_if_child(running.pid)
            self._kill_group_members(running.pid, running.instance)
        self._watch_leftovers(running.pid, running.instance)
        exited = Exited(
            workload=running.workload,
            instance=running.instance,
            pid=running.pid,
            exit_code=code if code is not None and code >= 0 else None,
            signal=-code if code is not None and code < 0 else None,
            at=self._clock(),
        )
        with self._lock:
            self._selector.unregister(entry.pidfd)
            os.close(entry.pidfd)
            del self._entries[running.instance]
            entry.exited = exited
            told = entry.stopping
        self._write_records()
        if running.cgroup is not None:
            remove_cgroup(running.cgroup)
        entry.gone.set()
        if not told:
            try:
                self._on_exit(exited)
            except Exception:
                log.exception("on_exit failed", extra={"instance": running.instance})

    def _wait_group_empty(self, pgid: int, deadline: float) -> bool:
        """Poll until no live process is left in the group (its zombies of ours reaped)."""
        while self._group_alive(pgid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(GROUP_POLL_S)
        return True

    def _group_alive(self, pgid: int) -> int:
        alive = 0
        for pid in _pids():
            stat = _read_stat(pid)
            if stat is None or stat.pgrp != pgid:
                continue
            if stat.state != "Z":
                alive += 1
            elif stat.ppid == os.getpid():  # reparented to us (subreaper) and dead: reap it
                _reap_if_child(pid)
        return alive

    def _kill_group_members(self, pgid: int, instance: str) -> None:
        """SIGKILL the live members of a group that carry ``instance``'s marker."""
        for pid in _pids():
            stat = _read_stat(pid)
            if stat is None or stat.pgrp != pgid or stat.state == "Z":
                continue
            if _instance_of(pid, self.tag) == instance:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def _watch_leftovers(self, pgid: int, instance: str) -> None:
        """Watch (to reap) the group's members that the leader's exit handed to us."""
        me = os.getpid()
        for pid in _pids():
            stat = _read_stat(pid)
            if stat is None or stat.pgrp != pgid or stat.ppid != me or pid == pgid:
                continue
            if stat.state == "Z":
                _reap_if_child(pid)
                continue
            with self._lock:
                if pid in self._orphans or self._closing:
                    continue
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            orphan = _Orphan(pid, pidfd, instance)
            with self._lock:
                self._orphans[pid] = orphan
                self._selector.register(pidfd, selectors.EVENT_READ, orphan)

    def _scan_orphans(self) -> None:
        """Watch this agent's children that carry its marker but that it did not spawn."""
        with self._spawn_lock:
            self._scan_orphans_locked()

    def _scan_orphans_locked(self) -> None:
        with self._lock:
            known = {entry.running.pid for entry in self._entries.values() if entry.popen}
            known |= set(self._orphans)
            groups = {entry.running.pid for entry in self._entries.values()}
        for pid in _children_of_self():
            if pid in known:
                continue
            stat = _read_stat(pid)
            if stat is None:
                continue
            if stat.state == "Z":
                if stat.pgrp in groups:
                    _reap_if_child(pid)
                continue
            instance = _instance_of(pid, self.tag)
            if instance is None:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            orphan = _Orphan(pid, pidfd, instance)
            with self._lock:
                if self._closing:
                    os.close(pidfd)
                    return
                self._orphans[pid] = orphan
                self._selector.register(pidfd, selectors.EVENT_READ, orphan)

    def _reap_orphan(self, orphan: _Orphan) -> None:
        with self._lock:
            self._selector.unregister(orphan.pidfd)
            os.close(orphan.pidfd)
            self._orphans.pop(orphan.pid, None)
        _reap_if_child(orphan.pid)

    def _kill_orphans(self, instance: str) -> None:
        self._scan_orphans()
        with self._lock:
            mine = [orphan for orphan in self._orphans.values() if orphan.instance == instance]
            for orphan in mine:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(orphan.pidfd, signal.SIGKILL)

    # ---------------------------------------------------------------- the record

    def _marker(self, instance: str) -> str:
        return f"{self.tag}:{instance}"

    def _write_records(self) -> None:
        with self._lock:
            entries = [entry.running for entry in self._entries.values()]
        document = {
            "version": RECORD_VERSION,
            "tag": self.tag,
            "processes": [_record_json(running) for running in entries],
        }
        try:
            atomic_write_bytes(
                self.state_dir / RECORD_FILE,
                json.dumps(document, indent=1).encode(),
                mode=0o600,
            )
        except OSError as exc:  # the marker still lets adopt() find them
            log.error("process record not written", extra={"error": str(exc)})

    def _read_records(self) -> list[_Record]:
        path = self.state_dir / RECORD_FILE
        try:
            document = json.loads(path.read_bytes())
            return [_record_from(item) for item in document["processes"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as exc:
            log.error("process record unreadable; relying on markers", extra={"error": str(exc)})
            return []

    def _marked_leaders(self) -> list[tuple[int, str]]:
        """Live session leaders that carry this agent's marker, oldest first."""
        found: list[tuple[int, int, str]] = []
        for pid in _pids():
            stat = _read_stat(pid)
            if stat is None or stat.state == "Z" or stat.session != pid:
                continue
            instance = _instance_of(pid, self.tag)
            if instance is not None:
                found.append((stat.start_ticks, pid, instance))
        return [(pid, instance) for _, pid, instance in sorted(found)]


# -------------------------------------------------------------------- records


@dataclass(frozen=True)
class _Record:
    instance: str
    pid: int
    start_ticks: int
    started_at: float
    launch: Launch | None
    workload: str
    cgroup: Path | None


def _record_json(running: Running) -> dict[str, Any]:
    launch = running.launch
    return {
        "workload": running.workload,
        "instance": running.instance,
        "pid": running.pid,
        "start_ticks": running.start_ticks,
        "started_at": running.started_at,
        "cgroup": str(running.cgroup) if running.cgroup else None,
        "launch": None
        if launch is None
        else {
            "argv": list(launch.argv),
            "cwd": str(launch.cwd),
            "env": dict(launch.env),
            "limits": {
                "memory_bytes": launch.limits.memory_bytes,
                "cpu_seconds": launch.limits.cpu_seconds,
                "open_files": launch.limits.open_files,
                "cgroup_memory_max": launch.limits.cgroup_memory_max,
                "cgroup_cpu_max": launch.limits.cgroup_cpu_max,
            },
            "log_max_bytes": launch.log_max_bytes,
            "log_keep": launch.log_keep,
            "stop_signal": int(launch.stop_signal),
            "stop_grace_s": launch.stop_grace_s,
        },
    }


def _record_from(item: dict[str, Any]) -> _Record:
    raw = item.get("launch")
    launch = None
    if raw is not None:
        launch = Launch(
            workload=item["workload"],
            instance=item["instance"],
            argv=tuple(raw["argv"]),
            cwd=Path(raw["cwd"]),
            env=dict(raw["env"]),
            limits=Limits(**raw["limits"]),
            log_max_bytes=raw["log_max_bytes"],
            log_keep=raw["log_keep"],
            stop_signal=raw["stop_signal"],
            stop_grace_s=raw["stop_grace_s"],
        )
    return _Record(
        instance=item["instance"],
        pid=int(item["pid"]),
        start_ticks=int(item["start_ticks"]),
        started_at=float(item["started_at"]),
        launch=launch,
        workload=item["workload"],
        cgroup=Path(item["cgroup"]) if item.get("cgroup") else None,
    )


def _adopted(record: _Record, launch: Launch | None, started_at: float) -> Running:
    return Running(
        workload=record.workload,
        instance=record.instance,
        pid=record.pid,
        start_ticks=record.start_ticks,
        started_at=started_at,
        adopted=True,
        launch=launch,
        cgroup=record.cgroup,
    )


def _with_cgroup(running: Running, group: Path) -> Running:
    return Running(
        workload=running.workload,
        instance=running.instance,
        pid=running.pid,
        start_ticks=running.start_ticks,
        started_at=running.started_at,
        adopted=running.adopted,
        launch=running.launch,
        cgroup=group,
    )


# -------------------------------------------------------------------- helpers


def _default_tag(state_dir: Path) -> str:
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]


def _resolve(launch: Launch) -> list[str]:
    """The command with its program checked (and searched on the launch's PATH)."""
    if not launch.cwd.is_dir():
        raise SpawnError(f"working directory {launch.cwd} does not exist")
    program = launch.argv[0]
    if "/" in program:
        path = Path(program) if os.path.isabs(program) else launch.cwd / program
        _check_program(path)
        return [str(path), *launch.argv[1:]]
    search = launch.env.get("PATH", os.defpath)
    for directory in search.split(os.pathsep):
        candidate = Path(directory or ".") / program
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate), *launch.argv[1:]]
    raise SpawnError(f"{program}: no such command on PATH {search}")


def _check_program(path: Path) -> None:
    if not path.exists():
        raise SpawnError(f"{path}: no such file")
    if not path.is_file():
        raise SpawnError(f"{path}: not a regular file")
    if not os.access(path, os.X_OK):
        raise SpawnError(f"{path}: not executable")


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _reap_if_child(pid: int) -> int | None:
    """Reap ``pid`` if it is our exited child: its return code (negative: signal), else None."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if reaped == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _read_stat(pid: int) -> _Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # comm may hold spaces and parentheses
    return _Stat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        start_ticks=int(fields[19]),
    )


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _children_of_self() -> set[int]:
    children: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            children.update(
                int(pid) for pid in Path(f"/proc/self/task/{task}/children").read_text().split()
            )
    return children


def _instance_of(pid: int, tag: str) -> str | None:
    """The instance named by ``pid``'s marker if it is this agent's, else None."""
    return _environ_name(pid, f"{MARKER}={tag}:")


def _workload_of(pid: int) -> str | None:
    return _environ_name(pid, f"{WORKLOAD_MARKER}=")


def _environ_name(pid: int, prefix: str) -> str | None:
    """The name after ``prefix`` in ``pid``'s environment, if there and well formed."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    marker = prefix.encode()
    for item in environ.split(b"\0"):
        if item.startswith(marker):
            name = item[len(marker) :].decode(errors="replace")
            return name if NAME.fullmatch(name) else None
    return None


def _started_at(start_ticks: int) -> float:
    """Wall-clock start of a process from its start ticks and the boot time."""
    boot = 0.0
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                boot = float(line.split()[1])
                break
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def _become_subreaper() -> tuple[bool, str]:
    """Make this process a child subreaper; returns (done, why not)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return False, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}"
    except (OSError, AttributeError) as exc:
        return False, f"prctl unavailable: {exc}"
    return True, ""


__all__ = [
    "Exited",
    "Launch",
    "ProcessTable",
    "Running",
    "SpawnError",
]
