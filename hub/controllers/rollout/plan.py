"""The rollout planner (pure): waves, admissions, outcomes, gates, pauses and commands.

Nothing here does I/O or reads a clock: the driver reads the rollout row, its
``rollout_device`` rows (as :class:`Target`, in wave order) and what each device
reported (:class:`Evidence`), passes ``now`` (epoch seconds), writes back the
returned :class:`Step` (the rollout's new state and only the targets that changed)
in one transaction, restores the previous spec when ``abort`` is set, and looks
again after ``wake_after_s`` (or when something changes). Stepping again with the
result at the same ``now`` changes nothing.

Rules (``docs/rollouts.md`` says why):
- Waves (:func:`build_waves`): all-at-once is one wave; canary is ``canary`` devices,
  then the rest; waves are the listed sizes (each a count or a percent of the whole,
  ceil, at least 1), then whatever remains as one last wave. No wave is empty, no
  device is in two.
- Start: ``scheduled`` until ``start_at`` (the row's, else the policy's), then
  ``running`` from wave 0. Terminal states (succeeded, aborted, superseded) change
  nothing; every other state records outcomes; only ``running`` admits.
- Outcomes, from the evidence for the device's target generation: ``failed`` when it
  rolled back (``evidence.failed``), or when it turned unhealthy after the hand-out
  while soaking ("crash during soak"); ``applied`` -> ``soaking``; ``succeeded`` once
  ``healthy_since >= handed_out_at`` and it has been healthy for ``soak.seconds`` with
  ``soak.reports`` healthy reports (no soak: on applied). No outcome by
  ``handed_out_at + apply_deadline_s`` (``+ soak.seconds`` once soaking): ``timed_out``
  (online). A switched device without an outcome that is offline is ``unknown`` at
  once: it never holds a wave. An unknown device that reports later gets its
  real outcome (failed, or succeeded once soaked; never timed out again) while the
  rollout is not terminal. A held document that failed is a failure too.
- Admission (running, activated, not in a pause between waves): devices of waves up to
  the current one, in wave order. A device whose window is closed becomes
  ``waiting_window`` at once (it gets the held document: downloads proceed). A device
  whose window is open is switched (``in_flight``, ``handed_out_at = now``) while a slot
  is free: fewer than ``max_in_flight`` online devices in ``in_flight``/``soaking``
  (offline and unknown devices never take a slot; an offline device is still handed
  out, so it cannot block) and a free rate slot.
- Rate: at most ``rate`` activating hand-outs in any 60 s (below 1 per minute: one per
  ``60 / rate`` s), where ``rate = per_minute * growth_factor ** (succeeded //
  growth_after)``; derived from the targets' ``handed_out_at``, so the row's
  ``handed_out_total`` / ``rate_window_start`` are only written (for the view), never read.
- Prestage: while not activated every pending device gets the held document
  (``staging``; ``staged`` when it reports it), not limited by slots or the rate; the
  rollout shows ``waiting_promote`` until ``activate_at`` passed or an operator
  promoted (``promoted >= 0``); then waves switch as usual, staged or not (a rollout
  that starts after ``activate_at`` switches at once). Any held device that reports
  the document staged gets ``staged_at`` (the view's staged count).
- ``promoted`` is the highest wave an operator let start: 0 activates a prestaged
  rollout, ``w + 1`` ends the wait after wave ``w``.
- Waves advance when every device of the waves so far has an outcome (unknown counts
  as done). Between waves: canary without ``pause_s`` waits in ``waiting_promote``
  (promote sets ``promoted`` to the next wave); ``pause_s`` pauses that long after the
  wave's last outcome (state stays ``running``; promote skips it). After the last wave:
  ``succeeded`` (``finished_at``).
- Gates: the failure threshold (failed + timed_out of succeeded + failed + timed_out,
  once ``min_reported`` reported) is checked in every non-terminal state, and only
  when more devices failed than the operator accepted at the last resume
  (``accepted_failures``): abort, or pause when running/waiting. The quorum (running):
  ``within_s`` after the wave started, fewer than ``percent`` of the wave's handed-out,
  not unknown devices with an outcome pauses. The progress deadline (running, not in a
  pause between waves, not when only windows hold the wave): no outcome, hand-out or
  wave start for ``progress_deadline_s`` pauses or aborts. Each reason names the figures.
- Commands (:func:`command`): pause (scheduled, running, waiting_promote), resume (paused
  only: back to running, or scheduled if never started; restarts the wave's quorum and
  progress clocks and accepts the failures so far), promote (waiting_promote, or running
  in a timed pause), abort (any non-terminal), retry-failed (failed and timed_out back to
  pending; any state but aborted and superseded; a succeeded rollout runs again).
  Anything else raises :class:`CommandRefused`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hub.controllers.rollout.policy import (
    Policy,
    PolicyError,
    Size,
    iso,
    parse_policy,
    rate_slots,
)

__all__ = [
    "ABORTED",
    "COMMANDS",
    "CRASH_DURING_SOAK",
    "DEVICE_STATES",
    "FAILED",
    "HELD",
    "IN_FLIGHT",
    "OUTCOMES",
    "PAUSED",
    "PENDING",
    "ROLLOUT_STATES",
    "RUNNING",
    "SCHEDULED",
    "SOAKING",
    "STAGED",
    "STAGING",
    "SUCCEEDED",
    "SUPERSEDED",
    "TERMINAL",
    "TIMED_OUT",
    "UNKNOWN",
    "WAITING_PROMOTE",
    "WAITING_WINDOW",
    "CommandRefused",
    "Evidence",
    "Policy",
    "PolicyError",
    "RolloutState",
    "Step",
    "Summary",
    "Target",
    "build_waves",
    "command",
    "parse_policy",
    "progress_deadline_at",
    "step",
    "summarize",
]

# Rollout states.
SCHEDULED = "scheduled"
RUNNING = "running"
PAUSED = "paused"
WAITING_PROMOTE = "waiting_promote"
SUCCEEDED = "succeeded"
ABORTED = "aborted"
SUPERSEDED = "superseded"
ROLLOUT_STATES = (SCHEDULED, RUNNING, PAUSED, WAITING_PROMOTE, SUCCEEDED, ABORTED, SUPERSEDED)
TERMINAL = frozenset((SUCCEEDED, ABORTED, SUPERSEDED))

# Device states.
PENDING = "pending"
STAGING = "staging"
STAGED = "staged"
WAITING_WINDOW = "waiting_window"
IN_FLIGHT = "in_flight"
SOAKING = "soaking"
FAILED = "failed"
TIMED_OUT = "timed_out"
UNKNOWN = "unknown"
DEVICE_STATES = (
    PENDING, STAGING, STAGED, WAITING_WINDOW, IN_FLIGHT, SOAKING,
    SUCCEEDED, FAILED, TIMED_OUT, UNKNOWN,
)  # fmt: skip
OUTCOMES = frozenset((SUCCEEDED, FAILED, TIMED_OUT, UNKNOWN))
HELD = frozenset((STAGING, STAGED, WAITING_WINDOW))  # hold the document, no switch
_HELD = HELD
_WAITING = frozenset((PENDING, *_HELD))  # not switched yet
_SWITCHED = frozenset((IN_FLIGHT, SOAKING, *OUTCOMES))  # handed_out_at is the switch
COMMANDS = ("pause", "resume", "abort", "promote", "retry-failed")

CRASH_DURING_SOAK = "crash during soak"
_TARGET_CHANGES = frozenset(("state", "handed_out_at", "staged_at", "outcome_at", "detail"))
_RATE_WINDOW_S = 60.0


class CommandRefused(Exception):
    """An operator command the rollout's state does not allow (the API's 409)."""


@dataclass(frozen=True, slots=True)
class Evidence:
    """What the driver read about one device, for its target generation."""

    online: bool
    staged: bool  # staged_generation >= the held generation handed out
    applied: bool  # reported_generation >= target generation
    failed: bool  # failed_generation >= target generation (the device rolled back)
    healthy_since: float | None  # soak evidence for that generation (epoch seconds)
    healthy_reports: int
    unhealthy_at: float | None
    window_open: bool  # True when the policy has no window
    detail: str = ""  # e.g. the device's report error


_NO_EVIDENCE = Evidence(
    online=False, staged=False, applied=False, failed=False, healthy_since=None,
    healthy_reports=0, unhealthy_at=None, window_open=True,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Target:
    """One ``rollout_device`` row: ``handed_out_at`` is when its current document went
    out (the held one while staging/staged/waiting_window, then the switch)."""

    device_id: str
    wave: int
    state: str
    handed_out_at: float | None = None
    staged_at: float | None = None
    outcome_at: float | None = None
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RolloutState:
    """The rollout row's mutable part (epoch seconds)."""

    state: str
    reason: str = ""
    wave: int = 0
    promoted: int = -1
    started_at: float | None = None
    wave_started_at: float | None = None
    progress_at: float | None = None
    finished_at: float | None = None
    start_at: float | None = None
    activate_at: float | None = None
    handed_out_total: int = 0  # written for the view; the planner derives the rate
    rate_window_start: float | None = None  # from the targets' handed_out_at
    accepted_failures: int = 0  # failures an operator resumed past (needs a column)


