"""The jobs planner (pure) as tables: hand-outs, order, expiry, reports, deadlines,
admission (max_in_flight, rate, the failure threshold), completion."""

from __future__ import annotations

import pytest

from hub.controllers.jobs.plan import (
    Admission,
    Device,
    JobIn,
    Policy,
    Rate,
    Report,
    Tally,
    Target,
    Threshold,
    admission,
    policy_from_json,
    step,
)
from hub.controllers.rollout.policy import PolicyError

NOW = 10_000.0
ON = Device(online=True, active=True)
OFF = Device(online=False, active=True)


def job(
    job_id: str = "j",
    devices: tuple[str, ...] = ("a",),
    *,
    seq: int = 1,
    state: str = "running",
    policy: Policy | None = None,
    expires_at: float = NOW + 3600,
    deadline_s: float = 60.0,
    targets: tuple[Target, ...] | None = None,
) -> JobIn:
    rows = targets if targets is not None else tuple(Target(d, seq, "queued") for d in devices)
    return JobIn(job_id, state, deadline_s, expires_at, policy or Policy(), rows)


def handed(device: str, at: float = NOW - 10, seq: int = 1, **kw: object) -> Target:
    return Target(device, seq, kw.pop("state", "queued"), handed_out_at=at, **kw)  # type: ignore[arg-type]


def after(decided_targets: tuple[tuple[str, Target, Target], ...]) -> dict[tuple[str, str], Target]:
    return {(j, new.device_id): new for j, _, new in decided_targets}


# ---------------------------------------------------------------- hand-outs


def test_a_queued_job_is_handed_out_to_online_devices_only() -> None:
    decided = step([job(devices=("a", "b"))], {"a": ON, "b": OFF}, NOW)
    rows = after(decided.targets)
    assert rows[("j", "a")].handed_out_at == NOW and rows[("j", "a")].state == "queued"
    assert ("j", "b") not in rows  # offline: waits
    assert decided.documents == ("a",)


def test_a_devices_jobs_are_handed_out_in_seq_order() -> None:
    """The earlier job is rate-limited on device a: the later one waits behind it there,
    but not on device b, where the earlier job was already handed out."""
    limited = Policy(rate=Rate(per_minute=1))
    first = job("first", seq=1, policy=limited,
                targets=(Target("a", 1, "queued"), handed("b", at=NOW - 5)))  # fmt: skip
    second = job("second", devices=("a", "b"), seq=2)
    decided = step([second, first], {"a": ON, "b": ON}, NOW)
    rows = after(decided.targets)
    assert ("first", "a") not in rows  # rate: one hand-out in the last minute already
    assert ("second", "a") not in rows  # blocked behind "first" on device a
    assert rows[("second", "b")].handed_out_at == NOW
    assert decided.wake_after_s == pytest.approx(55.0)  # the rate slot frees


def test_a_paused_job_blocks_nobody() -> None:
    paused = job("p", seq=1, state="paused")
    later = job("l", seq=2)
    rows = after(step([paused, later], {"a": ON}, NOW).targets)
    assert rows[("l", "a")].handed_out_at == NOW and ("p", "a") not in rows


def test_a_device_carries_at_most_max_open_jobs() -> None:
    busy = [job(f"b{i}", seq=i, targets=(handed("a", seq=i),)) for i in range(3)]
    decided = step([*busy, job("new", seq=9)], {"a": ON}, NOW, max_open_per_device=3)
    assert ("new", "a") not in after(decided.targets)


@pytest.mark.parametrize(
    ("max_in_flight", "in_flight", "queued", "expected"),
    [
        pytest.param(2, 0, 5, 2, id="fills-the-window"),
        pytest.param(2, 1, 5, 1, id="one-slot-left"),
        pytest.param(2, 2, 5, 0, id="full"),
        pytest.param(None, 3, 5, 5, id="no-limit"),
    ],
)
def test_max_in_flight(
    max_in_flight: int | None, in_flight: int, queued: int, expected: int
) -> None:
    flying = tuple(handed(f"f{i}") for i in range(in_flight))
    waiting = tuple(Target(f"q{i}", 1, "queued") for i in range(queued))
    devices = {t.device_id: ON for t in flying + waiting}
    decided = step([job(policy=Policy(max_in_flight=max_in_flight), targets=flying + waiting)],
                   devices, NOW)  # fmt: skip
    assert sum(1 for _, b, a in decided.targets if b.handed_out_at is None and a.handed_out_at) == (
        expected
    )


def test_an_offline_device_does_not_hold_an_in_flight_slot() -> None:
    targets = (handed("gone"), Target("q", 1, "queued"))
    decided = step([job(policy=Policy(max_in_flight=1), targets=targets)],
                   {"gone": OFF, "q": ON}, NOW)  # fmt: skip
    assert after(decided.targets)[("j", "q")].handed_out_at == NOW


