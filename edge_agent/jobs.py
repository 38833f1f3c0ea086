"""One-shot jobs on the device: what a document asks, which to start, what to report.

A job is a command the hub wants run once on the device (architecture rule 6:
commands are not state), carried in the signed desired document's
``config["jobs"]``: ``[{"id": "...", "command": ["argv0", ...], "deadline_s": N,
"env": {...}, "idempotent": false, "expires_at": T}]`` (``expires_at`` optional).
:mod:`edge_agent.job_runner` runs them.

Rules:
- A job id runs at most once per device: the table of ids seen
  (``<data>/jobs.json``) is consulted before a start and written before the
  process is spawned. The table keeps the newest :data:`MAX_REMEMBERED_JOBS`
  ids (the oldest finished ones are forgotten first); a document should not
  carry ids older than that.
- A job that was running when the agent died is not known to have finished:
  it is reported ``failed`` ("agent restarted") unless it declared itself
  ``idempotent``, in which case it runs again from the start.
- A job never seen whose ``expires_at`` (epoch seconds, optional) has passed is
  refused, never run: reported ``failed`` with the message :data:`EXPIRED` (and
  remembered like any other id). The hub stops handing a job out at its expiry;
  this covers a device that gets the document late (it was offline). A job that
  already started is not affected (expiry is about starting).
- A job that outlives its ``deadline_s`` is ended (its whole process group)
  and reported ``timed_out``.
- Progress is a stdout line ``DRIFTLESS_PROGRESS <0-100> [message]``; any
  other line, or a malformed one, is only output. Progress is reported when
  it changes, at most once per ``progress_interval_s`` (and always at 100).
- An entry that is not a valid job but names a usable id is reported
  ``failed`` with the reason once (the id is remembered like any other);
  one without a usable id is ignored with the reason.
- Pure: no I/O, no clock; times are inputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from protocols.messages import JOBS_KEY, MAX_JOB_LOG_TAIL, JobState, JobStatus

MAX_REMEMBERED_JOBS = 256
MAX_JOBS_PER_DOCUMENT = 64
MAX_JOB_DEADLINE_S = 7 * 24 * 3600.0
MAX_COMMAND_ARGS = 256
MAX_ARG_CHARS = 4096
MAX_ENV_ENTRIES = 64
JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PROGRESS_PREFIX = "DRIFTLESS_PROGRESS"
_PROGRESS = re.compile(r"^DRIFTLESS_PROGRESS[ \t]+(\d{1,3})(?:[ \t]+(.*))?$")
AGENT_RESTARTED = "agent restarted while the job ran"
EXPIRED = "expired"
"""The message of a job refused because its ``expires_at`` passed before it started."""
Finished = Literal["succeeded", "failed", "timed_out"]


class JobSpecError(ValueError):
    """A ``jobs`` entry that cannot be run as written."""


@dataclass(frozen=True)
class JobSpec:
    """One job as the document asks for it."""

    id: str
    command: tuple[str, ...]
    deadline_s: float
    env: tuple[tuple[str, str], ...] = ()
    idempotent: bool = False
    expires_at: float | None = None


@dataclass(frozen=True)
class JobsInDocument:
    """The jobs of one document: valid ones, invalid ones with a usable id (reported
    ``failed``), and the reasons entries without a usable id were ignored."""

    specs: tuple[JobSpec, ...] = ()
    invalid: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()


def _spec(entry: Mapping[str, object], job_id: str) -> JobSpec:
    command = entry.get("command")
    if (
        not isinstance(command, list)
        or not 1 <= len(command) <= MAX_COMMAND_ARGS
        or not all(isinstance(a, str) and len(a) <= MAX_ARG_CHARS for a in command)
        or not command[0]
    ):
        raise JobSpecError(
            f"command must be a list of 1-{MAX_COMMAND_ARGS} strings, the first not empty"
        )
    deadline = entry.get("deadline_s")
    if (
        isinstance(deadline, bool)
        or not isinstance(deadline, int | float)
        or not math.isfinite(deadline)
        or not 0 < deadline <= MAX_JOB_DEADLINE_S
    ):
        raise JobSpecError(f"deadline_s must be a number in (0, {MAX_JOB_DEADLINE_S:g}]")
    env = entry.get("env", {})
    if (
        not isinstance(env, dict)
        or len(env) > MAX_ENV_ENTRIES
        or not all(
            isinstance(k, str) and ENV_NAME.fullmatch(k) and isinstance(v, str)
            for k, v in env.items()
        )
    ):
        raise JobSpecError(f"env must map at most {MAX_ENV_ENTRIES} variable names to strings")
    idempotent = entry.get("idempotent", False)
    if not isinstance(idempotent, bool):
        raise JobSpecError("idempotent must be true or false")
    expires_at = entry.get("expires_at")
    if expires_at is not None and (
        isinstance(expires_at, bool)
        or not isinstance(expires_at, int | float)
        or not math.isfinite(expires_at)
        or expires_at < 0
    ):
        raise JobSpecError("expires_at must be a number of epoch seconds")
    return JobSpec(
        job_id,
        tuple(command),
        float(deadline),
        tuple(sorted(env.items())),
        idempotent,
        None if expires_at is None else float(expires_at),
    )


def job_specs(config: Mapping[str, object]) -> JobsInDocument:
    """Pure: the jobs a desired config asks for (module rules); never raises."""
    entries = config.get(JOBS_KEY)
    if entries is None:
        return JobsInDocument()
    if not isinstance(entries, list):
        return JobsInDocument(ignored=(f"{JOBS_KEY} must be a list",))
    specs: list[JobSpec] = []
    invalid: list[tuple[str, str]] = []
    ignored: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        job_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            ignored.append(f"{JOBS_KEY}[{index}]: id must match {JOB_ID.pattern}")
            continue
        if job_id in seen:
            ignored.append(f"{JOBS_KEY}[{index}]: id {job_id!r} appears twice")
            continue
        seen.add(job_id)
        if index >= MAX_JOBS_PER_DOCUMENT:
            invalid.append((job_id, f"more than {MAX_JOBS_PER_DOCUMENT} jobs in one document"))
            continue
        assert isinstance(entry, dict)
        try:
            specs.append(_spec(entry, job_id))
        except JobSpecError as exc:
            invalid.append((job_id, f"invalid job: {exc}"))
    return JobsInDocument(tuple(specs), tuple(invalid), tuple(ignored))


# ---------------------------------------------------------------- the remembered table


@dataclass(frozen=True)
class JobRecord:
    """One job id the device has seen; ``order`` grows with every id remembered.

    While ``running``: ``pid`` and ``pid_start`` (the kernel's start time of that
    pid) name the process group to end if the agent finds it after a restart.
    """

    id: str
    order: int
    state: JobState
    spec: JobSpec | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    pid: int | None = None
    pid_start: int | None = None


@dataclass(frozen=True)
class JobTable:
    """Every id remembered, newest last, bounded."""

    records: tuple[JobRecord, ...] = ()
    next_order: int = 0

    def get(self, job_id: str) -> JobRecord | None:
        return next((r for r in self.records if r.id == job_id), None)

    def running(self) -> tuple[JobRecord, ...]:
        return tuple(r for r in self.records if r.state == "running")


def expired(spec: JobSpec, now: float) -> bool:
    """Pure: whether ``spec`` may no longer start at ``now`` (its ``expires_at`` passed)."""
    return spec.expires_at is not None and now >= spec.expires_at


def to_start(
    table: JobTable, document: JobsInDocument, now: float | None = None
) -> tuple[JobSpec, ...]:
    """Pure: the document's jobs never seen on this device, in document order; given
    ``now``, without those that expired (:func:`to_expire`)."""
    return tuple(
        spec
        for spec in document.specs
        if table.get(spec.id) is None and (now is None or not expired(spec, now))
    )


def to_expire(table: JobTable, document: JobsInDocument, now: float) -> tuple[JobSpec, ...]:
    """Pure: the document's jobs never seen on this device whose ``expires_at`` passed:
    refused with :data:`EXPIRED`, never run."""
    return tuple(
        spec for spec in document.specs if table.get(spec.id) is None and expired(spec, now)
    )


def to_refuse(table: JobTable, document: JobsInDocument) -> tuple[tuple[str, str], ...]:
    """Pure: the document's invalid jobs never seen on this device (reported once)."""
    return tuple((i, why) for i, why in document.invalid if table.get(i) is None)