@dataclass(frozen=True, slots=True)
class Step:
    """What to write: the rollout's new state, the targets that changed, whether to
    restore the previous spec now, when to look again, and why (``notes``)."""

    rollout: RolloutState
    targets: tuple[Target, ...]
    abort: bool
    wake_after_s: float | None
    notes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Summary:
    """Counts per device state overall and per wave (every state present, 0 or more)."""

    counts: Mapping[str, int]
    waves: tuple[Mapping[str, int], ...]
    wave_sizes: tuple[int, ...]
    targeted: int
    staged: int  # devices that reported the held document staged in this rollout
    failed_devices: tuple[Target, ...] = field(default=())  # failed/timed_out, capped
    unknown_devices: tuple[str, ...] = field(default=())  # capped

    def as_json(self) -> dict[str, Any]:
        """The view's members: counts, waves, targeted, staged and the device lists."""
        return {
            "counts": dict(self.counts),
            "waves": [
                {"index": i, "size": size, "counts": dict(counts)}
                for i, (size, counts) in enumerate(zip(self.wave_sizes, self.waves, strict=True))
            ],
            "targeted": self.targeted,
            "staged": self.staged,
            "failed_devices": [
                {"device_id": t.device_id, "state": t.state, "detail": t.detail}
                for t in self.failed_devices
            ],
            "unknown_devices": list(self.unknown_devices),
        }