# ---------------------------------------------------------------- admission (the seam)


@pytest.mark.parametrize(
    ("rate", "succeeded", "recent", "slots"),
    [
        pytest.param(Rate(10), 0, 0, 10, id="fresh"),
        pytest.param(Rate(10), 0, 4, 6, id="some-used"),
        pytest.param(Rate(10), 0, 10, 0, id="used-up"),
        pytest.param(Rate(10, 2.0, 5), 5, 10, 10, id="grew-once"),
        pytest.param(Rate(10, 2.0, 5), 12, 10, 30, id="grew-twice"),
    ],
)
def test_rate_with_growth(rate: Rate, succeeded: int, recent: int, slots: int) -> None:
    times = tuple(NOW - 1 for _ in range(recent)) + (NOW - 61,) * 7  # old ones do not count
    tally = Tally(targeted=100, succeeded=succeeded, failed=0, in_flight=0, handed_out_at=times)
    assert admission(Policy(rate=rate), tally, NOW).slots == slots


@pytest.mark.parametrize(
    ("threshold", "succeeded", "failed", "stop"),
    [
        pytest.param(Threshold(count=3), 10, 2, None, id="count-below"),
        pytest.param(Threshold(count=3), 10, 3, "abort", id="count-reached"),
        pytest.param(Threshold(percent=20), 8, 2, "abort", id="percent-reached"),
        pytest.param(Threshold(percent=20), 9, 2, None, id="percent-below"),
        pytest.param(Threshold(percent=20, min_reported=5), 0, 4, None, id="too-few-reported"),
        pytest.param(Threshold(percent=20, action="pause"), 0, 1, "pause", id="pause"),
    ],
)
def test_failure_threshold(threshold: Threshold, succeeded: int, failed: int, stop: str) -> None:
    tally = Tally(targeted=50, succeeded=succeeded, failed=failed, in_flight=0, handed_out_at=())
    gate = admission(Policy(failure_threshold=threshold), tally, NOW)
    assert gate.stop == stop
    if stop is not None:
        assert gate.slots == 0 and f"{failed} of {succeeded + failed}" in gate.note


def test_no_policy_admits_everything() -> None:
    tally = Tally(targeted=9, succeeded=0, failed=9, in_flight=9, handed_out_at=(NOW,) * 9)
    assert admission(Policy(), tally, NOW) == Admission(None)


def test_crossing_the_threshold_aborts_and_cancels_what_is_queued() -> None:
    policy = Policy(failure_threshold=Threshold(count=1))
    targets = (
        handed("bad", state="failed", finished_at=NOW - 1, exit_code=1),
        handed("ok", state="succeeded", finished_at=NOW - 1, exit_code=0),
        handed("waiting"),
        Target("later", 1, "queued"),
    )
    decided = step([job(policy=policy, targets=targets)], {d.device_id: ON for d in targets}, NOW)
    rows = after(decided.targets)
    assert rows[("j", "later")].state == "canceled"
    assert rows[("j", "waiting")].state == "canceled"  # handed out, never started: leaves
    assert decided.documents == ("waiting",)
    (change,) = decided.jobs
    assert (change.state, change.finished) == ("aborted", True)
    assert change.reason == "failure threshold 1 crossed: 1 of 2 reported failed"


def test_crossing_a_pause_threshold_stops_hand_outs_only() -> None:
    policy = Policy(failure_threshold=Threshold(count=1, action="pause"))
    targets = (handed("bad", state="timed_out", finished_at=NOW - 1), Target("later", 1, "queued"))
    decided = step([job(policy=policy, targets=targets)], {"bad": ON, "later": ON}, NOW)
    assert decided.targets == ()  # "later" stays queued, not handed out
    assert [(c.state, c.finished) for c in decided.jobs] == [("paused", False)]


# ---------------------------------------------------------------- reports, deadlines, expiry


@pytest.mark.parametrize(
    ("report", "state", "exit_code", "message"),
    [
        pytest.param(
            Report("running", started_at=NOW - 2), "in_progress", None, None, id="running"
        ),
        pytest.param(
            Report("succeeded", 0, started_at=NOW - 2, finished_at=NOW - 1),
            "succeeded",
            0,
            None,
            id="succeeded",
        ),
        pytest.param(
            Report("failed", 3, "exited with code 3", "oops\n", NOW - 2, NOW - 1),
            "failed",
            3,
            "exited with code 3",
            id="failed",
        ),
        pytest.param(
            Report("timed_out", -15, "deadline passed", None, NOW - 9, NOW - 1),
            "timed_out",
            -15,
            "deadline passed",
            id="timed-out",
        ),
        pytest.param(
            Report("failed", message="expired", finished_at=NOW - 1),
            "expired",
            None,
            "expired before it started (the device refused it)",
            id="refused-expired",
        ),
    ],
)
def test_the_devices_report_moves_a_handed_out_row(
    report: Report, state: str, exit_code: int | None, message: str | None
) -> None:
    device = Device(online=True, active=True, reports={"j": report})
    rows = after(step([job(targets=(handed("a"),))], {"a": device}, NOW).targets)
    row = rows[("j", "a")]
    assert (row.state, row.exit_code, row.message) == (state, exit_code, message)


