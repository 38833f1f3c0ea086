"""The reconcile core's fetch step: bundles first, then the apply; newer documents supersede."""

from __future__ import annotations

import pytest

from edge_agent.core import (
    Action,
    AgentCore,
    AgentState,
    Booted,
    CancelFetch,
    Commit,
    Connected,
    Connecting,
    DesiredPayload,
    FetchBundles,
    Ignored,
    Install,
    PersistState,
    Publish,
    StepDone,
    StepFailed,
    Subscribed,
    Switch,
    TransferLink,
)
from protocols import Desired, Reported, decode, encode

A, B = "aa" * 32, "bb" * 32


def desired(gen: int, *bundles: str, **config: object) -> DesiredPayload:
    workloads = [{"name": f"w{i}", "bundle": b} for i, b in enumerate(bundles)]
    body = {**config, "workloads": workloads} if bundles else dict(config)
    doc = Desired(device_id="d1", generation=gen, config=body, issued_at=1.0)
    return DesiredPayload(encode(doc), now=10.0)


def online() -> AgentCore:
    core = AgentCore("d1", AgentState(), "test")
    for event in (Booted(1.0), Connecting(1.0), Connected(1.0, False), Subscribed(1.0)):
        core.handle(event)
    return core


def fetch_done(core: AgentCore, gen: int, ok: bool = True, error: str = "") -> list[Action]:
    step = core.step
    if not isinstance(step, FetchBundles) or step.generation != gen:
        step = FetchBundles(gen, (A,))  # a result for a fetch no longer in flight
    return core.handle(StepDone(step, 11.0) if ok else StepFailed(step, error, 11.0))


def apply_done(core: AgentCore) -> list[Action]:
    """Every step after the fetch succeeds: Install, Switch, Commit."""
    actions: list[Action] = []
    while isinstance(core.step, Install | Switch | Commit):
        actions = core.handle(StepDone(core.step, 12.0))
    return actions


def kinds(actions: list[object]) -> list[str]:
    return [type(a).__name__ for a in actions]


def report(actions: list[object]) -> Reported:
    (publish,) = [a for a in actions if isinstance(a, Publish) and a.topic.endswith("reported")]
    return decode(publish.payload, Reported)


def test_a_config_without_bundles_is_applied_at_once() -> None:
    assert kinds(online().handle(desired(1, x=1))) == ["Switch"]


def test_bundles_are_fetched_before_the_apply() -> None:
    core = online()
    actions = core.handle(desired(1, B, A))
    assert actions == [FetchBundles(1, (A, B))]
    assert (core.fetching, core.applying) == (1, None)
    actions = fetch_done(core, 1)
    assert kinds(actions) == ["Install"] and isinstance(actions[0], Install)
    assert actions[0].desired.generation == 1
    assert (core.fetching, core.applying) == (None, 1)
    assert kinds(core.handle(StepDone(actions[0], 12.0))) == ["Switch"]
    assert kinds(core.handle(StepDone(core.step, 12.0))) == ["Commit"]  # type: ignore[arg-type]
    actions = core.handle(StepDone(core.step, 12.0))  # type: ignore[arg-type]
    assert report(actions).phase == "applied"


def test_a_failed_fetch_fails_the_generation_with_its_reason() -> None:
    core = online()
    core.handle(desired(1, A))
    actions = fetch_done(core, 1, False, "bundle aaaa…: ThresholdNotMetError: …")
    assert kinds(actions) == ["NoOp", "PersistState", "Publish"]
    assert isinstance(actions[1], PersistState)
    assert actions[1].state.failed_generation == 1
    got = report(actions)
    assert (got.phase, got.generation) == ("failed", 1)
    assert got.error is not None and "ThresholdNotMetError" in got.error
    assert kinds(core.handle(desired(2, x=1))) == ["Switch"]  # the next one goes ahead


def test_a_newer_document_supersedes_a_fetch_in_progress() -> None:
    core = online()
    core.handle(desired(1, A))
    actions = core.handle(desired(2, B))
    assert actions == [
        CancelFetch(1),
        Ignored(1, "fetch superseded by generation 2"),
        FetchBundles(2, (B,)),
    ]
    assert kinds(fetch_done(core, 1)) == ["Ignored"]  # too late
    assert kinds(fetch_done(core, 2)) == ["Install"]


def test_a_newer_document_without_bundles_supersedes_a_fetch_too() -> None:
    core = online()
    core.handle(desired(1, A))
    assert kinds(core.handle(desired(2, x=2))) == ["CancelFetch", "Ignored", "Switch"]


def test_a_newer_document_waits_for_an_apply_that_started() -> None:
    core = online()
    core.handle(desired(1, A))
    fetch_done(core, 1)
    assert core.handle(desired(2, B)) == []
    assert core.waiting == 2
    actions = apply_done(core)
    assert kinds(actions) == ["NoOp", "PersistState", "Publish", "FetchBundles"]


@pytest.mark.parametrize("gen", [pytest.param(1, id="same"), pytest.param(0, id="older")])
def test_the_fetching_generation_counts_as_known(gen: int) -> None:
    core = online()
    core.handle(desired(1, A))
    if gen:
        assert kinds(core.handle(desired(gen, A))) == ["Ignored"]
    assert core.fetching == 1


def test_documents_before_the_subscription_coalesce_and_then_supersede_the_fetch() -> None:
    core = online()
    core.handle(desired(1, A))
    core.handle(Connecting(20.0))
    core.handle(Connected(20.0, True))
    assert core.handle(desired(2, A)) == []
    assert core.handle(desired(3, B)) == [Ignored(2, "superseded by generation 3")]
    actions = core.handle(Subscribed(21.0))
    assert actions == [
        TransferLink(True),
        CancelFetch(1),
        Ignored(1, "fetch superseded by generation 3"),
        FetchBundles(3, (B,)),
    ]
