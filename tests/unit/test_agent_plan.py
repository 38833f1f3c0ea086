"""Plan and execute: the planner as a table, then the core through health-gated rollouts.

The runtime that supervises processes comes with the next issue; here the
core is told it supervises (``supervises=True``) and the tests play the
supervisor's events (``HealthPassed``, ``HealthFailed``, ``WorkloadExited``)
and the driver's timer (``TimerFired``).
"""

from __future__ import annotations

import pytest

from edge_agent.core import (
    Action,
    AgentCore,
    AgentState,
    Booted,
    CancelTimer,
    Commit,
    Connected,
    Connecting,
    DesiredPayload,
    FetchBundles,
    HealthFailed,
    HealthPassed,
    Ignored,
    Install,
    NoOp,
    Publish,
    RollBack,
    SetTimer,
    StartWorkload,
    StepDone,
    StepFailed,
    StopWorkload,
    Subscribed,
    Switch,
    TimerFired,
    WaitForHealth,
    WorkloadExited,
)
from edge_agent.executors import ExecutorTable, action_types
from edge_agent.plan import Current, Rollout, WorkloadSpec, plan
from edge_agent.supervisor.spec import parse_entry
from protocols import Desired, Reported, decode, encode

A, B = "aa" * 32, "bb" * 32


def doc(gen: int, *workloads: tuple[str, str], **config: object) -> Desired:
    body: dict[str, object] = dict(config)
    if workloads:
        body["workloads"] = [{"name": n, "bundle": b} for n, b in workloads]
    return Desired(device_id="d1", generation=gen, config=body, issued_at=1.0)


def kinds(steps: list[object]) -> list[str]:
    return [type(s).__name__ for s in steps]


PUMP = doc(2, ("pump", A))
PUMP_SPECS = (WorkloadSpec("pump", A),)

