"""The sans-I/O supervisor: scenarios pushed through it with simulated time."""

from __future__ import annotations

import random

from edge_agent.core import HealthFailed, HealthPassed, WorkloadExited
from edge_agent.supervisor.machine import (
    Adopt,
    Exited,
    Probe,
    ProbeDone,
    Release,
    Reloaded,
    Spawn,
    Spawned,
    SpawnFailed,
    Supervise,
    Supervisor,
    SupervisorAction,
    Tick,
    Unwatch,
    Watch,
)
from edge_agent.supervisor.spec import HealthSpec, HttpGet, RestartPolicy

CRASHY = RestartPolicy(mode="on-failure", attempts=3, interval_s=600, delay_s=1, max_delay_s=8)
HTTP = HealthSpec(
    checks=(HttpGet(8080, interval_s=1.0, failures=2),), min_healthy_s=2, deadline_s=30
)


def machine() -> Supervisor:
    return Supervisor(jitter=random.Random(7).random, floor_s=0.5)


def core_events(actions: list[SupervisorAction]) -> list[object]:
    return [a for a in actions if isinstance(a, WorkloadExited | HealthPassed | HealthFailed)]


def run_until(sup: Supervisor, end: float, answer_probe: bool = True) -> list[SupervisorAction]:
    """Tick at every wakeup until ``end``; probes answer ok at once; spawns succeed."""
    out: list[SupervisorAction] = []
    pid = 1000
    while (at := sup.next_wakeup()) is not None and at <= end:
        pending = sup.handle(Tick(at))
        while pending:
            action = pending.pop(0)
            out.append(action)
            if isinstance(action, Spawn):
                pid += 1
                pending += sup.handle(Spawned(action.instance, pid, at))
            elif isinstance(action, Probe):
                pending += sup.handle(
                    ProbeDone(action.instance, action.run, action.index, answer_probe, "x", at)
                )
    return out


def test_a_crash_loop_backs_off_then_fails_and_stays_stopped() -> None:
    sup = machine()
    assert sup.handle(Supervise("c.g1", "c", CRASHY, HealthSpec(min_healthy_s=0), 0.0)) == [
        Spawn("c.g1", "c")
    ]
    now, delays, seen = 0.0, [], []
    for _ in range(4):
        seen += sup.handle(Spawned("c.g1", 1, now))
        seen += sup.handle(Exited("c.g1", 3, now + 0.1))
        wake = sup.next_wakeup()
        if wake is None:
            break
        delays.append(round(wake - (now + 0.1), 2))
        assert sup.handle(Tick(wake - 0.01)) == []  # not before its time
        assert sup.handle(Tick(wake)) == [Spawn("c.g1", "c")]
        now = wake
    exits = [e for e in seen if isinstance(e, WorkloadExited)]
    assert [e.restarting for e in exits] == [True, True, True, False]
    assert 0.75 <= delays[0] <= 1.25 and 1.5 <= delays[1] <= 2.5 and 3 <= delays[2] <= 5
    view = sup.view("c.g1")
    assert view is not None and (view.state, view.restarts) == ("failed", 3)
    assert "3 restarts" in view.reason and sup.next_wakeup() is None
    assert sup.handle(Tick(now + 3600)) == []  # failed takes no further action


def test_spawn_failure_counts_as_a_failed_attempt() -> None:
    sup = machine()
    sup.handle(Supervise("x.g1", "x", RestartPolicy(attempts=0), HealthSpec(), 0.0))
    actions = sup.handle(SpawnFailed("x.g1", "no such file: bin/x", 0.0))
    assert actions == [WorkloadExited("x", None, False, 0.0)]
    view = sup.view("x.g1")
    assert view is not None and "cannot start: no such file" in view.reason


def test_healthy_after_checks_pass_for_min_healthy_time() -> None:
    sup = machine()
    sup.handle(Supervise("w.g1", "w", CRASHY, HTTP, 0.0))
    first = sup.handle(Spawned("w.g1", 10, 0.0))
    assert first == [] and sup.next_wakeup() == 0.5
    out = run_until(sup, 3.0)
    probes = [a for a in out if isinstance(a, Probe)]
    assert [p.run for p in probes] == [1, 1, 1]
    assert core_events(out) == [HealthPassed("w", 2.5)]  # first pass at 0.5, + 2 s


