"""The rollout planner (pure): waves, admission under max_in_flight and the rate, outcomes
and the soak, unknown devices, gates, pauses, prestage, windows, deadlines, operator
commands, the summary, and a seeded random fleet run to the end."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import pytest

from hub.controllers.rollout.plan import (
    COMMANDS,
    DEVICE_STATES,
    OUTCOMES,
    TERMINAL,
    CommandRefused,
    Evidence,
    Policy,
    RolloutState,
    Step,
    Target,
    build_waves,
    command,
    parse_policy,
    progress_deadline_at,
    step,
    summarize,
)

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def E(**over: Any) -> Evidence:
    """Evidence: online, nothing reported, window open, unless told otherwise."""
    base: dict[str, Any] = {
        "online": True, "staged": False, "applied": False, "failed": False,
        "healthy_since": None, "healthy_reports": 0, "unhealthy_at": None, "window_open": True,
    }  # fmt: skip
    return Evidence(**(base | over))


def ids(n: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i:02d}" for i in range(n)]


def running(**over: Any) -> RolloutState:
    base: dict[str, Any] = {"state": "running", "started_at": T0, "wave_started_at": T0,
                            "progress_at": T0}  # fmt: skip
    return RolloutState(**(base | over))


class Sim:
    """A rollout row and its targets, stepped as a driver would (writes the changes)."""

    def __init__(
        self, raw: Mapping[str, Any] | None, n: int | list[list[str]], state: str = "running"
    ) -> None:
        self.policy = parse_policy(raw)
        waves = build_waves(self.policy, ids(n)) if isinstance(n, int) else n
        self.targets = {d: Target(d, w, "pending") for w, wave in enumerate(waves) for d in wave}
        self.rollout = RolloutState(state=state)
        self.notes: list[str] = []
        self.evidence: dict[str, Evidence] = {}

    def step(self, now: float, **evidence: Evidence) -> Step:
        self.evidence.update(evidence)
        done = step(self.policy, self.rollout, list(self.targets.values()), self.evidence, now)
        self.write(done)
        return done

    def command(self, name: str, now: float, reason: str = "") -> Step:
        done = command(self.policy, self.rollout, list(self.targets.values()), name, now, reason)
        self.write(done)
        return done

    def write(self, done: Step) -> None:
        self.rollout = done.rollout
        for target in done.targets:
            self.targets[target.device_id] = target
        self.notes += done.notes

    def see(self, devices: list[str], **over: Any) -> None:
        for device_id in devices:
            self.evidence[device_id] = E(**over)

    def states(self) -> Counter[str]:
        return Counter(t.state for t in self.targets.values())

    def in_state(self, state: str) -> list[str]:
        return [t.device_id for t in self.targets.values() if t.state == state]

    def state(self, device_id: str) -> str:
        return self.targets[device_id].state


# --- waves -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "n", "sizes"),
    [
        (None, 10, [10]),
        (None, 0, []),
        ({"strategy": "canary"}, 10, [1, 9]),
        ({"strategy": "canary", "canary": {"count": 2}}, 10, [2, 8]),
        ({"strategy": "canary", "canary": {"percent": 5}}, 10, [1, 9]),
        ({"strategy": "canary", "canary": {"percent": 25}}, 10, [3, 7]),
        ({"strategy": "canary", "canary": {"count": 20}}, 10, [10]),
        ({"strategy": "canary"}, 1, [1]),
        ({"strategy": "canary"}, 0, []),
        ({"strategy": "waves", "waves": [2, "50%"]}, 10, [2, 5, 3]),
        ({"strategy": "waves", "waves": [3, 3, 3]}, 9, [3, 3, 3]),
        ({"strategy": "waves", "waves": ["60%", "60%"]}, 10, [6, 4]),
        ({"strategy": "waves", "waves": [20, 5]}, 5, [5]),
        ({"strategy": "waves", "waves": ["1%", "1%"]}, 10, [1, 1, 8]),
        ({"strategy": "waves", "waves": [10, "25%", "100%"]}, 100, [10, 25, 65]),
    ],
)  # fmt: skip
def test_build_waves(raw: dict[str, Any] | None, n: int, sizes: list[int]) -> None:
    devices = ids(n)
    waves = build_waves(parse_policy(raw), devices)
    assert [len(w) for w in waves] == sizes
    assert [d for w in waves for d in w] == devices  # in order, none twice, none lost


def test_build_waves_refuses_a_device_twice() -> None:
    with pytest.raises(ValueError, match="'d1' given twice"):
        build_waves(Policy(), ["d1", "d2", "d1"])


# --- start and admission ---------------------------------------------------------


def test_scheduled_until_start_at() -> None:
    sim = Sim({"start_at": "2027-01-15T09:00:00Z"}, 3, state="scheduled")
    done = sim.step(T0)
    assert done.rollout.state == "scheduled" and done.targets == ()
    assert done.wake_after_s == 3600
    done = sim.step(T0 + 3600)
    assert done.rollout.state == "running" and done.rollout.started_at == T0 + 3600
    assert sim.states() == {"in_flight": 3}
    assert sim.notes == ["started: 3 devices in 1 wave(s)"]


def test_the_rows_start_at_wins_over_the_policys() -> None:
    sim = Sim({"start_at": "2027-01-15T09:00:00Z"}, 3, state="scheduled")
    sim.rollout = replace(sim.rollout, start_at=T0 + 10)
    assert sim.step(T0).wake_after_s == 10
    assert sim.step(T0 + 10).rollout.state == "running"


def test_all_at_once_hands_out_everything_and_wakes_at_the_deadline() -> None:
    sim = Sim(None, 4, state="scheduled")
    done = sim.step(T0, **{d: E() for d in ids(4)})
    assert {t.state for t in done.targets} == {"in_flight"}
    assert {t.handed_out_at for t in done.targets} == {T0}
    assert done.wake_after_s == 600  # the apply deadline comes before the progress deadline
    assert done.rollout.handed_out_total == 4


def test_max_in_flight_counts_only_online_devices() -> None:
    sim = Sim({"max_in_flight": 3}, 10, state="scheduled")
    sim.see(ids(10))
    sim.see(["d00", "d01"], online=False)
    sim.step(T0)
    # two offline devices are handed out without taking a slot: they cannot block
    assert sim.in_state("in_flight") == ids(5)
    sim.step(T0 + 1)  # nothing freed: nothing more; offline ones are unknown at once
    assert sim.in_state("in_flight") == ["d02", "d03", "d04"]
    assert sim.in_state("unknown") == ["d00", "d01"]
    sim.see(["d02"], applied=True)  # succeeded (no soak): frees a slot
    sim.see(["d03"], applied=True, healthy_since=None)
    sim.step(T0 + 2)
    assert sim.state("d02") == "succeeded" and sim.state("d03") == "succeeded"
    assert sim.in_state("in_flight") == ["d04", "d05", "d06"]


def test_soaking_devices_take_slots_and_unknown_ones_do_not() -> None:
    sim = Sim({"max_in_flight": 2, "soak": {"seconds": 30}}, 6, state="scheduled")
    sim.see(ids(6))
    sim.step(T0)
    sim.see(["d00"], applied=True)
    sim.step(T0 + 5)
    assert sim.state("d00") == "soaking" and sim.in_state("in_flight") == ["d01"]
    sim.see(["d01"], online=False)  # offline: no longer takes a slot
    sim.step(T0 + 6)  # d01 is unknown at once and frees its slot
    assert sim.state("d01") == "unknown" and sim.in_state("in_flight") == ["d02"]
    sim.step(T0 + 606)  # d02 (online) timed out
    assert sim.state("d02") == "timed_out"


def test_rate_limit_and_growth() -> None:
    policy = {"rate": {"per_minute": 2, "growth_factor": 2, "growth_after": 2},
              "failure_threshold": {"percent": 100}}  # fmt: skip
    sim = Sim(policy, 12, state="scheduled")
    sim.see(ids(12))
    done = sim.step(T0)
    assert sim.in_state("in_flight") == ["d00", "d01"]
    assert done.wake_after_s == 60
    assert sim.step(T0 + 59).targets == ()
    sim.see(["d00", "d01"], applied=True)
    sim.step(T0 + 60)  # two succeeded: the rate doubles to 4
    assert sim.in_state("in_flight") == ["d02", "d03", "d04", "d05"]
    assert sim.rollout.rate_window_start == T0 + 60


def test_rate_below_one_a_minute() -> None:
    sim = Sim({"rate": {"per_minute": 0.5}}, 3, state="scheduled")
    sim.see(ids(3))
    assert sim.step(T0).wake_after_s == 120
    assert sim.in_state("in_flight") == ["d00"]
    sim.step(T0 + 119)
    assert sim.in_state("in_flight") == ["d00"]
    sim.step(T0 + 120)
    assert sim.in_state("in_flight") == ["d00", "d01"]


# --- outcomes --------------------------------------------------------------------

H = T0 + 100.0  # hand-out time in the outcome table
SOAK = {"soak": {"seconds": 30, "reports": 2}}


@pytest.mark.parametrize(
    ("raw", "before", "evidence", "now", "after", "detail"),
    [
        (None, "in_flight", E(failed=True, detail="boom"), H + 5, "failed", "boom"),
        (None, "in_flight", E(failed=True), H + 5, "failed", "rolled back"),
        (None, "in_flight", E(applied=True), H + 5, "succeeded", ""),  # no soak
        (SOAK, "in_flight", E(applied=True), H + 5, "soaking", ""),
        (SOAK, "in_flight", E(applied=True, healthy_since=H + 1, healthy_reports=2), H + 31,
         "succeeded", ""),
        (SOAK, "soaking", E(applied=True, healthy_since=H + 10, healthy_reports=2), H + 40,
         "succeeded", ""),
        (SOAK, "soaking", E(applied=True, healthy_since=H + 10, healthy_reports=2), H + 39,
         "soaking", ""),
        (SOAK, "soaking", E(applied=True, healthy_since=H + 10, healthy_reports=1), H + 300,
         "soaking", ""),
        (SOAK, "soaking", E(applied=True, healthy_since=H - 1, healthy_reports=5), H + 300,
         "soaking", ""),  # evidence from before the hand-out does not count
        ({"soak": {"reports": 3}}, "soaking", E(applied=True, healthy_since=H + 1,
                                                healthy_reports=3), H + 2, "succeeded", ""),
        (SOAK, "soaking", E(applied=True, unhealthy_at=H + 20), H + 21, "failed",
         "crash during soak"),
        (SOAK, "soaking", E(applied=True, unhealthy_at=H - 20), H + 21, "soaking", ""),
        (SOAK, "soaking", E(applied=True, failed=True, detail="rolled back: x"), H + 21, "failed",
         "rolled back: x"),
        (None, "in_flight", E(), H + 599, "in_flight", ""),
        (None, "in_flight", E(), H + 600, "timed_out", "not applied 600s after hand-out"),
        (None, "in_flight", E(online=False), H + 600, "unknown", "offline after hand-out"),
        (SOAK, "soaking", E(applied=True), H + 629, "soaking", ""),
        (SOAK, "soaking", E(applied=True), H + 630, "timed_out",
         "not healthy through the soak 630s after hand-out"),
        (SOAK, "soaking", E(applied=True, online=False), H + 630, "unknown",
         "offline after hand-out"),
        # an unknown device that comes back gets its real outcome, never a second timeout
        (SOAK, "unknown", E(), H + 5000, "unknown", ""),
        (SOAK, "unknown", E(applied=True), H + 5000, "unknown", ""),
        (SOAK, "unknown", E(failed=True, detail="bad"), H + 5000, "failed", "bad"),
        (SOAK, "unknown", E(applied=True, healthy_since=H + 4000, healthy_reports=2), H + 5000,
         "succeeded", ""),
        (SOAK, "unknown", E(applied=True, unhealthy_at=H + 4000), H + 5000, "failed",
         "crash during soak"),
        (None, "unknown", E(applied=True), H + 5000, "succeeded", ""),
        ({"prestage": True}, "staging", E(staged=True), H + 5, "staged", ""),
        ({"prestage": True}, "staging", E(failed=True, detail="bad digest"), H + 5, "failed",
         "bad digest"),
        ({"prestage": True}, "staged", E(), H + 5000, "staged", ""),  # no deadline while held
    ],
)  # fmt: skip
def test_outcomes(
    raw: dict[str, Any] | None, before: str, evidence: Evidence, now: float, after: str,
    detail: str,
) -> None:  # fmt: skip
    policy = parse_policy((raw or {}) | {"failure_threshold": {"percent": 100, "action": "pause"}})
    target = Target("d", 0, before, handed_out_at=H, outcome_at=H if before == "unknown" else None)
    other = Target("e", 0, "in_flight", handed_out_at=now)  # keeps the wave open
    prestage = bool(raw and raw.get("prestage"))
    rollout = running(promoted=-1 if prestage else 0, progress_at=now)
    done = step(policy, rollout, [target, other], {"d": evidence, "e": E()}, now)
    changed = {t.device_id: t for t in done.targets}
    got = changed.get("d", target)
    assert (got.state, got.detail) == (after, detail)
    if after != before and after in OUTCOMES:
        assert got.outcome_at == now and done.rollout.progress_at == now


def test_soak_wakes_when_it_can_end() -> None:
    sim = Sim(SOAK | {"apply_deadline_s": 1000}, 1, state="scheduled")
    sim.step(T0, d00=E())
    done = sim.step(T0 + 10, d00=E(applied=True, healthy_since=T0 + 10, healthy_reports=2))
    assert sim.state("d00") == "soaking" and done.wake_after_s == 30
    assert sim.step(T0 + 40).rollout.state == "succeeded"


def test_no_outcome_changes_after_the_rollout_ended() -> None:
    sim = Sim(None, 2, state="scheduled")
    sim.step(T0, d00=E(online=False), d01=E())
    sim.step(T0 + 600, d01=E(applied=True))
    assert sim.rollout.state == "succeeded" and sim.state("d00") == "unknown"
    done = sim.step(T0 + 700, d00=E(applied=True))  # came back after the end
    assert done.targets == () and done.wake_after_s is None and sim.state("d00") == "unknown"


# --- gates -----------------------------------------------------------------------


def test_failure_threshold_percent_aborts_naming_the_figures() -> None:
    sim = Sim({"failure_threshold": {"percent": 20, "min_reported": 10}}, 12, state="scheduled")
    sim.see(ids(12))
    sim.step(T0)
    sim.see(ids(7), applied=True)
    sim.see(["d07", "d08"], failed=True)
    done = sim.step(T0 + 10)
    assert sim.rollout.state == "running" and not done.abort  # 9 reported: below min_reported
    sim.see(["d09"], failed=True)
    done = sim.step(T0 + 11)
    assert done.abort and done.rollout.state == "aborted"
    assert done.rollout.reason == "failure threshold 20% crossed: 3 of 10 failed"
    assert done.rollout.finished_at == T0 + 11
    assert "failure threshold 20% crossed: 3 of 10 failed" in done.notes
    again = sim.step(T0 + 12)
    assert not again.abort and again.targets == ()  # aborted once


def test_timed_out_counts_as_failed_and_unknown_never_counts() -> None:
    sim = Sim({"failure_threshold": {"count": 2}}, 5, state="scheduled")
    sim.see(ids(5))
    sim.see(["d00", "d01", "d02"], online=False)
    sim.step(T0)
    sim.see(["d03"], failed=True)
    sim.step(T0 + 600)  # three unknown, one failed, one timed out
    assert sim.states() == {"unknown": 3, "failed": 1, "timed_out": 1}
    assert sim.rollout.state == "aborted"
    assert sim.rollout.reason == "failure threshold 2 crossed: 2 of 2 failed"


def test_failure_threshold_pause_then_resume_accepts_the_failures_so_far() -> None:
    raw = {"failure_threshold": {"count": 1, "action": "pause"}, "max_in_flight": 1}
    sim = Sim(raw, 4, state="scheduled")
    sim.see(ids(4))
    sim.step(T0)
    sim.see(["d00"], failed=True)
    done = sim.step(T0 + 5)
    assert done.rollout.state == "paused" and not done.abort
    assert done.rollout.reason == "failure threshold 1 crossed: 1 of 1 failed"
    assert sim.in_state("pending") == ["d01", "d02", "d03"]  # paused: nobody admitted
    sim.command("resume", T0 + 10)
    assert sim.rollout.accepted_failures == 1
    sim.step(T0 + 10)
    assert sim.rollout.state == "running" and sim.in_state("in_flight") == ["d01"]
    sim.see(["d01"], failed=True)  # a new failure: paused again
    sim.step(T0 + 11)
    assert sim.rollout.state == "paused"
    assert sim.rollout.reason == "failure threshold 1 crossed: 2 of 2 failed"


def test_paused_records_outcomes_and_abort_action_still_aborts() -> None:
    sim = Sim({"failure_threshold": {"count": 2}}, 3, state="scheduled")
    sim.see(ids(3))
    sim.step(T0)
    sim.command("pause", T0 + 1, "checking")
    assert sim.rollout.reason == "paused by operator: checking"
    sim.see(["d00"], applied=True)
    sim.step(T0 + 2)
    assert sim.state("d00") == "succeeded" and sim.rollout.state == "paused"
    sim.see(["d01", "d02"], failed=True)
    assert sim.step(T0 + 3).abort and sim.rollout.state == "aborted"


def test_quorum_pauses_when_too_few_reported() -> None:
    raw = {"quorum": {"percent": 80, "within_s": 100}, "apply_deadline_s": 1000,
           "failure_threshold": {"percent": 100}}  # fmt: skip
    sim = Sim(raw, 10, state="scheduled")
    sim.see(ids(10))
    sim.see(["d09"], online=False)
    assert sim.step(T0).wake_after_s == 100
    sim.see(ids(6), applied=True)
    assert sim.step(T0 + 99).rollout.state == "running"
    done = sim.step(T0 + 100)
    assert done.rollout.state == "paused"
    assert done.rollout.reason == (
        "reporting quorum not met: wave 0: 6 of 9 reported within 100s (need 80%)"
    )
    sim.command("resume", T0 + 200)  # restarts the wave's clock: another 100 s
    assert sim.step(T0 + 250).rollout.state == "running"
    sim.see(["d06", "d07"], applied=True)  # 8 of 9 (d09 is unknown): enough
    assert sim.step(T0 + 300).rollout.state == "running"


def test_quorum_leaves_unknown_devices_out() -> None:
    raw = {"quorum": {"percent": 100, "within_s": 700}, "failure_threshold": {"percent": 100}}
    sim = Sim(raw, [ids(4), ["x"]], state="scheduled")
    sim.see(ids(4))
    sim.see(["d03"], online=False)
    sim.step(T0)
    sim.see(ids(3), applied=True)
    sim.step(T0 + 600)  # d03 unknown; the three others succeeded: wave 0 done
    assert sim.state("d03") == "unknown" and sim.rollout.wave == 1


def test_progress_deadline_pauses_or_aborts() -> None:
    for action, state in (("pause", "paused"), ("abort", "aborted")):
        raw = {"apply_deadline_s": 5000, "progress_deadline_s": 100,
               "on_progress_deadline": action}  # fmt: skip
        sim = Sim(raw, 2, state="scheduled")
        sim.see(ids(2))
        sim.step(T0)
        sim.see(["d00"], applied=True)
        sim.step(T0 + 50)  # an outcome: the deadline moves
        assert sim.step(T0 + 149).rollout.state == "running"
        done = sim.step(T0 + 150)
        assert done.rollout.state == state and done.abort is (action == "abort")
        assert done.rollout.reason == "no progress for 100s"


# --- waves, pauses, promote ------------------------------------------------------


def test_waves_advance_when_every_device_has_an_outcome() -> None:
    sim = Sim({"strategy": "waves", "waves": [2, 2]}, 5, state="scheduled")
    sim.see(ids(5))
    sim.see(["d01"], online=False)
    sim.step(T0)
    assert sim.in_state("in_flight") == ["d00", "d01"]
    sim.step(T0 + 5)
    assert sim.rollout.wave == 0  # d00 has no outcome yet; d01 is unknown (offline)
    assert sim.state("d01") == "unknown"
    sim.see(["d00"], applied=True)
    done = sim.step(T0 + 600)  # d01 unknown: counts as done
    assert done.rollout.wave == 1 and done.rollout.wave_started_at == T0 + 600
    assert "wave 1 started (2 devices)" in done.notes
    assert sim.in_state("in_flight") == ["d02", "d03"]  # admitted in the same step
    sim.see(["d02", "d03"], applied=True)
    sim.step(T0 + 601)
    assert sim.rollout.wave == 2 and sim.in_state("in_flight") == ["d04"]
    sim.see(["d04"], applied=True)
    done = sim.step(T0 + 602)
    assert done.rollout.state == "succeeded" and done.rollout.finished_at == T0 + 602
    assert done.notes[-1] == "succeeded: 4 succeeded, 0 failed, 0 timed out, 1 unknown"
    assert done.wake_after_s is None


def test_canary_without_pause_waits_for_a_promote() -> None:
    sim = Sim({"strategy": "canary", "canary": {"count": 2}}, 6, state="scheduled")
    sim.see(ids(6))
    sim.step(T0)
    sim.see(ids(2), applied=True)
    done = sim.step(T0 + 5)
    assert done.rollout.state == "waiting_promote"
    assert done.rollout.reason == "wave 0 (canary) done: waiting for a promote"
    assert done.wake_after_s is None  # only an operator ends this wait
    quiet = sim.step(T0 + 5000)
    assert quiet.targets == () and quiet.notes == () and sim.rollout.state == "waiting_promote"
    with pytest.raises(CommandRefused):
        sim.command("resume", T0 + 5001)
    sim.command("promote", T0 + 5001)
    assert (sim.rollout.state, sim.rollout.promoted) == ("running", 1)
    done = sim.step(T0 + 5001)
    assert done.rollout.wave == 1 and len(sim.in_state("in_flight")) == 4


def test_canary_with_pause_s_waits_then_goes_on() -> None:
    sim = Sim({"strategy": "canary", "pause_s": 60}, 4, state="scheduled")
    sim.see(ids(4))
    sim.step(T0)
    sim.see(["d00"], applied=True)
    done = sim.step(T0 + 10)
    assert done.rollout.state == "running" and done.rollout.wave == 0
    assert done.rollout.reason == "wave 0 done: next wave at 2027-01-15T08:01:10Z"
    assert done.wake_after_s == 60
    assert sim.step(T0 + 40).notes == ()  # the same pause: no new note
    assert sim.step(T0 + 70).rollout.wave == 1


def test_promote_skips_a_timed_pause() -> None:
    sim = Sim({"strategy": "waves", "waves": [1], "pause_s": 600}, 3, state="scheduled")
    sim.see(ids(3))
    sim.step(T0)
    sim.see(["d00"], applied=True)
    sim.step(T0 + 1)
    assert sim.rollout.wave == 0
    sim.command("promote", T0 + 2)
    sim.step(T0 + 2)
    assert sim.rollout.wave == 1 and sim.in_state("in_flight") == ["d01", "d02"]


def test_waves_without_pause_s_go_straight_on() -> None:
    sim = Sim({"strategy": "waves", "waves": [1, 1]}, 3, state="scheduled")
    sim.see(ids(3), applied=True)
    for now in (T0, T0 + 1, T0 + 2, T0 + 3):
        sim.step(now)
    # each wave succeeds when first seen (no soak) and the next starts in the same step
    assert sim.rollout.state == "succeeded"
    assert sim.notes == [
        "started: 3 devices in 3 wave(s)", "wave 1 started (1 devices)",
        "wave 2 started (1 devices)", "succeeded: 3 succeeded, 0 failed, 0 timed out, 0 unknown",
    ]  # fmt: skip


def test_an_empty_rollout_succeeds_at_once() -> None:
    done = Sim(None, 0, state="scheduled").step(T0)
    assert done.rollout.state == "succeeded"


# --- prestage and windows --------------------------------------------------------


def test_prestage_holds_everyone_then_switches_at_activate_at() -> None:
    raw = {"strategy": "canary", "canary": {"count": 1}, "pause_s": 0, "prestage": True,
           "activate_at": "2027-01-15T09:00:00Z", "max_in_flight": 2}  # fmt: skip
    sim = Sim(raw, 4, state="scheduled")
    sim.see(ids(4))
    done = sim.step(T0)
    assert sim.states() == {"staging": 4} and done.rollout.state == "waiting_promote"
    assert done.rollout.reason == "prestaged: activation at 2027-01-15T09:00:00Z or a promote"
    assert done.wake_after_s == 3600
    sim.see(ids(3), staged=True)
    sim.step(T0 + 10)
    assert sim.states() == {"staged": 3, "staging": 1}
    assert summarize(list(sim.targets.values()), 2).staged == 3
    done = sim.step(T0 + 3600)
    assert done.rollout.state == "running" and "activated" in done.notes
    assert sim.in_state("in_flight") == ["d00"]
    sim.see(["d00"], applied=True)
    sim.step(T0 + 3601)
    assert sim.in_state("in_flight") == ["d01", "d02"]  # max_in_flight, staged or not
    assert sim.state("d03") == "staging"
    assert sim.targets["d01"].staged_at == T0 + 10


def test_prestage_without_activate_at_waits_for_a_promote() -> None:
    sim = Sim({"prestage": True}, 2, state="scheduled")
    sim.see(ids(2))
    done = sim.step(T0)
    assert done.rollout.reason == "prestaged: waiting for a promote"
    assert done.wake_after_s is None
    done = sim.command("promote", T0 + 50)
    assert sim.rollout.promoted == 0 and done.notes == ("promoted by operator (activated)",)
    sim.step(T0 + 50)
    assert sim.states() == {"in_flight": 2}
    assert sim.targets["d00"].handed_out_at == T0 + 50  # the switch's hand-out


def test_window_closed_holds_the_switch() -> None:
    sim = Sim({"window": "nightly", "max_in_flight": 1, "progress_deadline_s": 100}, 3,
              state="scheduled")  # fmt: skip
    sim.see(ids(3), window_open=False)
    done = sim.step(T0)
    assert sim.states() == {"waiting_window": 3} and done.rollout.state == "running"
    assert {t.handed_out_at for t in done.targets} == {T0}  # the held document went out
    assert sim.step(T0 + 5000).rollout.state == "running"  # no progress deadline meanwhile
    sim.see(ids(3), window_open=True)
    sim.step(T0 + 6000)
    assert sim.in_state("in_flight") == ["d00"]  # max_in_flight still holds
    assert sim.targets["d00"].handed_out_at == T0 + 6000


def test_a_device_waiting_for_its_window_records_staged() -> None:
    sim = Sim({"window": "nightly"}, 1, state="scheduled")
    sim.step(T0, d00=E(window_open=False))
    sim.step(T0 + 5, d00=E(window_open=False, staged=True))
    assert sim.state("d00") == "waiting_window" and sim.targets["d00"].staged_at == T0 + 5


def test_a_window_closing_mid_apply_does_not_stop_the_device() -> None:
    sim = Sim({"window": "nightly"}, 1, state="scheduled")
    sim.step(T0, d00=E())
    sim.step(T0 + 5, d00=E(window_open=False))
    assert sim.state("d00") == "in_flight"
    sim.step(T0 + 6, d00=E(window_open=False, applied=True))
    assert sim.rollout.state == "succeeded"


# --- waking, idempotence, terminal -----------------------------------------------


def test_stepping_again_at_the_same_time_changes_nothing() -> None:
    raw = {"strategy": "canary", "pause_s": 30, "max_in_flight": 3, "soak": {"seconds": 10},
           "rate": {"per_minute": 5}}  # fmt: skip
    sim = Sim(raw, 12, state="scheduled")
    sim.see(ids(12))
    for now in (T0, T0 + 1, T0 + 20, T0 + 61):
        if now == T0 + 1:
            sim.see(["d00"], applied=True, healthy_since=T0 + 1, healthy_reports=1)
        first = sim.step(now)
        again = step(sim.policy, sim.rollout, list(sim.targets.values()), sim.evidence, now)
        assert again.targets == () and again.notes == () and again.rollout == first.rollout
        assert again.wake_after_s == first.wake_after_s


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_terminal_states_change_nothing(state: str) -> None:
    targets = [Target("d", 0, "in_flight", handed_out_at=T0)]
    done = step(Policy(), running(state=state), targets, {"d": E(applied=True)}, T0 + 9999)
    assert done.targets == () and done.wake_after_s is None and not done.abort


def test_paused_with_nothing_in_flight_wakes_for_nothing() -> None:
    sim = Sim(None, 2)
    sim.rollout = running(state="paused")
    done = sim.step(T0 + 1, d00=E(), d01=E())
    assert done.targets == () and done.wake_after_s is None


def test_a_device_given_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        step(Policy(), running(), [Target("d", 0, "pending")] * 2, {}, T0)


# --- commands --------------------------------------------------------------------

ALLOWED = {
    "pause": {"scheduled", "running", "waiting_promote"},
    "resume": {"paused"},
    "abort": {"scheduled", "running", "paused", "waiting_promote"},
    "promote": {"waiting_promote"},
    "retry-failed": {"scheduled", "running", "paused", "waiting_promote", "succeeded"},
}


@pytest.mark.parametrize("name", COMMANDS)
@pytest.mark.parametrize(
    "state",
    ["scheduled", "running", "paused", "waiting_promote", "succeeded", "aborted", "superseded"],
)
def test_commands_by_state(name: str, state: str) -> None:
    targets = [Target("a", 0, "failed", handed_out_at=T0, outcome_at=T0),
               Target("b", 1, "pending")]  # fmt: skip
    rollout = running(state=state)
    if state in ALLOWED[name]:
        done = command(Policy(), rollout, targets, name, T0 + 1)
        assert done.notes
    else:
        with pytest.raises(CommandRefused, match=f"cannot {name}"):
            command(Policy(), rollout, targets, name, T0 + 1)


@pytest.mark.parametrize(
    ("name", "state", "reason", "abort"),
    [
        ("pause", "paused", "paused by operator: night shift", False),
        ("abort", "aborted", "aborted by operator: night shift", True),
    ],
)
def test_pause_and_abort_keep_the_reason(name: str, state: str, reason: str, abort: bool) -> None:
    done = command(Policy(), running(), [], name, T0, "night shift")
    assert (done.rollout.state, done.rollout.reason, done.abort) == (state, reason, abort)
    assert (done.rollout.finished_at is not None) is abort


def test_resume_of_a_never_started_rollout_goes_back_to_scheduled() -> None:
    paused = RolloutState(state="paused")
    assert command(Policy(), paused, [], "resume", T0).rollout.state == "scheduled"


def test_promote_needs_something_to_promote() -> None:
    with pytest.raises(CommandRefused, match="waits for no promote"):
        command(Policy(), running(), [Target("a", 0, "in_flight", T0)], "promote", T0)


def test_retry_failed_puts_failures_back_and_reopens_a_succeeded_rollout() -> None:
    sim = Sim({"failure_threshold": {"percent": 100, "min_reported": 10}}, 3, state="scheduled")
    sim.see(ids(3))
    sim.see(["d00"], failed=True)
    sim.step(T0)
    sim.step(T0 + 1)
    sim.see(["d01"], applied=True)
    sim.step(T0 + 600)
    assert sim.states() == {"failed": 1, "succeeded": 1, "timed_out": 1}
    assert sim.rollout.state == "succeeded"
    done = sim.command("retry-failed", T0 + 700)
    assert done.rollout.state == "running" and done.rollout.finished_at is None
    assert {t.device_id: (t.state, t.handed_out_at) for t in done.targets} == {
        "d00": ("pending", None), "d02": ("pending", None)}  # fmt: skip
    sim.see(["d00", "d02"], applied=True)
    sim.step(T0 + 701)
    assert sim.states() == {"in_flight": 2, "succeeded": 1}
    sim.step(T0 + 702)
    assert sim.states() == {"succeeded": 3} and sim.rollout.state == "succeeded"
    with pytest.raises(CommandRefused, match="no device failed"):
        sim.command("retry-failed", T0 + 703)


def test_retry_failed_refused_after_abort_and_unknown_command() -> None:
    targets = [Target("a", 0, "failed", handed_out_at=T0, outcome_at=T0)]
    with pytest.raises(CommandRefused, match="cannot retry-failed: the rollout is aborted"):
        command(Policy(), running(state="aborted"), targets, "retry-failed", T0)
    with pytest.raises(ValueError, match="unknown command 'rollback'"):
        command(Policy(), running(), targets, "rollback", T0)


# --- summary ---------------------------------------------------------------------


def test_summarize() -> None:
    targets = [
        Target("a", 0, "succeeded"), Target("b", 0, "failed", detail="boom"),
        Target("c", 1, "unknown"), Target("d", 1, "staged", staged_at=T0),
        Target("e", 1, "in_flight", staged_at=T0), Target("f", 2, "timed_out"),
    ]  # fmt: skip
    summary = summarize(targets, 3)
    assert set(summary.counts) == set(DEVICE_STATES)
    assert {k: v for k, v in summary.counts.items() if v} == {
        "succeeded": 1,
        "failed": 1,
        "unknown": 1,
        "staged": 1,
        "in_flight": 1,
        "timed_out": 1,
    }
    assert summary.waves[0]["succeeded"] == 1 and summary.waves[0]["failed"] == 1
    assert summary.waves[1]["unknown"] == 1 and summary.waves[2]["timed_out"] == 1
    assert summary.wave_sizes == (2, 3, 1) and summary.targeted == 6 and summary.staged == 2
    assert [t.device_id for t in summary.failed_devices] == ["b", "f"]
    assert summary.unknown_devices == ("c",)
    assert len(summarize([Target(f"u{i}", 0, "unknown") for i in range(150)], 1)
               .unknown_devices) == 100  # fmt: skip


def test_summary_as_json_is_the_views_shape() -> None:
    targets = [Target("a", 0, "succeeded"), Target("b", 1, "failed", detail="boom")]
    out = summarize(targets, 2).as_json()
    assert out["waves"][1] == {"index": 1, "size": 1, "counts": out["waves"][1]["counts"]}
    assert out["waves"][1]["counts"]["failed"] == 1 and out["counts"]["succeeded"] == 1
    assert out["failed_devices"] == [{"device_id": "b", "state": "failed", "detail": "boom"}]
    assert (out["targeted"], out["staged"], out["unknown_devices"]) == (2, 0, [])


def test_progress_deadline_at() -> None:
    policy = parse_policy({"progress_deadline_s": 100})
    assert progress_deadline_at(policy, running(progress_at=T0 + 5)) == T0 + 105
    assert progress_deadline_at(policy, running(state="paused")) is None


# --- a random fleet, run to the end ----------------------------------------------


@dataclass(frozen=True)
class Device:
    """How one simulated device behaves once it gets the switch at ``h``."""

    kind: str  # ok | fail | crash | silent
    delay_s: float
    offline: tuple[float, float]  # offline during [start, end) (relative to T0)
    window_phase: float

    def online(self, now: float) -> bool:
        return not (self.offline[0] <= now - T0 < self.offline[1])

    def evidence(self, target: Target, now: float, windows: bool) -> Evidence:
        window_open = not windows or ((now - T0 + self.window_phase) // 300) % 2 == 0
        h = target.handed_out_at
        switched = target.state in {"in_flight", "soaking", *OUTCOMES} and h is not None
        staged = h is not None and now >= h + 1
        if not switched or h is None or now < h + self.delay_s or self.kind == "silent":
            return E(online=self.online(now), staged=staged, window_open=window_open)
        ready = h + self.delay_s
        if self.kind == "fail":
            return E(online=self.online(now), failed=True, window_open=window_open)
        crash = self.kind == "crash" and now >= ready + 5
        return E(
            online=self.online(now), staged=True, applied=True, window_open=window_open,
            healthy_since=None if crash else ready + 1,
            healthy_reports=0 if crash else int((now - ready) // 3),
            unhealthy_at=ready + 5 if crash else None,
        )  # fmt: skip


def random_policy(rng: random.Random) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "apply_deadline_s": 60, "progress_deadline_s": 400,
        "failure_threshold": {"percent": rng.choice([30, 100]), "min_reported": 5,
                              "action": rng.choice(["abort", "pause"])},
    }  # fmt: skip
    strategy = rng.choice(["all-at-once", "canary", "waves"])
    raw["strategy"] = strategy
    if strategy == "canary":
        raw["canary"] = rng.choice([{"count": 3}, {"percent": 10}])
    if strategy == "waves":
        raw["waves"] = rng.sample([2, 5, "10%", "30%", "50%"], k=rng.randint(1, 3))
    if strategy != "all-at-once" and rng.random() < 0.7:
        raw["pause_s"] = rng.choice([0, 20])
    if rng.random() < 0.7:
        raw["max_in_flight"] = rng.randint(1, 10)
    if rng.random() < 0.5:
        raw["rate"] = {"per_minute": rng.choice([5, 30]), "growth_factor": 2, "growth_after": 5}
    if rng.random() < 0.5:
        raw["soak"] = {"seconds": rng.choice([0, 10]), "reports": rng.choice([0, 2])}
    if rng.random() < 0.3:
        raw["quorum"] = {"percent": 50, "within_s": 200}
    if rng.random() < 0.3:
        raw["prestage"] = True
    if rng.random() < 0.3:
        raw["window"] = "w"
    return raw


def online_in_flight(sim: Sim) -> int:
    return sum(
        1
        for t in sim.targets.values()
        if t.state in {"in_flight", "soaking"} and sim.evidence[t.device_id].online
    )


@pytest.mark.parametrize("seed", range(40))
def test_a_random_fleet_runs_to_the_end(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(10, 60)
    raw = random_policy(rng)
    sim = Sim(raw, n, state="scheduled")
    devices = {}
    for device_id in ids(n):
        start = rng.uniform(0, 400)
        devices[device_id] = Device(
            kind=rng.choices(["ok", "fail", "crash", "silent"], [80, 6, 4, 10])[0],
            delay_s=rng.uniform(1, 40),
            offline=(start, start + rng.choice([0, 30, 200, 5000])),
            window_phase=rng.uniform(0, 600),
        )
    switched: Counter[str] = Counter()
    cap = sim.policy.max_in_flight
    now = T0
    for _ in range(3000):
        sim.evidence = {
            d: devices[d].evidence(sim.targets[d], now, "window" in raw) for d in sim.targets
        }
        before = online_in_flight(sim)
        previous = dict(sim.targets)
        done = sim.step(now)
        for target in done.targets:
            if target.state == "in_flight" and previous[target.device_id].state != "in_flight":
                switched[target.device_id] += 1
        if cap is not None:
            assert online_in_flight(sim) <= max(cap, before), (seed, now)
        state = sim.rollout.state
        if state in TERMINAL:
            break
        if state == "waiting_promote":
            sim.command("promote", now)
        elif state == "paused":
            sim.command("resume", now)
        wake = done.wake_after_s
        now += min(wake if wake is not None else 5.0, 5.0)
    else:
        pytest.fail(f"seed {seed}: still {sim.rollout.state} ({sim.rollout.reason})")
    assert max(switched.values(), default=0) <= 1  # nobody switched twice
    if sim.rollout.state == "succeeded":
        assert all(t.state in OUTCOMES for t in sim.targets.values())
        assert sum(switched.values()) == n
    else:
        assert sim.rollout.state == "aborted"
        touched = [t for t in sim.targets.values() if t.handed_out_at is not None]
        assert all(t.state in DEVICE_STATES for t in touched)
