"""The jobs planner: what happens next to each one-shot job on each device (pure).

Input: the active jobs (their rows per device), what each device is (online, active)
and what it reported of each job (``device.jobs``: the agent's ``JobStatus``), and
``now``. Output: the rows and jobs that change, which devices' documents must
change, and when to look again. No I/O, no clock (``docs/jobs.md``).

Rules, per device row (``JobDevice``: queued, in_progress, succeeded, failed,
timed_out, canceled, expired; the last five are final):
- A queued row is **handed out** (``handed_out_at`` = now; it stays ``queued``
  until the device says it started) only while its job is ``running``, the device
  is online and active, :func:`admission` leaves a slot, the device has fewer than
  :data:`MAX_OPEN_PER_DEVICE` handed-out unfinished jobs, and no earlier job of
  that device (a smaller ``seq``) of a running job still waits for its hand-out:
  a device's jobs are handed out in ``seq`` order. A paused job blocks nobody.
- Never after ``expires_at``: a queued row not handed out by then is ``expired``;
  a handed-out row the device never reported started by then is ``expired`` too
  (the agent refuses to start it after that instant, reporting failed "expired",
  which is recorded as ``expired`` as well).
- The device's report moves a handed-out row: ``running`` -> ``in_progress``, a
  result -> ``succeeded`` / ``failed`` / ``timed_out`` with its exit code,
  message and log tail. A final row never changes again; a report of a job the
  hub never handed out to the device is ignored.
- ``in_progress`` past ``started_at + deadline_s + grace_s`` with no result is
  ``timed_out`` (the agent ends the job at its deadline; the grace covers the
  report's way and the clocks). ``started_at`` is the device's, kept between the
  hand-out and now, so a skewed device clock cannot move the deadline much.
- A row of a device that was decommissioned or deleted is ``canceled``; so is
  every queued row of an aborted job.
- A job (``Job.state``: running, paused, completed, aborted, canceled) is judged
  by :func:`admission` alone (the failure threshold, ``max_in_flight``, the rate),
  with the rollouts' own rules (``hub/controllers/rollout/policy.py``:
  ``FailureThreshold.crossed``, ``Rate``, ``rate_slots``); unlike a rollout, a job
  without a ``failure_threshold`` has none. Crossing the
  threshold aborts (queued rows canceled, the reason names the figures) or
  pauses (no more hand-outs). A running or paused job whose rows are all final
  is ``completed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from hub.controllers.rollout.policy import (
    FailureThreshold,
    Rate,
    parse_policy,
    rate_slots,
)

FINAL = frozenset({"succeeded", "failed", "timed_out", "canceled", "expired"})
OPEN = frozenset({"queued", "in_progress"})
JOB_STATES = ("running", "paused", "completed", "aborted", "canceled")
JOB_FINAL = frozenset({"completed", "aborted", "canceled"})
DEVICE_STATES = ("queued", "in_progress", "succeeded", "failed", "timed_out", "canceled", "expired")
MAX_OPEN_PER_DEVICE = 8
"""Handed-out, unfinished jobs one device's document carries at most."""
TIMEOUT_GRACE_S = 30.0
RATE_WINDOW_S = 60.0
EXPIRED = "expired"
"""The agent's message for a job it refused because its expiry passed."""


# ---------------------------------------------------------------- the policy


# The rate and the failure threshold are the rollouts' own (one definition of the
# rules: hub/controllers/rollout/policy.py); a job's threshold is absent unless given.
Threshold = FailureThreshold


@dataclass(frozen=True, slots=True)
class Policy:
    """A job's ``rollout`` member; all absent: every device at once, no threshold."""

    max_in_flight: int | None = None
    rate: Rate | None = None
    failure_threshold: Threshold | None = None


def policy_from_json(raw: Mapping[str, Any] | None) -> Policy:
    """Pure: the stored ``rollout`` member as a :class:`Policy`, read by the rollouts'
    own parser (the same fields mean the same); raises the rollouts' PolicyError. A job without a
    ``failure_threshold`` has none."""
    if not raw:
        return Policy()
    given = {k: raw[k] for k in _POLICY_KEYS if raw.get(k) is not None}
    parsed = parse_policy(given)
    threshold = parsed.failure_threshold if "failure_threshold" in given else None
    return Policy(parsed.max_in_flight, parsed.rate, threshold)


