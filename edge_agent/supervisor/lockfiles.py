"""Update lock files on disk: the workloads' file API, the gate a switch asks, the watcher.

Rules (the decisions are :mod:`edge_agent.supervisor.locks`'s; this is the I/O):
- The lock directory is ``<data dir>/locks`` (:func:`lock_dir`); the runtime
  gives every workload its path as ``DRIFTLESS_LOCK_DIR``
  (:data:`LOCK_DIR_ENV`). A lock is ``<workload>.lock`` in it, replaced by
  rename, so a reader sees the old file or the new, never half of one.
- Only regular files are read (no symlink followed, no FIFO opened, which
  could block the agent), and at most one byte past the size limit.
- :class:`FileLockGate` remembers, per workload, which version of its file
  (inode, mtime, size) it saw first and when on the monotonic clock: a new
  version (rewritten or touched) is a renewal, and the lease is measured on
  both clocks (the rules of :mod:`edge_agent.supervisor.locks`).
- The gate is thread-safe: the runtime's switch and the watcher both ask it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.supervisor.locks import (
    DEFAULT_MAX_LEASE_S,
    LOCK_SUFFIX,
    MAX_LOCK_FILE_BYTES,
    WORKLOAD_NAME,
    Lease,
    LockFileError,
    LockOverride,
    LockRequest,
    blocking,
    encode_lock,
    lease_end,
    parse_lock,
    workload_of,
)
from firmware_bundles import atomic
from protocols import LockStatus

log = logging.getLogger("driftless.agent.locks")
LOCK_DIR_ENV = "DRIFTLESS_LOCK_DIR"
"""The environment variable that tells a workload where its lock goes."""


@dataclass(frozen=True)
class LockSettings:
    """The agent's lock limits: the cap on any lease, how often the watcher looks (the
    report of who holds what), how often a blocked switch asks again at most."""

    max_lease_s: float = DEFAULT_MAX_LEASE_S
    watch_interval_s: float = 5.0
    recheck_s: float = 5.0

    def __post_init__(self) -> None:
        if not (self.max_lease_s > 0 and self.watch_interval_s > 0 and self.recheck_s > 0):
            raise ValueError("max_lease_s, watch_interval_s and recheck_s must be positive")


class LockConflict(Exception):
    """The lock is held by someone else (take, renew) or not held at all (renew)."""


def lock_dir(data_dir: Path) -> Path:
    """The lock directory of an agent's data directory."""
    return data_dir / "locks"


@dataclass(frozen=True)
class LockFile:
    """One lock file as read: its request, its mtime (wall clock) and its version key."""

    workload: str
    request: LockRequest
    written_at: float
    version: tuple[int, int, int]


def _check_workload(workload: str) -> None:
    if not WORKLOAD_NAME.fullmatch(workload):
        raise ValueError(f"workload must match {WORKLOAD_NAME.pattern}, got {workload!r}")