def test_never_healthy_fails_at_the_deadline() -> None:
    sup = machine()
    sup.handle(Supervise("w.g1", "w", CRASHY, HTTP, 0.0))
    sup.handle(Spawned("w.g1", 10, 0.0))
    out = run_until(sup, 31.0, answer_probe=False)
    failed = core_events(out)
    assert len(failed) == 1 and isinstance(failed[0], HealthFailed)
    assert failed[0].reason.startswith("not healthy within 30 s: http GET :8080/ not passing")


def test_healthy_turns_unhealthy_after_consecutive_failures_and_back() -> None:
    sup = machine()
    sup.handle(Supervise("w.g1", "w", CRASHY, HTTP, 0.0))
    sup.handle(Spawned("w.g1", 10, 0.0))
    run_until(sup, 3.0)
    out = run_until(sup, 6.0, answer_probe=False)
    assert [type(e).__name__ for e in core_events(out)] == ["HealthFailed"]
    out = run_until(sup, 12.0)
    assert [type(e).__name__ for e in core_events(out)] == ["HealthPassed"]


def test_unwatched_events_are_held_until_watch_in_order() -> None:
    sup = machine()
    sup.handle(Supervise("w.g2", "w", CRASHY, HealthSpec(min_healthy_s=1), 0.0, watched=False))
    sup.handle(Spawned("w.g2", 10, 0.0))
    assert sup.handle(Exited("w.g2", 1, 0.5)) == []
    assert run_until(sup, 5.0) == [Spawn("w.g2", "w")]  # restarted, healthy: all held
    released = sup.handle(Watch("w.g2", 5.0))
    assert [type(e).__name__ for e in released] == ["WorkloadExited", "HealthPassed"]


def test_an_unwatched_instance_holds_its_events_again_until_watched() -> None:
    """A hand-over's outgoing instance: the core does not hear it while the new one runs."""
    sup = machine()
    sup.handle(Supervise("w.g1", "w", CRASHY, HealthSpec(min_healthy_s=1), 0.0))
    sup.handle(Spawned("w.g1", 10, 0.0))
    assert [type(e).__name__ for e in core_events(run_until(sup, 2.0))] == ["HealthPassed"]
    assert sup.handle(Unwatch("w.g1", 2.0)) == []
    assert sup.handle(Exited("w.g1", 1, 2.5)) == []
    assert core_events(run_until(sup, 6.0)) == []  # restarted and healthy again: held
    released = sup.handle(Watch("w.g1", 6.0))
    assert [type(e).__name__ for e in released] == ["WorkloadExited", "HealthPassed"]
    assert sup.handle(Unwatch("gone", 6.0)) == []  # an unknown instance: nothing


def test_stale_probe_answers_and_released_instances_are_ignored() -> None:
    sup = machine()
    sup.handle(Supervise("w.g1", "w", CRASHY, HTTP, 0.0))
    sup.handle(Spawned("w.g1", 10, 0.0))
    sup.handle(Exited("w.g1", 1, 0.2))
    sup.handle(Tick(10.0))
    sup.handle(Spawned("w.g1", 11, 10.0))
    assert sup.handle(ProbeDone("w.g1", 1, 0, True, "old run", 10.1)) == []
    sup.handle(Release("w.g1", 10.2))
    assert sup.view("w.g1") is None and sup.next_wakeup() is None
    assert sup.handle(Exited("w.g1", 1, 11.0)) == []


def test_adopted_process_is_watched_and_reload_rejudges_health() -> None:
    sup = machine()
    sup.handle(Adopt("w.g1", "w", CRASHY, HTTP, 4242, 100.0, 500.0))
    out = run_until(sup, 503.0)
    assert core_events(out) == [HealthPassed("w", 502.5)]
    sup.handle(Reloaded("w.g1", 600.0))
    assert run_until(sup, 603.0) != [] and sup.view("w.g1").healthy  # type: ignore[union-attr]
    assert core_events(sup.handle(Watch("w.g1", 603.0))) == [HealthPassed("w", 602.5)]
    assert core_events(sup.handle(Exited("w.g1", None, 700.0))) == [
        WorkloadExited("w", None, True, 700.0)
    ]


def test_thousands_of_devices_are_cheap() -> None:
    sups = [machine() for _ in range(2000)]
    for n, sup in enumerate(sups):
        sup.handle(Supervise(f"w.g{n}", "w", CRASHY, HealthSpec(min_healthy_s=1), 0.0))
        sup.handle(Spawned(f"w.g{n}", n, 0.0))
    assert all(core_events(s.handle(Tick(1.0))) == [HealthPassed("w", 1.0)] for s in sups)