# --- waves -----------------------------------------------------------------------


def build_waves(policy: Policy, device_ids: Sequence[str]) -> list[list[str]]:
    """Pure: the waves (device ids in the given order); see the module rules.

    Raises ValueError when a device id is given twice.
    """
    seen: set[str] = set()
    for device_id in device_ids:
        if device_id in seen:
            raise ValueError(f"device {device_id!r} given twice")
        seen.add(device_id)
    ids = list(device_ids)
    total = len(ids)
    if policy.strategy == "canary":
        sizes = [(policy.canary or Size(count=1)).of(total)]
    elif policy.strategy == "waves":
        sizes = [size.of(total) for size in policy.waves]
    else:
        sizes = []
    out: list[list[str]] = []
    at = 0
    for size in sizes:
        if at >= total:
            break
        out.append(ids[at : at + size])
        at += size
    if at < total:
        out.append(ids[at:])
    return out


# --- the step --------------------------------------------------------------------


class _Run:
    """One step's working state: the rollout's fields and the targets as they change."""

    def __init__(
        self,
        policy: Policy,
        rollout: RolloutState,
        targets: Sequence[Target],
        evidence: Mapping[str, Evidence],
        now: float,
    ) -> None:
        self.policy = policy
        self.orig = rollout
        self.rs = rollout
        self.now = now
        self.order = {t.device_id: i for i, t in enumerate(targets)}
        self.targets = {t.device_id: t for t in targets}
        self.before = dict(self.targets)
        self.evidence = evidence
        self.notes: list[str] = []
        self.wakes: list[float] = []
        self.abort = False
        self.waves = 1 + max((t.wave for t in targets), default=-1)
        self.idle = False  # between waves or held only by windows: no progress deadline

    # helpers

    def ev(self, device_id: str) -> Evidence:
        return self.evidence.get(device_id, _NO_EVIDENCE)

    def set(self, target: Target, **changes: Any) -> Target:
        # Built directly: dataclasses.replace costs several times more per device.
        if not changes.keys() <= _TARGET_CHANGES:
            raise TypeError(f"not a target change: {sorted(changes.keys() - _TARGET_CHANGES)}")
        get = changes.get
        new = Target(
            target.device_id,
            target.wave,
            get("state", target.state),
            get("handed_out_at", target.handed_out_at),
            get("staged_at", target.staged_at),
            get("outcome_at", target.outcome_at),
            get("detail", target.detail),
        )
        self.targets[target.device_id] = new
        return new

    def update(self, **changes: object) -> None:
        self.rs = replace(self.rs, **changes)  # type: ignore[arg-type]

    def note(self, text: str) -> None:
        self.notes.append(text)

    def wake(self, at: float | None) -> None:
        if at is not None:
            self.wakes.append(at)

    def outcome(self, target: Target, state: str, detail: str) -> None:
        self.set(target, state=state, outcome_at=self.now, detail=detail[:512])
        self.progress()

    def progress(self) -> None:
        """Something moved: the progress deadline starts again."""
        if self.rs.progress_at != self.now:
            self.update(progress_at=self.now)

    def tally(self) -> Counter[str]:
        return Counter(t.state for t in self.targets.values())

    def failures(self) -> tuple[int, int]:
        counts = self.tally()
        failed = counts[FAILED] + counts[TIMED_OUT]
        return failed, failed + counts[SUCCEEDED]

    def activate_at(self) -> float | None:
        at = self.rs.activate_at
        return self.policy.activate_at if at is None else at

    def activated(self) -> bool:
        if not self.policy.prestage or self.rs.promoted >= 0:
            return True
        at = self.activate_at()
        return at is not None and self.now >= at

    def current(self) -> list[Target]:
        """The targets of the waves so far, in wave order."""
        chosen = [t for t in self.targets.values() if t.wave <= self.rs.wave]
        return sorted(chosen, key=lambda t: (t.wave, self.order[t.device_id]))

    def result(self) -> Step:
        changed = tuple(t for k, t in self.targets.items() if t != self.before[k])
        switched = [t.handed_out_at for t in self.targets.values() if t.state in _SWITCHED]
        self.update(handed_out_total=sum(1 for at in switched if at is not None))
        if self.policy.rate is not None:
            self.update(rate_window_start=min(self.recent(), default=None))
        if self.rs.state not in TERMINAL:
            self.deadlines()
        future = [at for at in self.wakes if at > self.now]
        return Step(
            rollout=self.rs,
            targets=changed,
            abort=self.abort,
            wake_after_s=min(future) - self.now if future else None,
            notes=tuple(self.notes),
        )

    def deadlines(self) -> None:
        """Wake at every switched device's deadline."""
        apply_s = self.policy.apply_deadline_s
        for target in self.targets.values():
            if target.handed_out_at is None:
                continue
            if target.state == IN_FLIGHT:
                self.wake(target.handed_out_at + apply_s)
            elif target.state == SOAKING:
                self.wake(target.handed_out_at + apply_s + self.policy.soak.seconds)

    # start

    def start(self) -> bool:
        """Scheduled -> running when start_at passed; whether the rollout runs now."""
        start_at = self.rs.start_at if self.rs.start_at is not None else self.policy.start_at
        if start_at is not None and self.now < start_at:
            self.wake(start_at)
            return False
        self.update(state=RUNNING, reason="")
        self.began()
        return True

    def began(self) -> None:
        if self.rs.started_at is None:
            self.update(started_at=self.now, wave_started_at=self.now, progress_at=self.now)
            self.note(f"started: {len(self.targets)} devices in {self.waves} wave(s)")

    # outcomes

    def observe(self) -> None:
        for target in list(self.targets.values()):
            if target.state in _HELD:
                self.observe_held(target, self.ev(target.device_id))
            elif target.state == IN_FLIGHT:
                self.observe_in_flight(target, self.ev(target.device_id))
            elif target.state == SOAKING:
                self.observe_soaking(target, self.ev(target.device_id))
            elif target.state == UNKNOWN:
                self.observe_unknown(target, self.ev(target.device_id))

    def observe_held(self, target: Target, ev: Evidence) -> None:
        if ev.failed:
            self.outcome(target, FAILED, ev.detail or "the held document failed")
        elif ev.staged and target.staged_at is None:
            state = STAGED if target.state == STAGING else target.state
            self.set(target, state=state, staged_at=self.now)

    def observe_in_flight(self, target: Target, ev: Evidence) -> None:
        if ev.failed:
            self.outcome(target, FAILED, ev.detail or "rolled back")
        elif ev.applied:
            self.observe_soaking(self.set(target, state=SOAKING), ev)
        else:
            self.deadline(target, ev, self.policy.apply_deadline_s, "not applied")

    def observe_soaking(self, target: Target, ev: Evidence) -> None:
        if ev.failed:
            self.outcome(target, FAILED, ev.detail or "rolled back")
        elif self.crashed(target, ev):
            self.outcome(target, FAILED, CRASH_DURING_SOAK)
        elif self.soaked(target, ev):
            self.outcome(target, SUCCEEDED, "")
        else:
            limit = self.policy.apply_deadline_s + self.policy.soak.seconds
            self.deadline(target, ev, limit, "not healthy through the soak")

    def observe_unknown(self, target: Target, ev: Evidence) -> None:
        if target.handed_out_at is None:
            return
        if ev.failed:
            self.outcome(target, FAILED, ev.detail or "rolled back")
        elif ev.applied and self.crashed(target, ev):
            self.outcome(target, FAILED, CRASH_DURING_SOAK)
        elif ev.applied and self.soaked(target, ev):
            self.outcome(target, SUCCEEDED, "")

    def crashed(self, target: Target, ev: Evidence) -> bool:
        return ev.unhealthy_at is not None and ev.unhealthy_at >= (target.handed_out_at or 0.0)

    def soaked(self, target: Target, ev: Evidence) -> bool:
        soak = self.policy.soak
        if soak.none:
            return True
        since = ev.healthy_since
        if since is None or since < (target.handed_out_at or 0.0):
            return False
        if ev.healthy_reports >= soak.reports:
            if self.now - since >= soak.seconds:
                return True
            self.wake(since + soak.seconds)
        return False

    def deadline(self, target: Target, ev: Evidence, limit_s: float, what: str) -> None:
        if not ev.online:
            # Offline is never a pass or a fail, and never holds a wave: unknown now,
            # its real outcome if it reports while the rollout runs.
            self.outcome(target, UNKNOWN, "offline after hand-out")
            return
        at = (target.handed_out_at if target.handed_out_at is not None else self.now) + limit_s
        if self.now < at:
            return
        self.outcome(target, TIMED_OUT, f"{what} {limit_s:g}s after hand-out")

    # gates

    def failure_gate(self) -> bool:
        """Whether the failure threshold stopped the rollout now."""
        threshold = self.policy.failure_threshold
        failed, reported = self.failures()
        if failed <= self.rs.accepted_failures or not threshold.crossed(failed, reported):
            return False
        why = f"failure threshold {threshold.describe()} crossed: {failed} of {reported} failed"
        if threshold.action == "abort":
            self.stop(ABORTED, why)
            return True
        if self.rs.state in (RUNNING, WAITING_PROMOTE):
            self.stop(PAUSED, why)
            return True
        return False

    def quorum_gate(self) -> bool:
        quorum = self.policy.quorum
        start = self.rs.wave_started_at
        if quorum is None or start is None or self.wave_done():
            return False
        if self.now < start + quorum.within_s:
            self.wake(start + quorum.within_s)
            return False
        wave = [t for t in self.targets.values() if t.wave == self.rs.wave]
        asked = [t for t in wave if t.state in _SWITCHED and t.state != UNKNOWN]
        answered = sum(1 for t in asked if t.state in OUTCOMES)
        if not asked or answered * 100 >= quorum.percent * len(asked):
            return False
        self.stop(
            PAUSED,
            f"reporting quorum not met: wave {self.rs.wave}: {answered} of {len(asked)} "
            f"reported within {quorum.within_s:g}s (need {quorum.percent:g}%)",
        )
        return True

    def progress_gate(self) -> None:
        if self.rs.state != RUNNING or self.idle:
            return
        since = self.rs.progress_at if self.rs.progress_at is not None else self.now
        at = since + self.policy.progress_deadline_s
        if self.now < at:
            self.wake(at)
            return
        why = f"no progress for {self.policy.progress_deadline_s:g}s"
        self.stop(ABORTED if self.policy.on_progress_deadline == "abort" else PAUSED, why)

    def stop(self, state: str, why: str) -> None:
        self.note(why)
        self.update(state=state, reason=why)
        if state == ABORTED:
            self.abort = True
            self.update(finished_at=self.now)

    # waves

    def wave_done(self) -> bool:
        return all(t.state in OUTCOMES for t in self.targets.values() if t.wave <= self.rs.wave)

    def advance(self) -> None:
        """Running or waiting_promote: activate, admit, move through the waves."""
        if not self.activated():
            self.prestage()
            return
        if self.rs.state == WAITING_PROMOTE:
            if self.rs.reason.startswith("prestaged"):
                self.note("activated by a promote" if self.rs.promoted >= 0 else "activated")
            self.update(state=RUNNING, reason="")
        while True:
            self.admit()
            if not self.wave_done():
                return
            if self.rs.wave >= self.waves - 1:
                self.finish()
                return
            if not self.pause_over():
                return
            self.update(
                wave=self.rs.wave + 1, wave_started_at=self.now, progress_at=self.now, reason=""
            )
            size = sum(1 for t in self.targets.values() if t.wave == self.rs.wave)
            self.note(f"wave {self.rs.wave} started ({size} devices)")

    def prestage(self) -> None:
        staged = 0
        for target in self.targets.values():
            if target.state == PENDING:
                self.set(target, state=STAGING, handed_out_at=self.now)
                staged += 1
        if staged:
            self.note(f"prestaging: {staged} devices get the held document")
        at = self.activate_at()
        self.wake(at)
        why = (
            f"prestaged: activation at {iso(at)} or a promote"
            if at is not None
            else "prestaged: waiting for a promote"
        )
        self.update(state=WAITING_PROMOTE, reason=why)

    def in_timed_pause(self) -> bool:
        """Running, the waves so far done, the next one waiting out ``pause_s``."""
        rs = self.rs
        return (
            rs.state == RUNNING
            and self.policy.pause_s is not None
            and self.activated()
            and rs.wave < self.waves - 1
            and rs.promoted < rs.wave + 1
            and self.wave_done()
        )

    def pause_over(self) -> bool:
        """After the current wave: whether the next may start now (else wait)."""
        nxt = self.rs.wave + 1
        if self.rs.promoted >= nxt:
            return True
        canary_pause = self.policy.strategy == "canary" and self.rs.wave == 0
        if canary_pause and self.policy.pause_s is None:
            why = f"wave {self.rs.wave} (canary) done: waiting for a promote"
            if self.orig.reason != why:
                self.note(why)
            self.update(state=WAITING_PROMOTE, reason=why)
            return False
        if self.policy.pause_s is None or not (canary_pause or self.policy.strategy == "waves"):
            return True
        done = [t.outcome_at for t in self.targets.values() if t.wave == self.rs.wave]
        last = max((at for at in done if at is not None), default=self.rs.wave_started_at)
        until = (last if last is not None else self.now) + self.policy.pause_s
        if self.now >= until:
            return True
        self.wake(until)
        self.idle = True
        why = f"wave {self.rs.wave} done: next wave at {iso(until)}"
        if self.orig.reason != why:
            self.note(why)
        self.update(reason=why)
        return False

    def finish(self) -> None:
        counts = self.tally()
        self.update(state=SUCCEEDED, reason="", finished_at=self.now)
        self.note(
            f"succeeded: {counts[SUCCEEDED]} succeeded, {counts[FAILED]} failed, "
            f"{counts[TIMED_OUT]} timed out, {counts[UNKNOWN]} unknown"
        )

    # admission

    def admit(self) -> None:
        slots = self.slots()
        rate_left, rate_free_at = self.rate_slots()
        waiting_window = False
        blocked_by_rate = False
        for target in self.current():
            if target.state not in _WAITING:
                continue
            ev = self.ev(target.device_id)
            if not ev.window_open:
                waiting_window = True
                if target.state != WAITING_WINDOW:
                    at = target.handed_out_at if target.state in _HELD else self.now
                    self.set(target, state=WAITING_WINDOW, handed_out_at=at)
                continue
            if slots <= 0:
                continue
            if rate_left <= 0:
                blocked_by_rate = True
                continue
            self.set(target, state=IN_FLIGHT, handed_out_at=self.now, detail="")
            self.progress()
            rate_left -= 1
            if ev.online:
                slots -= 1
        if blocked_by_rate:
            self.wake(rate_free_at)
        busy = any(t.state in (IN_FLIGHT, SOAKING) for t in self.current())
        self.idle = waiting_window and not busy

    def slots(self) -> float:
        limit = self.policy.max_in_flight
        if limit is None:
            return math.inf
        busy = sum(
            1
            for t in self.targets.values()
            if t.state in (IN_FLIGHT, SOAKING) and self.ev(t.device_id).online
        )
        return limit - busy

    def rate_window(self) -> tuple[float, int]:
        """The rate's window (seconds) and how many hand-outs it allows in one."""
        rate = self.policy.rate
        if rate is None:
            return _RATE_WINDOW_S, 0
        per_minute = rate.now(self.tally()[SUCCEEDED])
        if per_minute >= 1:
            return _RATE_WINDOW_S, math.floor(per_minute)
        return _RATE_WINDOW_S / per_minute, 1

    def recent(self) -> list[float]:
        """When the switches inside the rate's window went out, oldest first."""
        window_s, _ = self.rate_window()
        return sorted(
            t.handed_out_at
            for t in self.targets.values()
            if t.state in _SWITCHED
            and t.handed_out_at is not None
            and t.handed_out_at > self.now - window_s
        )

    def rate_slots(self) -> tuple[float, float | None]:
        """Hand-outs the rate allows now, and when the next slot frees after those."""
        return rate_slots(
            self.policy.rate,
            succeeded=self.tally()[SUCCEEDED],
            handed_out_at=(
                t.handed_out_at
                for t in self.targets.values()
                if t.state in _SWITCHED and t.handed_out_at is not None
            ),
            now=self.now,
        )