PLANS = [
    pytest.param(Current(1), Rollout(doc(2, x=1)), ["Switch", "Commit"], id="plain-config"),
    pytest.param(
        Current(1),
        Rollout(PUMP, PUMP_SPECS),
        ["FetchBundles", "Install", "Switch", "Commit"],
        id="bundles-unsupervised",
    ),
    pytest.param(
        Current(1), Rollout(PUMP, PUMP_SPECS, fetched=True), ["Install", "Switch", "Commit"],
        id="after-the-fetch",
    ),
    pytest.param(
        Current(1, supervises=True, running=frozenset({"old"})),
        Rollout(PUMP, PUMP_SPECS),
        ["FetchBundles", "Install", "Switch", "StopWorkload", "StartWorkload", "WaitForHealth",
         "Commit"],
        id="supervised-stops-what-goes-starts-what-comes",
    ),
    pytest.param(
        Current(1, supervises=True),
        Rollout(PUMP, PUMP_SPECS, True, True, True, started=frozenset({"pump"}),
                waiting_health=True),
        [],
        id="waiting-for-health-is-an-empty-plan",
    ),
    pytest.param(
        Current(1, supervises=True),
        Rollout(PUMP, PUMP_SPECS, True, True, True, started=frozenset({"pump"}),
                healthy=frozenset({"pump"}), waiting_health=True),
        ["Commit"],
        id="healthy-commits",
    ),
    pytest.param(
        Current(1), Rollout(PUMP, PUMP_SPECS, committed=True), ["NoOp"], id="committed-no-op"
    ),
    pytest.param(
        Current(1), Rollout(PUMP, PUMP_SPECS, failure="bad"), ["NoOp"], id="failed-before-switch"
    ),
    pytest.param(
        Current(1),
        Rollout(PUMP, PUMP_SPECS, True, True, True, failure="unhealthy"),
        ["RollBack"],
        id="failed-after-switch-rolls-back",
    ),
    pytest.param(
        Current(1),
        Rollout(PUMP, PUMP_SPECS, True, True, True, failure="unhealthy", rolled_back=True),
        ["NoOp"],
        id="rolled-back-no-op",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("current", "rollout", "expected"), PLANS)
def test_plan(current: Current, rollout: Rollout, expected: list[str]) -> None:
    assert kinds(plan(current, rollout)) == expected


def test_a_rollback_goes_to_the_applied_generation() -> None:
    (step,) = plan(Current(7), Rollout(PUMP, PUMP_SPECS, True, True, True, failure="why"))
    assert step == RollBack(2, 7, "why")


def test_a_failed_rollback_ends_the_rollout() -> None:
    rollout = Rollout(PUMP, PUMP_SPECS, True, True, True, failure="unhealthy")
    after = rollout.failed(RollBack(2, 1, "unhealthy"), "disk gone")
    assert after.rollback_failed and kinds(plan(Current(1), after)) == ["NoOp"]
    assert after.failure == "unhealthy; rolling back failed too: disk gone"


# ---------------------------------------------------------------- the core, supervised


def supervised(health_timeout_s: float = 30.0) -> AgentCore:
    core = AgentCore("d1", AgentState(applied_generation=1), "t", supervises=True,
                     health_timeout_s=health_timeout_s)  # fmt: skip
    for event in (Booted(1.0), Connecting(1.0), Connected(1.0, False), Subscribed(1.0)):
        core.handle(event)
    return core


def run_until_health(core: AgentCore, desired: Desired) -> list[Action]:
    """Feed the document and answer every step up to the wait for health."""
    actions = core.handle(DesiredPayload(encode(desired), 10.0))
    while not isinstance(core.step, WaitForHealth):
        step = core.step
        assert step is not None, actions
        actions = core.handle(StepDone(step, 11.0))
    return actions


def reports(actions: list[Action]) -> list[Reported]:
    return [
        decode(a.payload, Reported)
        for a in actions
        if isinstance(a, Publish) and a.topic.endswith("/reported")
    ]


def test_a_healthy_rollout_commits_and_reports_its_workloads() -> None:
    core = supervised()
    actions = run_until_health(core, PUMP)
    assert SetTimer("health:2", 11.0 + 30.0) in actions
    assert isinstance(actions[-1], WaitForHealth) and actions[-1].names == ("pump",)
    assert core.handle(StepDone(actions[-1], 11.0)) == []  # now watching: wait for events
    actions = core.handle(HealthPassed("pump", 12.0))
    assert kinds(actions) == ["CancelTimer", "Commit"]
    done = core.handle(StepDone(actions[-1], 13.0))  # type: ignore[arg-type]
    (report,) = reports(done)
    assert (report.phase, report.generation, report.applied_generation) == ("applied", 2, 2)
    assert report.workloads is not None
    assert [(w.name, w.state) for w in report.workloads] == [("pump", "healthy")]
    assert core.state.applied_generation == 2


def test_a_failed_health_check_rolls_back_and_the_generation_is_not_retried() -> None:
    core = supervised()
    watch = run_until_health(core, PUMP)[-1]
    core.handle(StepDone(watch, 11.0))  # type: ignore[arg-type]
    actions = core.handle(HealthFailed("pump", "no answer on :8080", 12.0))
    assert kinds(actions) == ["CancelTimer", "RollBack"]
    rollback = actions[-1]
    assert rollback == RollBack(2, 1, "workload pump: no answer on :8080")
    done = core.handle(StepDone(rollback, 13.0))  # type: ignore[arg-type]
    (report,) = reports(done)
    assert (report.phase, report.generation) == ("rolled_back", 2)
    assert (report.applied_generation, report.failed_generation) == (1, 2)
    assert report.error == "workload pump: no answer on :8080"
    assert report.workloads is not None and report.workloads[0].state == "rolled_back"
    again = core.handle(DesiredPayload(encode(PUMP), 14.0))
    assert kinds(again) == ["Ignored"]  # recorded as failed: not retried


def test_the_health_deadline_rolls_back() -> None:
    core = supervised(health_timeout_s=5.0)
    watch = run_until_health(core, PUMP)[-1]
    core.handle(StepDone(watch, 11.0))  # type: ignore[arg-type]
    actions = core.handle(TimerFired("health:2", 16.0))
    assert kinds(actions) == ["RollBack"]
    assert "not healthy within 5 s" in actions[0].reason  # type: ignore[union-attr]


def test_a_workload_that_exits_while_starting_rolls_back() -> None:
    core = supervised()
    run_until_health(core, PUMP)
    actions = core.handle(WorkloadExited("pump", 3, True, 12.0))
    assert kinds(actions) == ["CancelTimer"]  # the watch step is still in flight
    (rollback,) = core.handle(StepDone(WaitForHealth(2, ("pump",), 30.0), 12.5))
    assert isinstance(rollback, RollBack) and "exited with code 3" in rollback.reason


def test_a_failed_start_fails_after_the_switch_so_it_rolls_back() -> None:
    core = supervised()
    core.handle(DesiredPayload(encode(PUMP), 10.0))
    while not isinstance(core.step, StartWorkload):
        core.handle(StepDone(core.step, 11.0))  # type: ignore[arg-type]
    (rollback,) = core.handle(StepFailed(core.step, "exec format error", 12.0))
    assert rollback == RollBack(2, 1, "exec format error")


def test_a_stale_timer_is_ignored() -> None:
    core = supervised()
    assert kinds(core.handle(TimerFired("health:9", 1.0))) == ["Ignored"]


def test_a_running_workload_that_exits_is_reported_as_an_event() -> None:
    core = supervised()
    watch = run_until_health(core, PUMP)[-1]
    core.handle(StepDone(watch, 11.0))  # type: ignore[arg-type]
    commit = core.handle(HealthPassed("pump", 12.0))[-1]
    core.handle(StepDone(commit, 13.0))  # type: ignore[arg-type]
    (report,) = reports(core.handle(WorkloadExited("pump", 137, True, 20.0)))
    assert (report.phase, report.generation) == ("applied", 2)
    assert report.workloads is not None
    (pump,) = report.workloads
    assert (pump.state, pump.restarts, pump.last_exit_code, pump.last_exit_at) == (
        "starting", 1, 137, 20.0,
    )  # fmt: skip
    (report,) = reports(core.handle(HealthPassed("pump", 21.0)))
    assert report.workloads is not None and report.workloads[0].state == "healthy"
    assert core.handle(HealthPassed("pump", 22.0)) == []  # no change, no report
    assert kinds(core.handle(HealthFailed("nobody", "?", 23.0))) == ["Ignored"]


def test_an_unsupervising_runtime_gets_no_start_or_health_steps() -> None:
    core = AgentCore("d1", AgentState(), "t")
    for event in (Booted(1.0), Connecting(1.0), Connected(1.0, False), Subscribed(1.0)):
        core.handle(event)
    seen = core.handle(DesiredPayload(encode(PUMP), 10.0))
    while core.step is not None:
        seen += core.handle(StepDone(core.step, 11.0))
    steps = [a for a in seen if isinstance(a, FetchBundles | Install | Switch | Commit | NoOp)]
    assert kinds(steps) == ["FetchBundles", "Install", "Switch", "Commit", "NoOp"]
    assert not [a for a in seen if isinstance(a, StartWorkload | StopWorkload | WaitForHealth)]
    assert not [a for a in seen if isinstance(a, SetTimer | CancelTimer | Ignored)]


# ---------------------------------------------------------------- the executor table


def test_the_executor_table_is_typed_complete_and_refuses_a_second_entry() -> None:
    table: ExecutorTable[str] = ExecutorTable()
    table.register(Commit, lambda step: f"commit {step.generation}")
    assert table.run(Commit(4)) == "commit 4"
    with pytest.raises(ValueError, match="already"):
        table.register(Commit, lambda step: "again")
    assert "Switch" in table.missing() and "Commit" not in table.missing()
    with pytest.raises(TypeError, match=r"no executor for .*Switch"):
        table.require_complete()
    assert {"FetchBundles", "WaitForHealth", "NoOp", "Publish", "SetTimer"} <= {
        t.__name__ for t in action_types()
    }


# ---------------------------------------------------------------- only what changed (issue 13)


def commit_healthy(core: AgentCore, desired: Desired) -> list[Action]:
    """Run ``desired`` in, every started workload healthy; returns the commit's actions."""
    watch = run_until_health(core, desired)[-1]
    assert isinstance(watch, WaitForHealth)
    core.handle(StepDone(watch, 11.0))
    actions: list[Action] = []
    for name in watch.names:
        actions = core.handle(HealthPassed(name, 12.0))
    commit = actions[-1]
    assert isinstance(commit, Commit), actions
    return core.handle(StepDone(commit, 13.0))


def test_a_supervised_rollout_starts_only_what_changed_in_dependency_order() -> None:
    core = supervised()
    first = Desired(
        device_id="d1",
        generation=2,
        config={"workloads": [
            {"name": "web", "bundle": A, "depends_on": ["db"]},
            {"name": "db", "bundle": B},
            {"name": "crashy", "bundle": B},
        ]},
        issued_at=1.0,
    )  # fmt: skip
    seen = run_until_health(core, first)
    assert [a.name for a in seen if isinstance(a, StartWorkload)] == []  # one at a time
    assert core.step == WaitForHealth(2, ("db", "web", "crashy"), 30.0)
    commit_healthy_rest = core.handle(StepDone(core.step, 11.0))
    assert commit_healthy_rest == []
    for name in ("db", "web"):
        core.handle(HealthPassed(name, 12.0))
    commit = core.handle(HealthPassed("crashy", 12.0))[-1]
    core.handle(StepDone(commit, 13.0))  # type: ignore[arg-type]
    # crashy crash-loops and gives up: failed, stays stopped
    core.handle(WorkloadExited("crashy", 1, False, 20.0))
    assert core.workloads["crashy"].state == "failed"
    # the next generation changes only web's config: crashy neither starts nor blocks
    second = Desired(
        device_id="d1",
        generation=3,
        config={"workloads": [
            {"name": "web", "bundle": A, "depends_on": ["db"], "config": {"v": 2}},
            {"name": "db", "bundle": B},
            {"name": "crashy", "bundle": B},
        ]},
        issued_at=2.0,
    )  # fmt: skip
    starts: list[str] = []
    core.handle(DesiredPayload(encode(second), 30.0))
    while not isinstance(core.step, WaitForHealth):
        step = core.step
        if isinstance(step, StartWorkload):
            starts.append(step.name)
        core.handle(StepDone(step, 31.0))  # type: ignore[arg-type]
    assert starts == ["web"] and core.step.names == ("web",)
    core.handle(StepDone(core.step, 31.0))
    core.handle(WorkloadExited("crashy", 1, False, 31.5))  # not in this rollout: no rollback
    commit = core.handle(HealthPassed("web", 32.0))[-1]
    (report,) = reports(core.handle(StepDone(commit, 33.0)))  # type: ignore[arg-type]
    assert report.phase == "applied" and report.workloads is not None
    assert {w.name: w.state for w in report.workloads} == {
        "web": "healthy", "db": "healthy", "crashy": "failed",
    }  # fmt: skip


def test_removed_workloads_stop_dependents_first() -> None:
    current = Current(
        1,
        supervises=True,
        running=frozenset({"db", "web"}),
        applied=(
            WorkloadSpec("web", A, parse_entry(0, {"depends_on": ["db"]})),
            WorkloadSpec("db", B),
        ),
    )
    steps = plan(current, Rollout(doc(2), switched=True))
    assert steps == [StopWorkload(2, "web"), StopWorkload(2, "db"), Commit(2)]


def test_a_clean_exit_that_is_not_restarted_is_stopped_not_failed() -> None:
    core = supervised()
    commit_healthy(core, PUMP)
    core.handle(WorkloadExited("pump", 0, False, 20.0))
    assert core.workloads["pump"].state == "stopped"


def test_the_rollback_detail_joins_the_reported_error() -> None:
    core = supervised()
    watch = run_until_health(core, PUMP)[-1]
    core.handle(StepDone(watch, 11.0))  # type: ignore[arg-type]
    rollback = core.handle(HealthFailed("pump", "503", 12.0))[-1]
    done = core.handle(StepDone(rollback, 13.0, detail="pump log:\nboom"))  # type: ignore[arg-type]
    (report,) = reports(done)
    assert report.error == "workload pump: 503\npump log:\nboom"


def test_a_rollout_reports_its_workloads_downloading_installing_starting() -> None:
    """While a rollout runs, ``applying`` reports say where each workload it starts is (the
    rest pending), so an operator watching a slow download sees it."""
    core = supervised()
    seen: list[list[tuple[str, str]]] = []
    actions = core.handle(DesiredPayload(encode(doc(2, ("db", A), ("web", B))), 10.0))
    while not isinstance(core.step, WaitForHealth):
        for report in reports(actions):
            assert (report.phase, report.generation, report.applied_generation) == (
                "applying",
                2,
                1,
            )
            assert report.workloads is not None
            seen.append([(w.name, w.state) for w in report.workloads])
        step = core.step
        assert step is not None
        actions = core.handle(StepDone(step, 11.0))
    assert seen == [
        [("db", "downloading"), ("web", "downloading")],
        [("db", "installing"), ("web", "installing")],
        [("db", "starting"), ("web", "pending")],
        [("db", "starting"), ("web", "starting")],
    ]