def read_lock(directory: Path, workload: str) -> LockFile | None:
    """The lock of ``workload``, None when there is none; raises LockFileError for a
    file that is not a lock (``not_a_file`` included), OSError if unreadable."""
    path = directory / f"{workload}{LOCK_SUFFIX}"
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise LockFileError("not_a_file", f"{path.name} is not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None  # released meanwhile
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockFileError("not_a_file", f"{path.name} is a symbolic link") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        opened = os.fstat(handle.fileno())
        data = handle.read(MAX_LOCK_FILE_BYTES + 1)
    version = (opened.st_ino, opened.st_mtime_ns, opened.st_size)
    return LockFile(workload, parse_lock(data), opened.st_mtime_ns / 1e9, version)


def scan(directory: Path) -> tuple[list[LockFile], dict[str, str]]:
    """Every lock in ``directory`` and, by file name, why each non-lock was ignored."""
    locks: list[LockFile] = []
    problems: dict[str, str] = {}
    try:
        names = sorted(entry.name for entry in os.scandir(directory))
    except FileNotFoundError:
        return locks, problems
    for name in names:
        workload = workload_of(name)
        if workload is None:
            continue
        try:
            found = read_lock(directory, workload)
        except LockFileError as exc:
            problems[name] = str(exc)
            continue
        except OSError as exc:
            problems[name] = f"unreadable: {exc}"
            continue
        if found is not None:
            locks.append(found)
    return locks, problems


def _held_by_other(found: LockFile | None, holder: str, now: float, max_lease_s: float) -> bool:
    if found is None or found.request.holder == holder:
        return False
    until = lease_end(
        found.request,
        written_at=found.written_at,
        seen_mono=0.0,
        now=now,
        now_mono=0.0,
        max_lease_s=max_lease_s,
    )
    return until > now


def take(
    directory: Path,
    workload: str,
    holder: str,
    lease_s: float,
    *,
    now: float,
    max_lease_s: float = DEFAULT_MAX_LEASE_S,
) -> None:
    """Take (or renew) ``workload``'s lock for ``holder``; raises LockConflict while
    another holder's lease runs, ValueError for a bad name, holder or lease, OSError.

    A file that is not a lock, or an expired lease, is replaced. Advisory between
    workloads (read, then rename): the lock is a request to the agent, not a mutex.
    """
    _check_workload(workload)
    request = parse_lock(encode_lock(LockRequest(holder, lease_s)))  # same rules as a reader
    try:
        found = read_lock(directory, workload)
    except LockFileError:
        found = None
    if _held_by_other(found, holder, now, max_lease_s):
        assert found is not None
        raise LockConflict(f"{workload}: held by {found.request.holder}")
    directory.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write_bytes(directory / f"{workload}{LOCK_SUFFIX}", encode_lock(request))


def renew(
    directory: Path,
    workload: str,
    holder: str,
    lease_s: float,
    *,
    now: float,
    max_lease_s: float = DEFAULT_MAX_LEASE_S,
) -> None:
    """Renew ``holder``'s lock: a fresh lease from now. Raises LockConflict when the
    lock is absent, expired or someone else's (take it instead), ValueError, OSError."""
    _check_workload(workload)
    try:
        found = read_lock(directory, workload)
    except LockFileError as exc:
        raise LockConflict(f"{workload}: {exc}") from None
    if found is None or found.request.holder != holder:
        owner = "nobody" if found is None else found.request.holder
        raise LockConflict(f"{workload}: not held by {holder} (held by {owner})")
    until = lease_end(
        found.request,
        written_at=found.written_at,
        seen_mono=0.0,
        now=now,
        now_mono=0.0,
        max_lease_s=max_lease_s,
    )
    if until <= now:
        raise LockConflict(f"{workload}: the lease of {holder} has expired; take it again")
    take(directory, workload, holder, lease_s, now=now, max_lease_s=max_lease_s)


def release(directory: Path, workload: str, holder: str) -> bool:
    """Remove ``holder``'s lock; False when there was none. Raises LockConflict when
    another holder has it, ValueError, OSError. A file that is not a lock is removed."""
    _check_workload(workload)
    try:
        found = read_lock(directory, workload)
    except LockFileError:
        found = None
    else:
        if found is None:
            return False
        if found.request.holder != holder:
            raise LockConflict(f"{workload}: held by {found.request.holder}, not {holder}")
    with contextlib.suppress(FileNotFoundError):
        (directory / f"{workload}{LOCK_SUFFIX}").unlink()
        return True
    return False


class FileLockGate:
    """The lock gate the runtime asks before a switch (its ``LockGate`` protocol).

    ``monotonic`` is the clock leases are also measured on (see the module rules).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_lease_s: float = DEFAULT_MAX_LEASE_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not max_lease_s > 0:
            raise ValueError(f"max_lease_s must be positive, got {max_lease_s!r}")
        self.directory = directory
        self.max_lease_s = max_lease_s
        self._monotonic = monotonic
        self._seen: dict[str, tuple[tuple[int, int, int], float]] = {}
        self._override: LockOverride | None = None
        self._problems: dict[str, str] = {}
        self._mutex = threading.Lock()

    def set_override(self, override: LockOverride | None) -> None:
        """Honour ``override`` (from a verified desired document) from now on."""
        with self._mutex:
            self._override = override

    @property
    def problems(self) -> dict[str, str]:
        """Files the last look ignored, with the reason (a copy)."""
        with self._mutex:
            return dict(self._problems)

    def leases(self, now: float) -> list[Lease]:
        """Every lock on disk judged at ``now`` (expired ones included, ``until <= now``)."""
        found, problems = scan(self.directory)
        now_mono = self._monotonic()
        leases: list[Lease] = []
        with self._mutex:
            for name in problems.keys() - self._problems.keys():
                log.warning("lock file ignored", extra={"file": name, "why": problems[name]})
            self._problems = problems
            seen: dict[str, tuple[tuple[int, int, int], float]] = {}
            for lock in found:
                version, first = self._seen.get(lock.workload, (None, now_mono))
                if version != lock.version:
                    first = now_mono  # a new version of the file: a renewal
                seen[lock.workload] = (lock.version, first)
                until = lease_end(
                    lock.request,
                    written_at=lock.written_at,
                    seen_mono=first,
                    now=now,
                    now_mono=now_mono,
                    max_lease_s=self.max_lease_s,
                )
                leases.append(Lease(lock.workload, lock.request.holder, until))
            self._seen = seen
        return leases

    def blocking(self, workload: str, now: float) -> str | None:
        """ "held by X until T" while ``workload``'s lock blocks a switch, None when free."""
        leases = self.leases(now)
        with self._mutex:
            override = self._override
        lease = blocking(leases, workload, now, override)
        return None if lease is None else lease.describe()

    def blocking_lease(self, workload: str, now: float) -> Lease | None:
        """The lease that blocks ``workload`` now (for :func:`locks.switch_wait_s`)."""
        leases = self.leases(now)
        with self._mutex:
            override = self._override
        return blocking(leases, workload, now, override)

    def statuses(self, now: float) -> list[LockStatus]:
        """The locks whose lease runs at ``now``, as the device reports them."""
        with self._mutex:
            override = self._override
        return [
            LockStatus(
                workload=lease.workload,
                holder=lease.holder,
                until=round(lease.until, 3),
                overridden=override is not None and override.lifts(lease.workload, now),
            )
            for lease in self.leases(now)
            if lease.until > now
        ]


def same_locks(a: list[LockStatus], b: list[LockStatus], *, tolerance_s: float = 1.0) -> bool:
    """Pure: the same holders, workloads and overrides, and ends within ``tolerance_s``
    (a lease is measured on two clocks whose readings jitter by microseconds)."""
    return len(a) == len(b) and all(
        (x.workload, x.holder, x.overridden) == (y.workload, y.holder, y.overridden)
        and abs(x.until - y.until) <= tolerance_s
        for x, y in zip(a, b, strict=True)
    )


class LockWatcher:
    """Looks at the locks every ``interval_s`` and calls ``on_change`` with the list
    whenever who holds what (or until when, or overridden) changed; a thread."""

    def __init__(
        self,
        gate: FileLockGate,
        on_change: Callable[[list[LockStatus]], None],
        *,
        clock: Callable[[], float] = time.time,
        interval_s: float = 5.0,
    ) -> None:
        self.gate = gate
        self.on_change = on_change
        self.clock = clock
        self.interval_s = interval_s
        self._stop = threading.Event()
        # Nothing held is what a hub assumes of a device: the first look reports only if a
        # lock is held, so an agent's start does not send a report of nothing. A lock released
        # while the agent was down stays on the hub's view until its ``until`` passes.
        self._last: list[LockStatus] = []
        self._thread: threading.Thread | None = None

    def look(self) -> None:
        """One look (the thread's loop body); calls ``on_change`` if anything changed."""
        statuses = self.gate.statuses(self.clock())
        if not same_locks(statuses, self._last):
            self._last = statuses
            self.on_change(statuses)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.look()
            except Exception:  # a lock problem must never take the agent down
                log.exception("lock watch failed")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="locks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