def test_a_report_of_a_job_never_handed_out_is_ignored() -> None:
    device = Device(online=False, active=True, reports={"j": Report("succeeded", 0)})
    assert step([job()], {"a": device}, NOW).targets == ()


def test_a_device_clock_cannot_move_the_start_before_the_hand_out() -> None:
    device = Device(online=True, active=True, reports={"j": Report("running", started_at=1.0)})
    row = after(step([job(targets=(handed("a", at=NOW - 10),))], {"a": device}, NOW).targets)
    assert row[("j", "a")].started_at == NOW - 10


def test_in_progress_past_deadline_and_grace_times_out() -> None:
    running = handed("a", state="in_progress", started_at=NOW - 100)
    on_time = step([job(deadline_s=60, targets=(running,))], {"a": ON}, NOW, grace_s=50)
    assert on_time.targets == () and on_time.wake_after_s == pytest.approx(10.0)
    late = step([job(deadline_s=60, targets=(running,))], {"a": ON}, NOW, grace_s=30)
    assert after(late.targets)[("j", "a")].state == "timed_out"


@pytest.mark.parametrize(
    ("row", "why"),
    [
        pytest.param(Target("a", 1, "queued"), "not handed out before expires_at", id="queued"),
        pytest.param(handed("a"), "never started before expires_at", id="handed-out"),
    ],
)
def test_past_expires_at_a_job_that_did_not_start_expires(row: Target, why: str) -> None:
    decided = step([job(expires_at=NOW, targets=(row,))], {"a": OFF}, NOW)
    expired = after(decided.targets)[("j", "a")]
    assert (expired.state, expired.message) == ("expired", why)
    assert [(c.state, c.reason) for c in decided.jobs] == [("completed", "1 expired")]


def test_a_job_already_running_does_not_expire() -> None:
    running = handed("a", state="in_progress", started_at=NOW - 1)
    assert step([job(expires_at=NOW - 5, targets=(running,))], {"a": ON}, NOW).targets == ()


def test_a_gone_device_cancels_its_row() -> None:
    decided = step([job(devices=("a", "b"))], {"b": Device(False, False)}, NOW)
    rows = after(decided.targets)
    assert rows[("j", "a")].state == rows[("j", "b")].state == "canceled"


def test_a_job_completes_when_every_row_is_final_and_waits_otherwise() -> None:
    done = (handed("a", state="succeeded", finished_at=NOW), handed("b", state="failed"))
    decided = step([job(targets=done)], {"a": ON, "b": ON}, NOW)
    assert [(c.state, c.reason) for c in decided.jobs] == [("completed", "1 succeeded, 1 failed")]
    waiting = step([job(targets=(*done, handed("c")))], {"a": ON, "b": ON, "c": ON}, NOW)
    assert waiting.jobs == () and waiting.wake_after_s == pytest.approx(3600.0)


def test_a_canceled_job_still_records_the_results_of_devices_that_started_it() -> None:
    device = Device(online=True, active=True, reports={"j": Report("succeeded", 0)})
    running = handed("a", state="in_progress", started_at=NOW - 1)
    decided = step([job(state="canceled", targets=(running,))], {"a": device}, NOW)
    assert after(decided.targets)[("j", "a")].state == "succeeded" and decided.jobs == ()


# ---------------------------------------------------------------- the stored policy


def test_the_stored_policy_is_read_back() -> None:
    raw = {
        "max_in_flight": 5,
        "rate": {"per_minute": 10, "growth_factor": 2.0, "growth_after": 3},
        "failure_threshold": {"min_reported": 2, "action": "pause"},
    }
    assert policy_from_json(raw) == Policy(5, Rate(10, 2.0, 3), Threshold(None, 20.0, 2, "pause"))
    assert policy_from_json(None) == Policy()


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"rate": {"per_minute": 0}}, id="rate-zero"),
        pytest.param({"max_in_flight": "5"}, id="not-a-number"),
        pytest.param({"failure_threshold": {"action": "retry"}}, id="bad-action"),
    ],
)
def test_a_bad_stored_policy_is_refused(raw: dict[str, object]) -> None:
    with pytest.raises(PolicyError):
        policy_from_json(raw)
