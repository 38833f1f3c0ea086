"""Ingest rules of issue 15: staged generations, heartbeat intervals, soak evidence, and the
online/offline events a batch writes (pure rules as tables; the batch on a real SQLite file)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sqlalchemy import Engine, select

from hub.db import init_db, make_engine, new_session
from hub.deployments.models import DeviceEvent
from hub.devices import store
from hub.devices.rules import Tracking, decide, turned_unhealthy
from protocols import Birth, Reported, Status, WorkloadStatus

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 1, 2, tzinfo=UTC)


def healthy(name: str, restarts: int = 0) -> dict[str, Any]:
    return {"name": name, "state": "healthy", "restarts": restarts,
            "last_exit_code": None, "last_exit_at": None}  # fmt: skip


# Generation 4 applied, one workload healthy, two healthy reports so far.
SOAKING = Tracking(
    session=5, online=True, last_seen=T0, reported_generation=4, report_phase="applied",
    report_generation=4, last_report_epoch=3, last_report_seq=7, workloads=[healthy("web")],
    healthy_since=T0, healthy_reports=2,
)  # fmt: skip


def report(seq: int = 8, **kw: Any) -> Reported:
    fields: dict[str, Any] = dict(
        device_id="d1", boot_epoch=3, seq=seq, phase="applied", generation=4,
        applied_generation=4, ts=1.0,
    )  # fmt: skip
    fields.update(kw)
    return Reported(**fields)


def web(state: str, restarts: int = 0) -> list[WorkloadStatus]:
    return [WorkloadStatus(name="web", state=state, restarts=restarts)]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        pytest.param(report(), {"healthy_reports": 3, "healthy_since": T0}, id="heartbeat-counts"),
        pytest.param(
            report(workloads=web("healthy")), {"healthy_reports": 3}, id="healthy-listed-counts"
        ),
        pytest.param(
            report(workloads=web("unhealthy")),
            {"healthy_reports": 0, "healthy_since": None, "unhealthy_at": NOW},
            id="unhealthy-after-healthy-resets",
        ),
        pytest.param(
            report(workloads=web("starting", restarts=1)),
            {"healthy_reports": 0, "healthy_since": None, "unhealthy_at": NOW},
            id="a-restart-resets",
        ),
        pytest.param(
            report(workloads=web("healthy", restarts=1)),
            {"healthy_reports": 0, "healthy_since": None, "unhealthy_at": NOW},
            id="restarts-grew-resets-even-if-healthy-again",
        ),
        pytest.param(
            report(phase="applying", generation=5), {"healthy_reports": 2}, id="applying-no-count"
        ),
        pytest.param(
            report(phase="applying", generation=5, workloads=web("starting")),
            {"healthy_reports": 2, "unhealthy_at": None},
            id="applying-progress-is-no-health-event",
        ),
        pytest.param(
            report(phase="staged", generation=5),
            {"healthy_reports": 2, "staged_generation": 5},
            id="staged-raises-staged-generation",
        ),
        pytest.param(
            report(generation=5, applied_generation=5),
            {"healthy_reports": 1, "healthy_since": NOW, "unhealthy_at": None},
            id="new-applied-generation-resets-first",
        ),
        pytest.param(report(seq=7), {"healthy_reports": 2}, id="stale-report-changes-nothing"),
    ],
)
def test_soak_evidence(message: Reported, expected: dict[str, Any]) -> None:
    decision = decide(SOAKING, message, now=NOW)
    for name, value in expected.items():
        assert getattr(decision.tracking, name) == value, name


def test_a_failed_workload_table_never_counts_as_healthy() -> None:
    sick = dataclasses.replace(
        SOAKING, workloads=[{**healthy("web"), "state": "failed"}], healthy_reports=0,
        healthy_since=None,
    )  # fmt: skip
    assert decide(sick, report(), now=NOW).tracking.healthy_reports == 0


def test_staged_generation_never_goes_down() -> None:
    ahead = dataclasses.replace(SOAKING, staged_generation=9)
    assert (
        decide(ahead, report(phase="staged", generation=6), now=NOW).tracking.staged_generation == 9
    )


def test_turned_unhealthy_ignores_workloads_it_did_not_know() -> None:
    assert not turned_unhealthy(None, web("failed"))
    assert not turned_unhealthy([healthy("db")], web("failed"))


def test_a_birth_stores_its_heartbeat_and_a_new_generation_resets_the_evidence() -> None:
    birth = Birth(
        device_id="d1", session=6, boot_epoch=4, seq=1, applied_generation=5,
        agent_version="1", heartbeat_s=12.5, ts=1.0,
    )  # fmt: skip
    new = decide(SOAKING, birth, now=NOW).tracking
    assert new.heartbeat_s == 12.5
    assert (new.healthy_reports, new.healthy_since, new.unhealthy_at) == (0, None, None)
    older = msgspec.structs.replace(birth, applied_generation=4, heartbeat_s=None)
    kept = decide(SOAKING, older, now=NOW).tracking
    assert kept.heartbeat_s is None and kept.healthy_reports == 2


def test_a_report_brings_an_offline_device_back() -> None:
    gone = dataclasses.replace(SOAKING, online=False, online_changed_at=T0)
    back = decide(gone, report(), now=NOW).tracking
    assert back.online and back.online_changed_at == NOW


# -- the batch: one INSERT of events per batch, every flip in order


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    instance = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=10_000)
    init_db(instance)
    with new_session(instance) as s:
        store.register_devices(s, devices=[("a", {}), ("b", {})], now=T0)
    yield instance
    instance.dispose()


def events(engine: Engine) -> list[tuple[str, str]]:
    with new_session(engine) as s:
        rows = s.exec(select(DeviceEvent.device_id, DeviceEvent.kind).order_by(DeviceEvent.id))  # type: ignore[call-overload]
        return [tuple(r) for r in rows]


def test_every_online_flip_in_a_batch_is_an_event_in_order(engine: Engine) -> None:
    batch: list[Birth | Status | Reported] = [
        Status(device_id="a", online=True, session=1, ts=1.0),
        Status(device_id="a", online=True, session=1, ts=1.0),  # no flip: no event
        Status(device_id="a", online=False, session=1, ts=2.0),  # the Will
        Birth(
            device_id="a",
            session=2,
            boot_epoch=1,
            seq=1,
            applied_generation=0,
            agent_version="1",
            heartbeat_s=5.0,
            ts=3.0,
        ),
        Status(device_id="b", online=False, session=1, ts=1.0),  # was offline: no flip
    ]
    with new_session(engine) as s:
        store.apply_messages(s, batch, now=NOW)
    assert events(engine) == [("a", "online"), ("a", "offline"), ("a", "online")]
    with new_session(engine) as s:
        row = store.device_row(s, device_id="a")
    assert row["heartbeat_s"] == 5.0


def test_a_staged_report_lands_in_the_row(engine: Engine) -> None:
    staged = Reported(
        device_id="a", boot_epoch=1, seq=1, phase="staged", generation=3,
        applied_generation=0, ts=1.0,
    )  # fmt: skip
    with new_session(engine) as s:
        store.apply_messages(s, [staged], now=NOW + timedelta(seconds=1))
    with new_session(engine) as s:
        row = store.device_row(s, device_id="a")
    assert row["staged_generation"] == 3 and row["report_phase"] == "staged"