_POLICY_KEYS = ("max_in_flight", "rate", "failure_threshold")


# ---------------------------------------------------------------- the seam: admission


@dataclass(frozen=True, slots=True)
class Tally:
    """What :func:`admission` judges a job by."""

    targeted: int
    succeeded: int
    failed: int  # failed + timed_out
    in_flight: int  # handed out, no outcome yet, on an online device
    handed_out_at: tuple[float, ...]  # every hand-out so far


@dataclass(frozen=True, slots=True)
class Admission:
    """``slots``: how many more devices may be handed the job now (None: no limit);
    ``stop``: the threshold's action when it is crossed, with ``note`` saying why;
    ``wake_after_s``: when a rate slot frees."""

    slots: int | None
    stop: Literal["abort", "pause"] | None = None
    note: str = ""
    wake_after_s: float | None = None


def crossed(threshold: Threshold, *, reported: int, failed: int) -> str | None:
    """Pure: why ``threshold`` is crossed (the rollouts' rule), or None."""
    if failed == 0 or not threshold.crossed(failed, reported):
        return None
    return (
        f"failure threshold {threshold.describe()} crossed: {failed} of {reported} reported failed"
    )


def admission(policy: Policy, tally: Tally, now: float) -> Admission:
    """Pure: the one decision about a job as a whole (the seam the shared rollout gate
    of ``hub/controllers/rollout/plan.py`` can replace): is the failure threshold
    crossed, and how many more devices may get the job now (``max_in_flight``, the
    rate over the last minute with its growth)?"""
    if policy.failure_threshold is not None:
        reported = tally.succeeded + tally.failed
        why = crossed(policy.failure_threshold, reported=reported, failed=tally.failed)
        if why is not None:
            return Admission(0, policy.failure_threshold.action, why)
    slots: int | None = None
    wake: float | None = None
    if policy.max_in_flight is not None:
        slots = max(0, policy.max_in_flight - tally.in_flight)
    if policy.rate is not None:
        free, frees_at = rate_slots(
            policy.rate, succeeded=tally.succeeded, handed_out_at=tally.handed_out_at, now=now
        )
        left = max(0, int(free))
        slots = left if slots is None else min(slots, left)
        if left == 0 and frees_at is not None:
            wake = max(0.0, frees_at - now)
    return Admission(slots, wake_after_s=wake)


# ---------------------------------------------------------------- the step


@dataclass(frozen=True, slots=True)
class Report:
    """What the device last reported of one job (``protocols.JobStatus``)."""

    state: str  # running | succeeded | failed | timed_out
    exit_code: int | None = None
    message: str | None = None
    log_tail: str | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class Device:
    """One device as the planner sees it."""

    online: bool
    active: bool  # registered and not decommissioned
    reports: Mapping[str, Report] = field(default_factory=dict)  # by job id


@dataclass(frozen=True, slots=True)
class Target:
    """One ``job_device`` row (times in epoch seconds)."""

    device_id: str
    seq: int
    state: str
    handed_out_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    message: str | None = None
    log_tail: str | None = None


@dataclass(frozen=True, slots=True)
class JobIn:
    """One job and all its rows."""

    id: str
    state: str
    deadline_s: float
    expires_at: float
    policy: Policy
    targets: tuple[Target, ...]
    reason: str = ""


@dataclass(frozen=True, slots=True)
class JobChange:
    """A job whose state changes (``finished``: its ``finished_at`` is set to now)."""

    id: str
    before: str
    state: str
    reason: str
    finished: bool


@dataclass(frozen=True, slots=True)
class Step:
    """What one look decided."""

    targets: tuple[tuple[str, Target, Target], ...]  # (job id, before, after)
    jobs: tuple[JobChange, ...]
    documents: tuple[str, ...]  # devices whose job entries change (sorted)
    wake_after_s: float | None
    notes: tuple[str, ...] = ()


def _final(t: Target, state: str, now: float, message: str | None, **more: Any) -> Target:
    finished_at = more.pop("finished_at", now)
    return replace(t, state=state, finished_at=finished_at, message=message, **more)