def remember(table: JobTable, record: JobRecord, *, keep: int = MAX_REMEMBERED_JOBS) -> JobTable:
    """Pure: ``table`` with ``record`` added (a new id) or replaced (a known id, keeping
    its order); past ``keep`` ids the oldest finished ones are forgotten first."""
    known = table.get(record.id)
    if known is not None:
        records = tuple(replace(record, order=known.order) if r.id == record.id else r
                        for r in table.records)  # fmt: skip
        return replace(table, records=records)
    added = replace(record, order=table.next_order)
    records = (*table.records, added)
    while len(records) > keep:
        finished = [r for r in records if r.state != "running"]
        drop = finished[0] if finished else records[0]
        records = tuple(r for r in records if r is not drop)
    return JobTable(records, table.next_order + 1)


def after_restart(table: JobTable, now: float) -> tuple[JobTable, tuple[JobSpec, ...]]:
    """Pure: a table loaded at start: jobs that were running are ``failed`` (agent
    restarted), or forgotten and returned to run again when idempotent."""
    again: list[JobSpec] = []
    records: list[JobRecord] = []
    for record in table.records:
        if record.state != "running":
            records.append(record)
        elif record.spec is not None and record.spec.idempotent:
            again.append(record.spec)
        else:
            records.append(
                replace(record, state="failed", finished_at=now, pid=None, pid_start=None)
            )
    return replace(table, records=tuple(records)), tuple(again)


