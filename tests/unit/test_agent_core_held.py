"""Held (pre-staged) documents and heartbeats in the agent core (issue 15, items 6 and 9).

Driven by events alone, as the other core tests: a held document is fetched and
installed, reported ``staged``, never switched; a newer document switches; the
heartbeat timer reports the current state while connected.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from edge_agent.core import (
    HEARTBEAT_TIMER,
    Action,
    AgentCore,
    AgentState,
    Booted,
    CancelFetch,
    Commit,
    Connected,
    Connecting,
    DesiredPayload,
    Disconnected,
    FetchBundles,
    Ignored,
    Install,
    NoOp,
    PersistState,
    Publish,
    SetTimer,
    StepDone,
    StepFailed,
    Subscribed,
    Switch,
    TimerFired,
)
from edge_agent.plan import Current, Rollout, is_held, plan, workload_specs
from protocols import Birth, Desired, Reported, decode, encode

A, B = "aa" * 32, "bb" * 32


def document(gen: int, *bundles: str, hold: object = None) -> Desired:
    config: dict[str, object] = {
        "workloads": [{"name": f"w{i}", "bundle": b} for i, b in enumerate(bundles)]
    }
    if hold is not None:
        config["hold"] = hold
    return Desired(device_id="d1", generation=gen, config=config, issued_at=1.0)


def payload(gen: int, *bundles: str, hold: object = None, now: float = 10.0) -> DesiredPayload:
    return DesiredPayload(encode(document(gen, *bundles, hold=hold)), now=now)


def online(heartbeat_s: float | None = 30.0, state: AgentState | None = None) -> AgentCore:
    core = AgentCore("d1", state or AgentState(), "test", heartbeat_s=heartbeat_s)
    for event in (Booted(1.0), Connecting(1.0), Connected(1.0, False), Subscribed(1.0)):
        core.handle(event)
    return core


def run_steps(core: AgentCore, now: float = 12.0) -> list[Action]:
    """Answer every step the core hands out with success; every action of the last answer."""
    actions: list[Action] = []
    while core.step is not None:
        actions = core.handle(StepDone(core.step, now))
    return actions


def reports(actions: Sequence[object]) -> list[Reported]:
    return [
        decode(a.payload, Reported)
        for a in actions
        if isinstance(a, Publish) and a.topic.endswith("/reported")
    ]


# -- the planner


@pytest.mark.parametrize(
    ("hold", "held"),
    [(True, True), (False, False), (None, False), ("true", False), (1, False)],
)
def test_only_the_json_true_holds(hold: object, held: bool) -> None:
    config = {} if hold is None else {"hold": hold}
    assert is_held(config) is held


def test_a_held_plan_is_fetch_install_then_staged() -> None:
    doc = document(2, A, hold=True)
    rollout = Rollout(doc, tuple(workload_specs(doc.config)))
    steps = plan(Current(1), rollout)
    assert [type(s).__name__ for s in steps] == ["FetchBundles", "Install", "NoOp"]
    assert steps[-1] == NoOp(2, "staged")
    done = rollout.done(steps[0]).done(steps[1])
    assert plan(Current(1), done) == [NoOp(2, "staged")] and done.staged


def test_a_held_document_without_bundles_stages_at_once() -> None:
    doc = Desired(device_id="d1", generation=2, config={"hold": True, "x": 1}, issued_at=1.0)
    assert plan(Current(1), Rollout(doc)) == [NoOp(2, "staged")]


# -- the core


def test_a_held_document_stages_and_changes_nothing_applied() -> None:
    core = online(state=AgentState(applied_generation=1))
    first = core.handle(payload(2, A, hold=True))
    assert isinstance(first[-1], FetchBundles)
    core.handle(StepDone(core.step, 11.0))  # type: ignore[arg-type]
    assert isinstance(core.step, Install)
    actions = core.handle(StepDone(core.step, 12.0))
    assert not any(isinstance(a, Switch | Commit | PersistState) for a in actions)
    (staged,) = reports(actions)
    assert (staged.phase, staged.generation, staged.applied_generation) == ("staged", 2, 1)
    assert core.state.applied_generation == 1 and core.state.history == ()
    assert core.staged == 2 and core.step is None


def test_a_copy_of_the_staged_generation_changes_nothing() -> None:
    core = online()
    core.handle(payload(2, A, hold=True))
    run_steps(core)
    again = core.handle(payload(2, A, hold=True))
    assert [type(a) for a in again] == [Ignored] and core.step is None


def test_the_next_document_without_hold_switches_and_commits() -> None:
    core = online(state=AgentState(applied_generation=1))
    core.handle(payload(2, A, hold=True))
    run_steps(core)
    started = core.handle(payload(3, A))
    assert isinstance(started[-1], FetchBundles)  # the driver finds the file in its cache
    kinds = []
    while core.step is not None:
        kinds.append(type(core.step).__name__)
        last = core.handle(StepDone(core.step, 13.0))
    assert kinds == ["FetchBundles", "Install", "Switch", "Commit"]
    (applied,) = reports(last)
    assert (applied.phase, applied.generation, applied.applied_generation) == ("applied", 3, 3)
    assert core.staged is None  # outdated by what was applied


def test_a_newer_held_document_replaces_the_staged_one() -> None:
    core = online()
    core.handle(payload(2, A, hold=True))
    run_steps(core)
    core.handle(payload(3, B, hold=True))
    (staged,) = reports(run_steps(core))
    assert (staged.phase, staged.generation) == ("staged", 3)
    assert core.staged == 3


def test_a_newer_document_supersedes_a_held_fetch() -> None:
    core = online()
    core.handle(payload(2, A, hold=True))
    actions = core.handle(payload(3, B))
    assert CancelFetch(2) in actions and isinstance(core.step, FetchBundles)
    assert core.step.generation == 3


def test_a_held_document_whose_fetch_fails_is_a_failed_generation() -> None:
    core = online(state=AgentState(applied_generation=1))
    core.handle(payload(2, A, hold=True))
    actions = core.handle(StepFailed(core.step, "digest mismatch", 11.0))  # type: ignore[arg-type]
    (failed,) = reports(actions)
    assert (failed.phase, failed.generation, failed.failed_generation) == ("failed", 2, 2)
    assert core.staged is None


# -- heartbeats


def test_every_connect_arms_the_heartbeat_and_the_birth_announces_it() -> None:
    core = AgentCore("d1", AgentState(), "t", heartbeat_s=5.0)
    core.handle(Booted(1.0))
    core.handle(Connecting(1.0))
    actions = core.handle(Connected(2.0, session_present=False))
    assert SetTimer(HEARTBEAT_TIMER, 7.0) in actions
    (birth,) = [a for a in actions if isinstance(a, Publish) and a.topic.endswith("/birth")]
    assert decode(birth.payload, Birth).heartbeat_s == 5.0


def test_a_heartbeat_reports_the_state_with_the_next_seq_and_rearms() -> None:
    core = online(heartbeat_s=5.0, state=AgentState(applied_generation=4))
    before = core.handle(TimerFired(HEARTBEAT_TIMER, 6.0))
    after = core.handle(TimerFired(HEARTBEAT_TIMER, 11.0))
    one, two = reports(before)[0], reports(after)[0]
    assert (one.phase, one.generation, one.applied_generation) == ("applied", 4, 4)
    assert two.seq == one.seq + 1
    assert before[-1] == SetTimer(HEARTBEAT_TIMER, 11.0)
    assert after[-1] == SetTimer(HEARTBEAT_TIMER, 16.0)
    (publish,) = [a for a in before if isinstance(a, Publish)]
    assert publish.key == "heartbeat"  # never replaces a generation report in the outbox


def test_heartbeats_say_staged_and_applying() -> None:
    core = online(heartbeat_s=5.0, state=AgentState(applied_generation=1))
    core.handle(payload(2, A, hold=True))
    run_steps(core)
    (staged,) = reports(core.handle(TimerFired(HEARTBEAT_TIMER, 20.0)))
    assert (staged.phase, staged.generation, staged.applied_generation) == ("staged", 2, 1)
    core.handle(payload(3, A))  # fetching: a rollout in flight
    (busy,) = reports(core.handle(TimerFired(HEARTBEAT_TIMER, 25.0)))
    assert (busy.phase, busy.generation) == ("applying", 3)


def test_no_heartbeat_while_offline_and_none_when_disabled() -> None:
    core = online(heartbeat_s=5.0)
    core.handle(Disconnected(3.0))
    assert core.handle(TimerFired(HEARTBEAT_TIMER, 6.0)) == []
    quiet = online(heartbeat_s=None)
    assert quiet.handle(TimerFired(HEARTBEAT_TIMER, 6.0)) == []
    assert not any(
        isinstance(a, SetTimer) and a.name == HEARTBEAT_TIMER
        for a in quiet.handle(Connected(7.0, session_present=True))
    )
