"""The hub's side of update locks and one-shot jobs (issue 13, items 4 and 8): the
ingest rule, the device view, the admin route that lifts locks (a signed desired
change, audited), and revision 0004."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from fastapi import FastAPI
from fastapi.testclient import TestClient

from devtools.broker import free_port
from hub.app import create_app
from hub.auth.models import Role
from hub.db import (
    _alembic_config,
    current_revision,
    head_revision,
    make_engine,
    migrate,
    new_session,
)
from hub.devices import store
from hub.devices.rules import MAX_JOBS_KEPT, Tracking, decide, merge_jobs
from hub.settings import HubSettings
from protocols import JobStatus, LockStatus, Reported
from tests.unit.auth_support import api_client, bearer, mint
from tests.unit.test_hub_migrations import from_fixture, rows

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def report(seq: int, **fields: object) -> Reported:
    return Reported(
        device_id="pump-1",
        boot_epoch=7,
        seq=seq,
        phase="applied",
        generation=1,
        applied_generation=1,
        ts=1.0,
        **fields,  # type: ignore[arg-type]
    )


LOCK = LockStatus(workload="web", holder="backup", until=1796557600.0)


def job(job_id: str, state: str = "running", **fields: object) -> JobStatus:
    return JobStatus(id=job_id, state=state, **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the ingest rule


def test_a_report_sets_the_locks_and_one_without_them_keeps_them() -> None:
    held = decide(Tracking(), report(1, locks=[LOCK]), now=NOW).tracking
    assert held.locks == [
        {"workload": "web", "holder": "backup", "until": 1796557600.0, "overridden": False}
    ]
    kept = decide(held, report(2), now=NOW).tracking
    assert kept.locks == held.locks
    freed = decide(kept, report(3, locks=[]), now=NOW).tracking
    assert freed.locks == []


def test_each_job_update_replaces_its_ids_state_in_order() -> None:
    t = decide(Tracking(), report(1, jobs=[job("a", progress=0)]), now=NOW).tracking
    t = decide(t, report(2, jobs=[job("b")]), now=NOW).tracking
    t = decide(t, report(3, jobs=[job("a", "succeeded", exit_code=0)]), now=NOW).tracking
    assert [(j["id"], j["state"]) for j in t.jobs or []] == [("b", "running"), ("a", "succeeded")]
    stale = decide(t, report(2, jobs=[job("a", "failed")]), now=NOW)
    assert stale.stale is not None  # an older report changes nothing


def test_the_job_states_kept_are_bounded() -> None:
    kept = merge_jobs(None, [job(f"j{i}") for i in range(MAX_JOBS_KEPT + 5)])
    assert len(kept) == MAX_JOBS_KEPT and kept[0]["id"] == "j5"


# ---------------------------------------------------------------- the API


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(
        HubSettings(
            broker_url=f"mqtt://127.0.0.1:{free_port()}",
            db_url=f"sqlite:///{tmp_path / 'hub.db'}",
        )
    )


@pytest.fixture
def admin(app: FastAPI) -> Iterator[TestClient]:
    with api_client(app) as client:
        assert client.post("devices", json={"id": "pump-1"}).status_code == 201
        yield client


def test_the_device_shows_its_locks_and_jobs(app: FastAPI, admin: TestClient) -> None:
    assert admin.get("devices/pump-1").json()["locks"] is None
    batch = [
        report(1, locks=[LOCK], jobs=[job("flash", progress=40, message="writing")]),
        report(2, jobs=[job("flash", "timed_out", exit_code=-15, log_tail="...\n")]),
    ]
    with new_session(app.state.context.engine) as session:
        assert store.apply_messages(session, batch, now=NOW).outcomes == ["applied"] * 2
    device = admin.get("devices/pump-1").json()
    assert device["locks"] == [
        {"workload": "web", "holder": "backup", "until": 1796557600.0, "overridden": False}
    ]
    assert device["jobs"] == [
        {"id": "flash", "state": "timed_out", "progress": None, "message": None,
         "exit_code": -15, "log_tail": "...\n", "started_at": None, "finished_at": None}
    ]  # fmt: skip
    listed = admin.get("devices").json()["items"][0]
    assert listed["locks"] == device["locks"] and listed["jobs"] == device["jobs"]


def test_an_admin_lifts_locks_through_a_new_signed_generation(
    app: FastAPI, admin: TestClient
) -> None:
    assert admin.put("devices/pump-1/desired", json={"config": {"x": 1}}).status_code == 200
    answer = admin.post(
        "devices/pump-1/lock-override", json={"workloads": ["web"], "duration_s": 600}
    )
    assert answer.status_code == 200, answer.text
    device = answer.json()
    assert device["desired_generation"] == 2
    override = device["desired_config"]["lock_override"]
    assert device["desired_config"]["x"] == 1  # the rest of the document is kept
    assert override["workloads"] == ["web"]
    assert override["until"] > datetime.now(UTC).timestamp() + 500
    every = admin.post("devices/pump-1/lock-override", json={"duration_s": 60}).json()
    assert every["desired_config"]["lock_override"]["workloads"] is None
    audit = admin.get("audit").json()["items"]
    assert any(e["path"].endswith("/devices/pump-1/lock-override") for e in audit)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param({"duration_s": 0}, 422, id="no-time"),
        pytest.param({"duration_s": 86401}, 422, id="over-a-day"),
        pytest.param({"duration_s": 60, "workloads": ["Web!"]}, 422, id="bad-name"),
        pytest.param({"duration_s": 60, "until": 5}, 422, id="unknown-member"),
    ],
)
def test_a_bad_override_request_is_refused(admin: TestClient, body: object, status: int) -> None:
    assert admin.post("devices/pump-1/lock-override", json=body).status_code == status


def test_only_an_admin_lifts_locks_and_only_on_a_known_device(
    app: FastAPI, admin: TestClient
) -> None:
    assert admin.post("devices/ghost/lock-override", json={"duration_s": 5}).status_code == 404
    operator = bearer(mint(app, Role.operator))
    refused = admin.post("devices/pump-1/lock-override", json={"duration_s": 5}, headers=operator)
    assert refused.status_code == 403


# ---------------------------------------------------------------- revision 0004


def test_revision_0004_adds_the_columns_and_goes_back(tmp_path: Path) -> None:
    """In the style of tests/unit/test_hub_migrations.py: the fixture's rows intact."""
    path = from_fixture(tmp_path / "hub.db")
    engine = make_engine(f"sqlite:///{path}", busy_timeout_ms=5000)
    before = rows(path)  # the old columns' rows

    def columns() -> set[str]:
        with sqlite3.connect(path) as db:
            return {c[1] for c in db.execute("PRAGMA table_info(device)")}

    assert migrate(engine) == head_revision()
    assert {"locks", "jobs"} <= columns() and rows(path) == before
    with sqlite3.connect(path) as db:
        assert set(db.execute("SELECT locks, jobs FROM device")) == {(None, None)}
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0003")
    assert current_revision(engine) == "0003"
    assert not {"locks", "jobs"} & columns() and rows(path) == before
    assert migrate(engine) == head_revision()
    assert {"locks", "jobs"} <= columns() and rows(path) == before
