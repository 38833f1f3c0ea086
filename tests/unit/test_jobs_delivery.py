"""Jobs in desired documents, on a real SQLite database: the jobs controller's look
(``JobsController.look``, no broker) hands a job out into ``config["jobs"]``, every
other composition (a device's own document, a deployment change) keeps it, a finished
job costs no generation of its own and leaves at the next change, a cancel removes a
job the device did not start."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update

from hub.controllers.jobs.driver import JobsController
from hub.db import init_db, make_engine, new_session
from hub.devices import store as devices
from hub.devices.desired import DesiredState
from hub.devices.models import Device
from hub.jobs import store
from hub.jobs.models import JobCreate
from hub.settings import HubSettings

NOW = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)
OWN_JOB = {"id": "own-1", "command": ["true"], "deadline_s": 5}


class Signal:
    def __init__(self) -> None:
        self.changed: list[str] = []
        self.wakes = 0

    def desired_changed(self, device_ids: Iterable[str]) -> None:
        self.changed += list(device_ids)

    def fleet_changed(self) -> None:
        self.wakes += 1


class Rig:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.now = NOW
        self.signal = Signal()
        settings = HubSettings(broker_url="mqtt://broker:1883", db_url="sqlite:///unused.db")
        self.desired = DesiredState(settings=settings, delivery=self.signal)
        self.controller = JobsController(
            engine=engine, settings=settings, clock=lambda: self.now, delivery=self.signal
        )
        with new_session(engine) as session:
            for device_id in ("d1", "d2"):
                devices.register_device(session, device_id=device_id, labels={"g": "x"}, now=NOW)
                session.connection().execute(
                    update(Device.__table__)  # type: ignore[arg-type]
                    .where(Device.__table__.c.id == device_id)  # type: ignore[attr-defined]
                    .values(online=True)
                )
                session.commit()
            self.desired.set_device(
                session, device_id="d1", config={"note": 1, "jobs": [OWN_JOB]}, now=NOW
            )

    def create(self, **body: Any) -> str:
        with new_session(self.engine) as session:
            body = {"command": ["true"], "deadline_s": 5, **body}
            return store.create(session, body=JobCreate(**body), now=self.now)

    def device(self, device_id: str = "d1") -> Device:
        with new_session(self.engine) as session:
            return devices.get_device(session, device_id=device_id)

    def job(self, job_id: str) -> dict[str, Any]:
        with new_session(self.engine) as session:
            return store.get_job(session, job_id=job_id).model_dump()

    def report(self, device_id: str, *statuses: dict[str, Any]) -> None:
        with new_session(self.engine) as session:
            session.connection().execute(
                update(Device.__table__)  # type: ignore[arg-type]
                .where(Device.__table__.c.id == device_id)  # type: ignore[attr-defined]
                .values(jobs=list(statuses))
            )
            session.commit()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=1000)
    init_db(engine)
    yield Rig(engine)
    engine.dispose()


def ids(config: dict[str, Any]) -> list[str]:
    return [e["id"] for e in config.get("jobs", [])]


def test_a_handed_out_job_joins_the_document_after_the_devices_own_jobs(rig: Rig) -> None:
    before = rig.device().desired_generation
    rig.create(id="j1", device_id="d1", env={"A": "b"}, expires_in_s=60)
    rig.controller.look()
    row = rig.device()
    assert row.desired_generation == before + 1 and rig.signal.changed[-1] == "d1"
    assert ids(row.desired_config) == ["own-1", "j1"]
    assert row.desired_config["jobs"][1] == {
        "id": "j1",
        "command": ["true"],
        "deadline_s": 5.0,
        "env": {"A": "b"},
        "idempotent": False,
        "expires_at": (NOW + dt.timedelta(seconds=60)).timestamp(),
    }
    assert row.manual_config == {"note": 1, "jobs": [OWN_JOB]}  # the own document as it was
    rig.controller.look()  # nothing new: no generation
    assert rig.device().desired_generation == before + 1


def test_every_composition_keeps_a_handed_out_job(rig: Rig) -> None:
    rig.create(id="j1", device_id="d1")
    rig.controller.look()
    with new_session(rig.engine) as session:
        rig.desired.set_device(session, device_id="d1", config={"note": 2}, now=NOW)
    assert ids(rig.device().desired_config) == ["j1"]
    spec = {"selector": "g=x", "workloads": [{"name": "w", "config": {"k": 1}}]}
    with new_session(rig.engine) as session:
        rig.desired.reconcile_fleet(session, now=NOW, put={"web": spec})
    row = rig.device()
    assert ids(row.desired_config) == ["j1"] and row.desired_config["note"] == 2
    assert [w["name"] for w in row.desired_config["workloads"]] == ["w"]


def test_a_finished_job_costs_no_generation_and_leaves_at_the_next_change(rig: Rig) -> None:
    rig.create(id="j1", device_id="d1")
    rig.controller.look()
    generation = rig.device().desired_generation
    rig.report("d1", {"id": "j1", "state": "succeeded", "exit_code": 0, "log_tail": "ok\n"})
    rig.controller.look()
    view = rig.job("j1")
    assert view["state"] == "completed" and view["devices"][0]["log_tail"] == "ok\n"
    assert rig.device().desired_generation == generation  # still listed, no new generation
    with new_session(rig.engine) as session:
        rig.desired.set_device(session, device_id="d1", config={"note": 3}, now=NOW)
    assert "jobs" not in rig.device().desired_config


def test_cancel_removes_a_job_the_device_did_not_start(rig: Rig) -> None:
    rig.create(id="j1", selector="g=x")
    rig.controller.look()
    rig.report("d2", {"id": "j1", "state": "running", "started_at": NOW.timestamp()})
    rig.controller.look()
    generation = rig.device("d1").desired_generation
    with new_session(rig.engine) as session:
        rig.desired.cancel_job(session, job_id="j1", reason="", now=NOW)
    assert rig.device("d1").desired_generation == generation + 1
    assert ids(rig.device("d1").desired_config) == ["own-1"]
    assert ids(rig.device("d2").desired_config) == ["j1"]  # it runs there: stays listed
    states = {d["device_id"]: d["state"] for d in rig.job("j1")["devices"]}
    assert states == {"d1": "canceled", "d2": "in_progress"}


def test_a_device_gets_its_jobs_in_creation_order_once_the_earlier_is_out(rig: Rig) -> None:
    rig.create(id="first", device_id="d2", rollout={"rate": {"per_minute": 1}})
    rig.create(id="second", device_id="d2")
    rig.controller.look()
    assert ids(rig.device("d2").desired_config) == ["first", "second"]