def _from_report(t: Target, r: Report, now: float) -> Target:
    """A handed-out row moved by the device's report (module rules)."""
    assert t.handed_out_at is not None
    start = t.started_at
    if start is None and r.started_at is not None:
        start = min(max(r.started_at, t.handed_out_at), now)
    if r.state == "running":
        if t.state == "in_progress":
            return t
        return replace(t, state="in_progress", started_at=start if start is not None else now)
    if r.state == "failed" and r.message == EXPIRED and r.started_at is None:
        return _final(t, "expired", now, "expired before it started (the device refused it)")
    if r.state not in ("succeeded", "failed", "timed_out"):
        return t
    finished = now if r.finished_at is None else min(max(r.finished_at, t.handed_out_at), now)
    return _final(
        t,
        r.state,
        now,
        r.message,
        finished_at=finished,
        started_at=start,
        exit_code=r.exit_code,
        log_tail=r.log_tail,
    )


def _advance(t: Target, job: JobIn, device: Device | None, now: float, grace_s: float) -> Target:
    """Pure: one row moved by reports, deadlines, expiry and the device's going away."""
    if t.state in FINAL:
        return t
    if device is None or not device.active:
        return _final(t, "canceled", now, "the device was decommissioned or deleted")
    report = device.reports.get(job.id)
    if t.handed_out_at is not None and report is not None:
        t = _from_report(t, report, now)
        if t.state in FINAL:
            return t
    if t.state == "in_progress":
        start = t.started_at if t.started_at is not None else t.handed_out_at or now
        if now >= start + job.deadline_s + grace_s:
            return _final(t, "timed_out", now, f"no result within deadline_s + {grace_s:g} s (hub)")
        return t
    if now >= job.expires_at:
        why = "never started before" if t.handed_out_at is not None else "not handed out before"
        return _final(t, "expired", now, f"{why} expires_at")
    if job.state in ("aborted", "canceled"):
        return _final(t, "canceled", now, f"job {job.state}")
    return t


def step(
    jobs: Sequence[JobIn],
    devices: Mapping[str, Device],
    now: float,
    *,
    grace_s: float = TIMEOUT_GRACE_S,
    max_open_per_device: int = MAX_OPEN_PER_DEVICE,
) -> Step:
    """Pure: one look at every active job (module rules). ``jobs`` in any order: they
    are judged by their rows' ``seq`` (a job's rows share one), oldest first."""
    ordered = sorted(jobs, key=lambda j: (min((t.seq for t in j.targets), default=0), j.id))
    changed: list[tuple[str, Target, Target]] = []
    job_changes: list[JobChange] = []
    documents: set[str] = set()
    notes: list[str] = []
    wakes: list[float] = []
    # Pass 1: reports, deadlines, expiry; and how many open (handed-out, unfinished)
    # jobs each device has, and the smallest seq each device still waits to be given.
    advanced: dict[str, list[Target]] = {}
    open_count: dict[str, int] = {}
    for job in ordered:
        rows = [_advance(t, job, devices.get(t.device_id), now, grace_s) for t in job.targets]
        advanced[job.id] = rows
        for row in rows:
            if row.state in OPEN and row.handed_out_at is not None:
                open_count[row.device_id] = open_count.get(row.device_id, 0) + 1
    blocked: set[str] = set()  # devices an earlier running job still has to hand out to
    for job in ordered:
        judged = _judge(
            job, advanced[job.id], devices, now, blocked, open_count, max_open_per_device
        )
        rows = judged.rows
        for before, after in zip(job.targets, rows, strict=True):
            if after != before:
                changed.append((job.id, before, after))
                if _entry_changes(before, after):
                    documents.add(after.device_id)
        if judged.state != job.state:
            job_changes.append(
                JobChange(job.id, job.state, judged.state, judged.reason[:512], judged.finished)
            )
        if judged.note:
            notes.append(judged.note)
        if judged.wake_after_s is not None:
            wakes.append(judged.wake_after_s)
        wakes += _deadlines(rows, job, now, grace_s)
    return Step(
        tuple(changed),
        tuple(job_changes),
        tuple(sorted(documents)),
        min(wakes) if wakes else None,
        tuple(notes),
    )


@dataclass(frozen=True, slots=True)
class _Judged:
    rows: list[Target]
    state: str
    reason: str
    finished: bool
    note: str = ""
    wake_after_s: float | None = None


