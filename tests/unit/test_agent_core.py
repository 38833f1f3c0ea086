"""The agent's reconcile core, driven by events alone (no broker, no disk, no clock)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from edge_agent.core import (
    Action,
    AgentCore,
    AgentState,
    Booted,
    Commit,
    Connected,
    Connecting,
    DesiredPayload,
    Disconnected,
    Ignored,
    NoOp,
    PersistState,
    Publish,
    Rejected,
    SetWill,
    StepDone,
    StepFailed,
    Stopping,
    Subscribe,
    Subscribed,
    Switch,
)
from protocols import Birth, Desired, Reported, Status, decode, encode


def desired(gen: int, device: str = "d1", **config: object) -> DesiredPayload:
    doc = Desired(device_id=device, generation=gen, config=dict(config), issued_at=1.0)
    return DesiredPayload(encode(doc), now=10.0)


def online_core(state: AgentState | None = None) -> AgentCore:
    core = AgentCore("d1", state or AgentState(), "test")
    core.handle(Booted(1000.0))
    core.handle(Connecting(1000.0))
    core.handle(Connected(1000.0, session_present=False))
    core.handle(Subscribed(1000.0))
    return core


def applies(actions: list[Action]) -> list[int]:
    """The generations whose apply starts: a plain config's plan begins with its Switch."""
    return [a.desired.generation for a in actions if isinstance(a, Switch)]


def apply_done(
    core: AgentCore, gen: int, ok: bool = True, error: str | None = None, now: float = 20.0
) -> list[Action]:
    """The driver's answers to the apply's steps: Switch, then Commit (or Switch failed)."""
    switch = core.step
    assert isinstance(switch, Switch) and switch.desired.generation == gen, switch
    if not ok:
        return core.handle(StepFailed(switch, error or "failed", now))
    actions = core.handle(StepDone(switch, now))
    commit = core.step
    assert isinstance(commit, Commit) and actions == [commit], actions
    return actions + core.handle(StepDone(commit, now))


def publishes(actions: list[object], suffix: str) -> list[Publish]:
    return [a for a in actions if isinstance(a, Publish) and a.topic.endswith(suffix)]


PURE_MODULES = [
    "core.py",  # the reconciler
    "plan.py",  # the apply planner
    "outbox.py",  # the report outbox
    "executors.py",  # the executor table both drivers build
    "fetch_job.py",  # the fetch step's policy
    "bundle_transfer.py",  # one bundle's transfer
    "supervisor/spec.py",  # the workload specification
    "supervisor/restart.py",  # the restart policy
    "supervisor/health.py",  # health verdicts
    "supervisor/machine.py",  # the supervisor of one device
]


