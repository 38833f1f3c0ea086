"""Update locks with leases: what a lock file says, when its lease ends, whether it blocks.

A workload that must not be stopped right now (a backup half written, a
motor moving) takes its update lock: a JSON file ``<lock dir>/<workload>.lock``
holding ``{"holder": "...", "lease_s": N}``, written by rename
(:mod:`edge_agent.supervisor.lockfiles` has the I/O; ``docs/runtime.md``,
"Update locks", the file API). A switch of that workload waits while the lock
blocks; downloads and installs never look at it.

Rules:
- A lease runs from when the file was last written or touched, measured on two
  clocks, and ends at the EARLIER of the two: the file's mtime on the wall
  clock (so a lock file left behind by a holder that died, found by an agent
  that restarted, has already expired), and the moment this agent first saw
  that version of the file on its monotonic clock (so a wall clock stepped
  back, or an mtime in the future, cannot stretch a lease). A wall clock
  stepped forward ends leases early: a lock fails open, never blocks forever.
- Every lease is capped at ``max_lease_s`` (the agent's setting, 1 h by
  default): no lock survives its lease, whatever the file asks for.
- A file that is not a lock (not JSON, larger than :data:`MAX_LOCK_FILE_BYTES`,
  a missing or wrong field, a name that is no workload's) is ignored with a
  reason: a broken file never blocks.
- A signed override from the hub (``config["lock_override"]`` of a verified
  desired document) lifts the locks of the workloads it names, or of all,
  until its ``until`` (the hub's wall clock, unix seconds).
- Pure: no I/O, no clock; times are inputs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_LOCK_FILE_BYTES = 4096
"""Largest lock file read; a larger one is ignored (``oversized``)."""
DEFAULT_MAX_LEASE_S = 3600.0
"""The default cap on any lease (the agent's ``max_lease_s``)."""
LOCK_SUFFIX = ".lock"
LOCK_OVERRIDE_KEY = "lock_override"
"""The member of a desired config that carries the hub's override."""
WORKLOAD_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HOLDER = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,63}$")  # printable ASCII, 1-64, no lead space
MIN_WAIT_S = 0.05
"""Shortest wait :func:`switch_wait_s` returns, so a caller never spins."""


class LockFileError(ValueError):
    """A lock file that is not a lock; ``reason`` is a stable key, the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class LockOverrideError(ValueError):
    """A ``lock_override`` member that cannot be honoured as written."""


@dataclass(frozen=True)
class LockRequest:
    """What a lock file asks for: who holds it and for how long (seconds)."""

    holder: str
    lease_s: float


@dataclass(frozen=True)
class Lease:
    """A lock as the agent judges it now: ``until`` is the wall time its lease ends."""

    workload: str
    holder: str
    until: float

    def describe(self) -> str:
        return f"held by {self.holder} until {self.until:.0f}"


@dataclass(frozen=True)
class LockOverride:
    """The hub's override: locks of ``workloads`` (None: every workload) are ignored
    before ``until``."""

    until: float
    workloads: frozenset[str] | None = None

    def lifts(self, workload: str, now: float) -> bool:
        """Pure: whether this override lifts ``workload``'s lock at ``now``."""
        return now < self.until and (self.workloads is None or workload in self.workloads)


def workload_of(file_name: str) -> str | None:
    """Pure: the workload a lock file's name is for, or None if it is not a lock's name
    (temporary files start with a dot and never match)."""
    if not file_name.endswith(LOCK_SUFFIX):
        return None
    name = file_name[: -len(LOCK_SUFFIX)]
    return name if WORKLOAD_NAME.fullmatch(name) else None


def encode_lock(request: LockRequest) -> bytes:
    """Pure: the bytes of a lock file (what ``driftless agent lock take`` writes)."""
    return json.dumps({"holder": request.holder, "lease_s": request.lease_s}).encode() + b"\n"


def parse_lock(data: bytes) -> LockRequest:
    """Pure: a lock file's content; raises LockFileError (``oversized``, ``not_json``,
    ``not_an_object``, ``bad_holder``, ``bad_lease``)."""
    if len(data) > MAX_LOCK_FILE_BYTES:
        raise LockFileError("oversized", f"more than {MAX_LOCK_FILE_BYTES} bytes")
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LockFileError("not_json", str(exc)) from None
    if not isinstance(value, dict):
        raise LockFileError("not_an_object", f"a JSON {type(value).__name__}, not an object")
    holder = value.get("holder")
    if not isinstance(holder, str) or not _HOLDER.fullmatch(holder):
        raise LockFileError("bad_holder", f"holder must be 1-64 printable ASCII, got {holder!r}")
    return LockRequest(holder, _lease(value.get("lease_s")))


def _lease(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LockFileError("bad_lease", f"lease_s must be a number, got {value!r}")
    lease = float(value)
    if not math.isfinite(lease) or lease <= 0:
        raise LockFileError("bad_lease", f"lease_s must be a positive number, got {value!r}")
    return lease


def lease_end(
    request: LockRequest,
    *,
    written_at: float,
    seen_mono: float,
    now: float,
    now_mono: float,
    max_lease_s: float,
) -> float:
    """Pure: the wall time a lease ends (see the rules): ``written_at`` is the file's
    mtime (wall clock), ``seen_mono`` when this agent first saw this version of it
    (monotonic clock); ``now`` and ``now_mono`` are the two clocks' readings now."""
    lease_s = min(request.lease_s, max_lease_s)
    by_wall = written_at + lease_s - now
    by_mono = seen_mono + lease_s - now_mono
    return now + min(by_wall, by_mono)


def blocking(
    leases: Iterable[Lease], workload: str, now: float, override: LockOverride | None
) -> Lease | None:
    """Pure: the lease that blocks ``workload``'s switch at ``now``, or None when free
    (no lock, an expired lease, or lifted by ``override``)."""
    if override is not None and override.lifts(workload, now):
        return None
    for lease in leases:
        if lease.workload == workload and lease.until > now:
            return lease
    return None


def switch_wait_s(lease: Lease, now: float, recheck_s: float) -> float:
    """Pure: how long a switch blocked by ``lease`` waits before asking the gate again:
    until the lease ends or ``recheck_s`` (a renewal, release or override may come
    first), whichever is sooner; at least :data:`MIN_WAIT_S`."""
    return max(MIN_WAIT_S, min(lease.until - now, recheck_s))


def parse_override(config: Mapping[str, object]) -> LockOverride | None:
    """Pure: the override in a desired config, None when it has none; raises
    LockOverrideError for one that is malformed.

    Form: ``{"until": <unix seconds>, "workloads": [names] | null}``; a missing
    or null ``workloads`` lifts every workload's lock.
    """
    value = config.get(LOCK_OVERRIDE_KEY)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise LockOverrideError(f"{LOCK_OVERRIDE_KEY} must be an object, got {value!r}")
    until = value.get("until")
    if isinstance(until, bool) or not isinstance(until, int | float) or not math.isfinite(until):
        raise LockOverrideError(f"{LOCK_OVERRIDE_KEY}.until must be unix seconds, got {until!r}")
    names = value.get("workloads")
    if names is None:
        return LockOverride(float(until))
    if not isinstance(names, list) or not all(
        isinstance(n, str) and WORKLOAD_NAME.fullmatch(n) for n in names
    ):
        raise LockOverrideError(
            f"{LOCK_OVERRIDE_KEY}.workloads must be a list of workload names or null"
        )
    return LockOverride(float(until), frozenset(names))