def _judge(
    job: JobIn,
    rows: list[Target],
    devices: Mapping[str, Device],
    now: float,
    blocked: set[str],
    open_count: dict[str, int],
    max_open: int,
) -> _Judged:
    """Pure: one job after :func:`admission`: aborted, paused, or its hand-outs; and
    completed once every row is final."""
    if job.state not in ("running", "paused"):
        return _Judged(rows, job.state, job.reason, False)
    state, reason, note, wake = job.state, job.reason, "", None
    gate = admission(job.policy, _tally(rows, devices), now)
    if gate.stop is not None and state == "running":
        state = "aborted" if gate.stop == "abort" else "paused"
        reason = gate.note
        note = f"job {job.id}: {gate.note} ({state})"
    if state == "aborted":
        message = f"job aborted: {gate.note}"
        rows = [_final(r, "canceled", now, message) if r.state == "queued" else r for r in rows]
        return _Judged(rows, state, reason, True, note)
    if state == "running":
        rows = _hand_out(rows, devices, gate, now, blocked, open_count, max_open)
        wake = gate.wake_after_s
    if all(r.state in FINAL for r in rows):
        return _Judged(rows, "completed", _summary(rows), True, note)
    return _Judged(rows, state, reason, False, note, wake)


def _tally(rows: Sequence[Target], devices: Mapping[str, Device]) -> Tally:
    def online(device_id: str) -> bool:
        device = devices.get(device_id)
        return device is not None and device.online

    return Tally(
        targeted=len(rows),
        succeeded=sum(1 for r in rows if r.state == "succeeded"),
        failed=sum(1 for r in rows if r.state in ("failed", "timed_out")),
        in_flight=sum(
            1
            for r in rows
            if r.state in OPEN and r.handed_out_at is not None and online(r.device_id)
        ),
        handed_out_at=tuple(r.handed_out_at for r in rows if r.handed_out_at is not None),
    )


def _hand_out(
    rows: list[Target],
    devices: Mapping[str, Device],
    gate: Admission,
    now: float,
    blocked: set[str],
    open_count: dict[str, int],
    max_open: int,
) -> list[Target]:
    slots = gate.slots
    out: list[Target] = []
    for row in sorted(rows, key=lambda r: r.device_id):
        if row.state != "queued" or row.handed_out_at is not None:
            out.append(row)
            continue
        device = devices.get(row.device_id)
        ready = (
            device is not None
            and device.online
            and row.device_id not in blocked
            and open_count.get(row.device_id, 0) < max_open
            and (slots is None or slots > 0)
        )
        if not ready:
            blocked.add(row.device_id)  # later jobs of this device wait for this one
            out.append(row)
            continue
        out.append(replace(row, handed_out_at=now))
        open_count[row.device_id] = open_count.get(row.device_id, 0) + 1
        if slots is not None:
            slots -= 1
    order = {r.device_id: i for i, r in enumerate(rows)}
    return sorted(out, key=lambda r: order[r.device_id])


def _entry_changes(before: Target, after: Target) -> bool:
    """Whether the device's document must change: a new hand-out, or a handed-out
    job canceled before it started (it must leave the document)."""
    if before.handed_out_at is None and after.handed_out_at is not None:
        return True
    return (
        after.handed_out_at is not None and after.state == "canceled" and before.state == "queued"
    )


def _deadlines(rows: Sequence[Target], job: JobIn, now: float, grace_s: float) -> list[float]:
    wakes: list[float] = []
    if any(r.state == "queued" for r in rows):
        wakes.append(max(0.0, job.expires_at - now))
    for r in rows:
        if r.state == "in_progress":
            start = r.started_at if r.started_at is not None else r.handed_out_at or now
            wakes.append(max(0.0, start + job.deadline_s + grace_s - now))
    return wakes


def _summary(rows: Sequence[Target]) -> str:
    counts = {s: sum(1 for r in rows if r.state == s) for s in DEVICE_STATES}
    return ", ".join(f"{n} {s}" for s, n in counts.items() if n)


def counts(states: Sequence[str]) -> dict[str, int]:
    """Pure: how many rows are in each device state (every state present)."""
    return {s: sum(1 for x in states if x == s) for s in DEVICE_STATES}