@pytest.mark.parametrize("name", PURE_MODULES)
def test_core_imports_no_io(name: str) -> None:
    """Invariant 8: the cores are sans-I/O; a test checks their imports."""
    source = (Path(__file__).parents[2] / "edge_agent" / name).read_text()
    banned = {"paho", "aiomqtt", "asyncio", "socket", "subprocess", "threading", "os", "time"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        assert not banned.intersection(names), names


def test_boot_grows_epoch_and_persists() -> None:
    core = AgentCore("d1", AgentState(boot_epoch=5), "t")
    actions = core.handle(Booted(3.0))
    assert core.state.boot_epoch == 6
    assert actions == [PersistState(core.state)]


def test_boot_epoch_follows_clock_when_state_was_lost() -> None:
    core = AgentCore("d1", AgentState(), "t")
    core.handle(Booted(1_700_000_000.5))
    assert core.state.boot_epoch == 1_700_000_000


def test_each_connect_gets_a_new_session_and_matching_will_and_birth() -> None:
    core = AgentCore("d1", AgentState(session=4), "t")
    core.handle(Booted(1.0))
    prepare = core.handle(Connecting(2.0))
    assert isinstance(prepare[0], PersistState) and prepare[0].state.session == 5
    will = prepare[1]
    assert isinstance(will, SetWill) and will.topic == "driftless/v1/devices/d1/status"
    assert decode(will.payload, Status) == Status(device_id="d1", online=False, session=5, ts=2.0)
    out = core.handle(Connected(3.0, session_present=True))
    assert isinstance(out[-1], Subscribe)  # one SUBSCRIBE after every connect, last
    assert out[-1].topics == (
        "driftless/v1/devices/d1/desired",
        "driftless/v1/devices/d1/bundle_data",
    )
    status = decode(publishes(out, "/status")[0].payload, Status)
    birth = decode(publishes(out, "/birth")[0].payload, Birth)
    assert status.online and status.session == 5 and publishes(out, "/status")[0].retain
    assert birth.session == 5 and birth.boot_epoch == core.state.boot_epoch


@pytest.mark.parametrize(
    "state, generation, expect_apply",
    [
        pytest.param(AgentState(), 1, True, id="first"),
        pytest.param(AgentState(applied_generation=3), 4, True, id="newer"),
        pytest.param(AgentState(applied_generation=3), 3, False, id="duplicate"),
        pytest.param(AgentState(applied_generation=3), 2, False, id="older"),
        pytest.param(
            AgentState(applied_generation=3, failed_generation=5), 5, False, id="already-failed"
        ),
        pytest.param(
            AgentState(applied_generation=3, failed_generation=5), 6, True, id="retry-new"
        ),
    ],
)
def test_generation_rule(state: AgentState, generation: int, expect_apply: bool) -> None:
    core = online_core(state)
    actions = core.handle(desired(generation))
    assert applies(actions) == ([generation] if expect_apply else [])
    if not expect_apply:
        assert any(isinstance(a, Ignored) for a in actions)


def test_backlog_before_subscription_coalesces_to_newest() -> None:
    """Invariant 2: queued deliveries after an offline period apply only the newest."""
    core = AgentCore("d1", AgentState(applied_generation=1), "t")
    core.handle(Booted(1.0))
    core.handle(Connecting(1.0))
    core.handle(Connected(1.0, session_present=True))
    seen: list[object] = []
    for gen in (2, 3, 4, 3):
        seen += core.handle(desired(gen))
    assert applies(seen) == []
    assert applies(core.handle(Subscribed(2.0))) == [4]


def test_newer_document_waits_for_apply_in_flight_then_runs() -> None:
    core = online_core()
    assert applies(core.handle(desired(1))) == [1]
    assert applies(core.handle(desired(2))) == []
    assert applies(core.handle(desired(3))) == []  # 2 is superseded while waiting
    done = apply_done(core, 1)
    assert applies(done) == [3]
    assert core.state.applied_generation == 1


def test_success_persists_before_reporting() -> None:
    core = online_core()
    core.handle(desired(1, x=1))
    actions = apply_done(core, 1)
    assert [type(a) for a in actions] == [Commit, NoOp, PersistState, Publish]
    assert isinstance(actions[2], PersistState)
    assert actions[2].state.applied_generation == 1
    report = decode(actions[3].payload, Reported)  # type: ignore[union-attr]
    assert (report.phase, report.generation, report.applied_generation) == ("applied", 1, 1)
    assert core.state.history[-1].generation == 1 and core.state.history[-1].ok


def test_failure_is_recorded_and_reported_and_not_retried_for_same_generation() -> None:
    core = online_core(AgentState(applied_generation=2))
    core.handle(desired(3))
    actions = apply_done(core, 3, ok=False, error="disk full")
    assert [type(a) for a in actions] == [NoOp, PersistState, Publish]
    report = decode(actions[2].payload, Reported)  # type: ignore[union-attr]
    assert (report.phase, report.failed_generation, report.applied_generation) == ("failed", 3, 2)
    assert report.error == "disk full"
    assert applies(core.handle(desired(3))) == []


def test_reports_and_births_are_strictly_ordered() -> None:
    core = online_core()
    keys = []
    for gen in (1, 2, 3):
        core.handle(desired(gen))
        for action in apply_done(core, gen, now=float(gen)):
            if isinstance(action, Publish):
                r = decode(action.payload, Reported)
                keys.append((r.boot_epoch, r.seq))
    core.handle(Disconnected(5.0))
    core.handle(Connecting(5.0))
    birth = decode(publishes(core.handle(Connected(6.0, False)), "/birth")[0].payload, Birth)
    keys.append((birth.boot_epoch, birth.seq))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_restart_keeps_ordering_across_boots() -> None:
    first = online_core()
    state = first.state
    second = AgentCore("d1", state, "t")
    second.handle(Booted(1000.0))  # same clock second as the first boot
    assert second.state.boot_epoch > state.boot_epoch


@pytest.mark.parametrize(
    "payload, reason",
    [
        pytest.param(b"{oops", "malformed", id="malformed"),
        pytest.param(
            b'{"kind":"desired","v":9,"device_id":"d1","generation":1,"config":{},"issued_at":1}',
            "unsupported_version",
            id="wrong-version",
        ),
        pytest.param(
            encode(Desired(device_id="other", generation=9, config={}, issued_at=1)),
            "device_mismatch",
            id="other-device",
        ),
    ],
)
def test_bad_desired_is_rejected_and_changes_nothing(payload: bytes, reason: str) -> None:
    core = online_core()
    actions = core.handle(DesiredPayload(payload, 1.0))
    assert actions == [actions[0]] and isinstance(actions[0], Rejected)
    assert actions[0].reason == reason
    assert core.state.applied_generation == 0 and core.applying is None


def test_cleared_retained_document_is_ignored() -> None:
    core = online_core()
    assert isinstance(core.handle(DesiredPayload(b"", 1.0))[0], Ignored)


def test_stale_apply_result_is_ignored() -> None:
    core = online_core()
    assert isinstance(core.handle(StepDone(Commit(7), 1.0))[0], Ignored)
    assert core.state.applied_generation == 0


def test_stopping_publishes_offline_for_current_session() -> None:
    core = online_core()
    (offline,) = core.handle(Stopping(9.0))
    status = decode(offline.payload, Status)  # type: ignore[union-attr]
    assert status.online is False and status.session == core.state.session


def test_older_document_is_answered_with_current_state_duplicate_is_not() -> None:
    core = online_core(AgentState(applied_generation=5))
    assert publishes(core.handle(desired(5)), "/reported") == []
    (report,) = publishes(core.handle(desired(2)), "/reported")
    body = decode(report.payload, Reported)
    assert (body.phase, body.generation, body.applied_generation) == ("applied", 5, 5)