def outcome(returncode: int, *, timed_out: bool) -> tuple[Finished, str | None]:
    """Pure: a finished job's state and message from its exit (negative: the signal)."""
    if timed_out:
        return "timed_out", "deadline passed: the job's process group was ended"
    if returncode == 0:
        return "succeeded", None
    if returncode < 0:
        return "failed", f"ended by signal {-returncode}"
    return "failed", f"exited with code {returncode}"


def deadline_left_s(started_mono: float, deadline_s: float, now_mono: float) -> float:
    """Pure: seconds left before the deadline (≤ 0: it has passed)."""
    return started_mono + deadline_s - now_mono


# ---------------------------------------------------------------- output


def parse_progress(line: str) -> tuple[int, str | None] | None:
    """Pure: ``(percent, message)`` of a progress line, None for any other line (a
    percent above 100 or a malformed line is only output)."""
    match = _PROGRESS.fullmatch(line.rstrip("\r\n"))
    if match is None:
        return None
    percent = int(match.group(1))
    if percent > 100:
        return None
    message = (match.group(2) or "").strip()[:256]
    return percent, message or None


def tail(text: str, line: str, *, max_chars: int = MAX_JOB_LOG_TAIL) -> str:
    """Pure: ``text`` with ``line`` appended, cut to its last ``max_chars`` characters."""
    joined = text + line
    return joined[-max_chars:]


def progress_due(
    last: tuple[int, float] | None, percent: int, now: float, interval_s: float
) -> bool:
    """Pure: whether a progress of ``percent`` at ``now`` is reported, given the last one
    reported ``(percent, at)`` (module rules)."""
    if last is None:
        return True
    if percent == last[0]:
        return False
    return percent == 100 or now - last[1] >= interval_s


def status(record: JobRecord, **changes: object) -> JobStatus:
    """Pure: the report of ``record`` (with ``changes``: progress, message, log_tail)."""
    fields: dict[str, object] = {
        "id": record.id,
        "state": record.state,
        "exit_code": record.exit_code,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
    }
    fields.update(changes)
    return JobStatus(**fields)  # type: ignore[arg-type]


def refused(job_id: str, reason: str, order: int, now: float) -> tuple[JobRecord, JobStatus]:
    """Pure: the record and report of an invalid job (failed, never started)."""
    record = JobRecord(job_id, order, "failed", finished_at=now)
    return record, status(record, message=reason[:256])


def specs_from(records: Sequence[JobRecord]) -> tuple[JobSpec, ...]:
    """Pure: the specs of ``records`` that have one."""
    return tuple(r.spec for r in records if r.spec is not None)