def step(
    policy: Policy,
    rollout: RolloutState,
    targets: Sequence[Target],
    evidence: Mapping[str, Evidence],
    now: float,
) -> Step:
    """Pure: the rollout's next state and the targets that change now (module rules).

    ``targets`` in wave order (as :func:`build_waves` made them); a device missing from
    ``evidence`` counts as offline with nothing reported. Raises ValueError when a device
    is given twice.
    """
    if len({t.device_id for t in targets}) != len(targets):
        raise ValueError("a device is given twice in targets")
    run = _Run(policy, rollout, targets, evidence, now)
    if rollout.state in TERMINAL:
        return run.result()
    if rollout.state == SCHEDULED and not run.start():
        return run.result()
    if run.rs.state == RUNNING:
        run.began()
    run.observe()
    if run.failure_gate():
        return run.result()
    if run.rs.state in (RUNNING, WAITING_PROMOTE):
        if run.rs.state == RUNNING and run.quorum_gate():
            return run.result()
        run.advance()
        run.progress_gate()
    return run.result()


# --- commands --------------------------------------------------------------------


def command(
    policy: Policy,
    rollout: RolloutState,
    targets: Sequence[Target],
    name: str,
    now: float,
    reason: str = "",
) -> Step:
    """Pure: an operator command's effect (write it, then :func:`step`).

    Raises CommandRefused when the state does not allow it, ValueError for an unknown
    command name.
    """
    run = _Run(policy, rollout, targets, {}, now)
    state = rollout.state
    said = f": {reason}" if reason else ""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r} (one of {', '.join(COMMANDS)})")
    if name == "abort":
        if state in TERMINAL:
            raise CommandRefused(f"cannot abort: the rollout is {state}")
        run.stop(ABORTED, f"aborted by operator{said}")
    elif name == "pause":
        if state not in (SCHEDULED, RUNNING, WAITING_PROMOTE):
            raise CommandRefused(f"cannot pause: the rollout is {state}")
        run.stop(PAUSED, f"paused by operator{said}")
    elif name == "resume":
        if state != PAUSED:
            raise CommandRefused(f"cannot resume: the rollout is {state}, not paused")
        _resume(run, said)
    elif name == "promote":
        _promote(run, said)
    else:
        _retry_failed(run, said)
    return run.result()


