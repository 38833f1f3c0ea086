"""The outbox: what a device keeps while it cannot publish (architecture rule 5).

A table of puts and what a drain gives back; then the core's use of it
(offline reports, the flush before the birth, a refused publish, a flood of
events) and its file (kept across a restart, torn files moved aside).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.core import (
    AgentCore,
    AgentState,
    Booted,
    Commit,
    Connected,
    Connecting,
    DesiredPayload,
    Disconnected,
    Publish,
    PublishFailed,
    SaveOutbox,
    StepDone,
    Subscribe,
    Subscribed,
    Switch,
    WorkloadExited,
)
from edge_agent.outbox import Entry, Lane, Outbox, OutboxLimits, OutboxSnapshot
from edge_agent.store import OutboxStore
from protocols import Birth, Desired, Reported, decode, encode

S, E = Lane.STATE, Lane.EVENT
Put = tuple[Lane, str, str]  # lane, key, payload


def run(puts: list[Put], limits: OutboxLimits) -> tuple[list[str], int]:
    box = Outbox(limits)
    for lane, key, payload in puts:
        box.put(lane, key, "t", payload.encode())
    return [e.payload.decode() for e in box.drain()], box.dropped


TABLE = [
    pytest.param([], OutboxLimits(), [], 0, id="empty"),
    pytest.param([(S, "reported", "r1")], OutboxLimits(), ["r1"], 0, id="one-state"),
    pytest.param(
        [(S, "reported", "r1"), (S, "reported", "r2"), (S, "reported", "r3")],
        OutboxLimits(),
        ["r3"],
        0,
        id="state-newest-wins",
    ),
    pytest.param(
        [(S, "a", "a1"), (S, "b", "b1"), (S, "a", "a2")],
        OutboxLimits(),
        ["b1", "a2"],
        0,
        id="state-per-key-replaced-one-goes-last",
    ),
    pytest.param(
        [(E, "", "e1"), (E, "", "e2"), (E, "", "e3")],
        OutboxLimits(),
        ["e1", "e2", "e3"],
        0,
        id="events-in-order",
    ),
    pytest.param(
        [(E, "", f"e{i}") for i in range(5)],
        OutboxLimits(max_events=3),
        ["e2", "e3", "e4"],
        2,
        id="events-past-count-drop-oldest",
    ),
    pytest.param(
        [(E, "", "aaaa"), (E, "", "bbbb"), (E, "", "cccc")],
        OutboxLimits(max_event_bytes=9),
        ["bbbb", "cccc"],
        1,
        id="events-past-bytes-drop-oldest",
    ),
    pytest.param(
        [(E, "", "small"), (E, "", "x" * 20)],
        OutboxLimits(max_event_bytes=10),
        ["small"],
        1,
        id="event-larger-than-the-bound-dropped-alone",
    ),
    pytest.param(
        [(E, "", "e1"), (S, "reported", "r1"), (E, "", "e2"), (S, "reported", "r2")],
        OutboxLimits(),
        ["e1", "e2", "r2"],
        0,
        id="lanes-interleave-in-put-order",
    ),
    pytest.param(
        [(S, "reported", "r1"), (E, "", "e1"), (E, "", "e2"), (E, "", "e3")],
        OutboxLimits(max_events=2),
        ["r1", "e2", "e3"],
        1,
        id="state-never-dropped-by-the-event-bound",
    ),
]


@pytest.mark.parametrize(("puts", "limits", "drained", "dropped"), TABLE)
def test_outbox_policy(
    puts: list[Put], limits: OutboxLimits, drained: list[str], dropped: int
) -> None:
    assert run(puts, limits) == (drained, dropped)


def test_a_snapshot_restores_order_and_the_drop_count() -> None:
    box = Outbox(OutboxLimits(max_events=2))
    for payload in (b"e1", b"e2", b"e3"):
        box.put(E, "", "t", payload)
    box.put(S, "reported", "t", b"r1")
    again = Outbox(OutboxLimits(max_events=2), box.snapshot())
    again.put(E, "", "t", b"e4")
    assert [e.payload for e in again.drain()] == [b"e3", b"r1", b"e4"]
    assert again.dropped == 2  # e1 before the snapshot, e2 after it
    assert again.snapshot().next_order == 5


# ---------------------------------------------------------------- in the core


def desired(gen: int) -> DesiredPayload:
    doc = Desired(device_id="d1", generation=gen, config={"g": gen}, issued_at=1.0)
    return DesiredPayload(encode(doc), now=10.0)


def online(core: AgentCore, now: float = 1.0) -> list[object]:
    core.handle(Connecting(now))
    actions: list[object] = list(core.handle(Connected(now, False)))
    actions += core.handle(Subscribed(now))
    return actions


def apply_offline(core: AgentCore, gen: int) -> list[object]:
    """Generation ``gen`` arrives online; the connection drops; the apply finishes offline."""
    online(core)
    core.handle(desired(gen))
    switch = core.step
    assert isinstance(switch, Switch)
    core.handle(Disconnected(11.0))
    core.handle(StepDone(switch, 12.0))
    commit = core.step
    assert isinstance(commit, Commit)
    return list(core.handle(StepDone(commit, 13.0)))


def test_a_report_made_offline_is_kept_and_leaves_first_on_reconnect() -> None:
    core = AgentCore("d1", AgentState(), "t")
    core.handle(Booted(1.0))
    actions = apply_offline(core, 1)
    assert not [a for a in actions if isinstance(a, Publish)]  # nothing goes out offline
    saved = [a for a in actions if isinstance(a, SaveOutbox)]
    assert len(saved) == 1 and len(saved[0].snapshot.entries) == 1
    back = online(core, 20.0)
    kinds = [type(a).__name__ for a in back]
    assert kinds[:4] == ["Publish", "SaveOutbox", "Publish", "Publish"]  # report, then status
    assert any(isinstance(a, Subscribe) for a in back)
    report = decode(back[0].payload, Reported)  # type: ignore[attr-defined]
    birth = decode(back[3].payload, Birth)  # type: ignore[attr-defined]
    assert (report.phase, report.generation) == ("applied", 1)
    assert (report.boot_epoch, report.seq) < (birth.boot_epoch, birth.seq)
    assert back[1] == SaveOutbox(OutboxSnapshot((), 0, 1))  # cleared once handed over
    assert len(core.outbox) == 0


def test_a_publish_the_connection_refused_goes_to_the_outbox() -> None:
    core = AgentCore("d1", AgentState(), "t")
    core.handle(Booted(1.0))
    online(core)
    report = Publish("driftless/v1/devices/d1/reported", b"{}", lane=Lane.STATE, key="reported")
    assert core.handle(PublishFailed(report, 2.0)) == [SaveOutbox(core.outbox.snapshot())]
    assert len(core.outbox) == 1
    status = Publish("driftless/v1/devices/d1/status", b"{}", retain=True)  # not worth keeping
    assert core.handle(PublishFailed(status, 2.0)) == []


def test_a_flood_of_events_offline_drops_the_oldest_and_the_birth_says_how_many() -> None:
    core = AgentCore("d1", AgentState(), "t", outbox=Outbox(OutboxLimits(max_events=10)))
    core.handle(Booted(1.0))
    online(core)
    config = {"workloads": [{"name": "pump", "bundle": "ab" * 32}]}
    core.handle(
        DesiredPayload(
            encode(Desired(device_id="d1", generation=1, config=config, issued_at=1.0)), 2.0
        )
    )
    core.handle(Disconnected(3.0))
    while (step := core.step) is not None:  # fetch, install, switch, commit: all done offline
        core.handle(StepDone(step, 4.0))
    assert core.state.applied_generation == 1 and len(core.outbox) == 1
    core.handle(Connecting(15.0))  # the broker is still away
    for code in range(25):  # a crash loop while offline: each exit is an event
        core.handle(WorkloadExited("pump", code, True, 16.0 + code))
    assert core.outbox.dropped == 15 and len(core.outbox) == 11  # 10 events + the state report
    back = online(core, 50.0)
    sent = [
        decode(a.payload, Reported)
        for a in back
        if isinstance(a, Publish) and "/reported" in a.topic
    ]
    exits = [r.workloads[0].last_exit_code for r in sent if r.workloads and r.phase == "applied"]
    assert exits == [None, *range(15, 25)]  # the applied report, then the newest ten exits
    seqs = [r.seq for r in sent]
    assert seqs == sorted(seqs)
    (birth,) = [
        decode(a.payload, Birth) for a in back if isinstance(a, Publish) and "/birth" in a.topic
    ]
    assert birth.events_dropped == 15
    assert birth.seq > seqs[-1]


# ---------------------------------------------------------------- on disk


def test_the_outbox_file_round_trips(tmp_path: Path) -> None:
    store = OutboxStore(tmp_path)
    assert store.load() == OutboxSnapshot()
    snapshot = OutboxSnapshot(
        (
            Entry(3, Lane.EVENT, "", "a/b", b"\x00\xffbinary", False),
            Entry(7, Lane.STATE, "reported", "a/c", b'{"x":1}', True),
        ),
        dropped=4,
        next_order=8,
    )
    store.save(snapshot)
    assert store.load() == snapshot
    assert (tmp_path / "outbox.json").stat().st_mode & 0o777 == 0o600


def test_a_torn_outbox_file_is_moved_aside_and_the_outbox_starts_empty(tmp_path: Path) -> None:
    (tmp_path / "outbox.json").write_bytes(b'{"format": 1, "entries": [{"ord')
    assert OutboxStore(tmp_path).load() == OutboxSnapshot()
    assert (tmp_path / "outbox.corrupt").exists()