def _resume(run: _Run, said: str) -> None:
    if run.rs.started_at is None:
        run.update(state=SCHEDULED, reason="")
    else:
        failed, _ = run.failures()
        run.update(
            state=RUNNING,
            reason="",
            wave_started_at=run.now,
            progress_at=run.now,
            accepted_failures=max(failed, run.rs.accepted_failures),
        )
    run.note(f"resumed by operator{said}")


def _promote(run: _Run, said: str) -> None:
    rs = run.rs
    if rs.state == WAITING_PROMOTE:
        target = rs.wave + 1 if run.activated() else 0
    elif run.in_timed_pause():
        target = rs.wave + 1
    else:
        raise CommandRefused(f"cannot promote: the rollout is {rs.state} and waits for no promote")
    run.update(state=RUNNING, reason="", promoted=max(rs.promoted, target))
    run.note(f"promoted by operator{said}" + (f" (wave {target})" if target else " (activated)"))


def _retry_failed(run: _Run, said: str) -> None:
    state = run.rs.state
    if state in (ABORTED, SUPERSEDED):
        raise CommandRefused(f"cannot retry-failed: the rollout is {state}")
    retried = 0
    for target in list(run.targets.values()):
        if target.state in (FAILED, TIMED_OUT):
            run.set(target, state=PENDING, handed_out_at=None, outcome_at=None, detail="")
            retried += 1
    if not retried:
        raise CommandRefused("cannot retry-failed: no device failed or timed out")
    run.update(accepted_failures=0, progress_at=run.now)
    if state == SUCCEEDED:
        run.update(state=RUNNING, reason="", finished_at=None)
    run.note(f"retry-failed by operator: {retried} devices back to pending{said}")


# --- summary ---------------------------------------------------------------------


def progress_deadline_at(policy: Policy, rollout: RolloutState) -> float | None:
    """Pure: when the progress deadline falls (running only; None otherwise), for the view."""
    if rollout.state != RUNNING or rollout.progress_at is None:
        return None
    return rollout.progress_at + policy.progress_deadline_s


def summarize(targets: Sequence[Target], waves: int, cap: int = 100) -> Summary:
    """Pure: counts per state, overall and per wave (``waves`` of them), for the view."""
    counts = {s: 0 for s in DEVICE_STATES}
    per_wave = [{s: 0 for s in DEVICE_STATES} for _ in range(waves)]
    sizes = [0] * waves
    for target in targets:
        counts[target.state] = counts.get(target.state, 0) + 1
        if 0 <= target.wave < waves:
            per_wave[target.wave][target.state] = per_wave[target.wave].get(target.state, 0) + 1
            sizes[target.wave] += 1
    failed = [t for t in targets if t.state in (FAILED, TIMED_OUT)]
    return Summary(
        counts=counts,
        waves=tuple(per_wave),
        wave_sizes=tuple(sizes),
        targeted=len(targets),
        staged=sum(1 for t in targets if t.staged_at is not None),
        failed_devices=tuple(failed[:cap]),
        unknown_devices=tuple(t.device_id for t in targets if t.state == UNKNOWN)[:cap],
    )
