"""Rollouts through the admin API and the controller's transaction (no broker).

Each test starts from a fresh SQLite file. The controller's look
(:func:`hub.controllers.rollout.driver.advance`) is called directly with an explicit
``now``, and what devices would report is written into their rows, so every step of
a rollout is visible: which version each device's document carries, the generations,
the lease between two hub processes, and a restarted look that changes nothing.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from devtools.broker import free_port
from hub.app import create_app
from hub.controllers.rollout.driver import advance
from hub.db import make_engine, new_session
from hub.devices.models import Device
from hub.settings import HubSettings
from tests.unit.auth_support import api_client

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
IDS = [f"d{i:02d}" for i in range(10)]


class Hub:
    def __init__(self, client: TestClient, db: Path) -> None:
        self.client = client
        self.engine = make_engine(f"sqlite:///{db}", busy_timeout_ms=5000)

    def look(self, at: datetime, owner: str = "hub-a") -> tuple[tuple[str, ...], float | None]:
        with new_session(self.engine) as session:
            return advance(session, now=at, owner=owner, lease_s=30.0, max_config_bytes=65536)

    def device(self, device_id: str) -> dict[str, Any]:
        response = self.client.get(f"devices/{device_id}")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def version(self, device_id: str) -> int | None:
        """Which ``web`` version the device's document carries (None: none)."""
        workloads = self.device(device_id)["desired_config"].get("workloads") or []
        return next((w["config"]["v"] for w in workloads if w["name"] == "web"), None)

    def report(
        self, device_id: str, *, applied: bool = True, at: datetime = T0, **extra: Any
    ) -> None:
        """Write what the device's reports would: its current generation applied (or
        failed), healthy since ``at``."""
        generation = self.device(device_id)["desired_generation"]
        values: dict[str, Any] = {"online": True}
        if applied:
            values.update(reported_generation=generation, healthy_since=at, healthy_reports=5)
        else:
            values.update(failed_generation=generation, report_error="web: not healthy")
        values.update(extra)
        with new_session(self.engine) as session:
            session.connection().execute(
                update(Device).where(Device.id == device_id).values(**values)  # type: ignore[arg-type]
            )
            session.commit()

    def rollout(self, name: str = "web") -> dict[str, Any]:
        response = self.client.get(f"deployments/{name}/rollout")
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    def put(self, v: int, rollout: dict[str, Any] | None) -> Any:
        spec: dict[str, Any] = {
            "selector": "env=prod",
            "workloads": [{"name": "web", "config": {"v": v}}],
        }
        if rollout is not None:
            spec["rollout"] = rollout
        return self.client.put("deployments/web", json={"spec": spec})


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    db = tmp_path / "hub.db"
    settings = HubSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=f"sqlite:///{db}")
    with api_client(create_app(settings, clock=lambda: T0)) as client:
        for device_id in IDS:
            response = client.post("devices", json={"id": device_id, "labels": {"env": "prod"}})
            assert response.status_code == 201, response.text
        instance = Hub(client, db)
        assert instance.put(1, None).status_code == 200
        for device_id in IDS:
            instance.report(device_id)
        yield instance
        instance.engine.dispose()


def test_a_change_with_a_policy_reaches_devices_wave_by_wave(hub: Hub) -> None:
    answer = hub.put(2, {"strategy": "waves", "waves": [2, 3]})
    assert answer.status_code == 200, answer.text
    # Nothing is handed out by the change itself: every device keeps version 1.
    assert [hub.version(d) for d in IDS] == [1] * 10
    assert hub.rollout()["state"] == "scheduled"

    hub.look(T0)
    view = hub.rollout()
    assert view["state"] == "running" and [w["size"] for w in view["waves"]] == [2, 3, 5]
    first = [d for d in IDS if hub.version(d) == 2]
    assert len(first) == 2

    for d in first:
        hub.report(d)
    hub.look(T0 + timedelta(seconds=1))
    second = [d for d in IDS if hub.version(d) == 2 and d not in first]
    assert len(second) == 3, hub.rollout()

    for d in IDS:
        hub.report(d)  # reports for the not yet handed out ones change nothing
    hub.look(T0 + timedelta(seconds=2))
    for d in IDS:
        hub.report(d)
    hub.look(T0 + timedelta(seconds=3))
    view = hub.rollout()
    assert view["state"] == "succeeded", view
    assert view["counts"]["succeeded"] == 10
    assert [hub.version(d) for d in IDS] == [2] * 10


def test_a_preview_shows_where_the_change_ends(hub: Hub) -> None:
    spec = {
        "selector": "env=prod",
        "workloads": [{"name": "web", "config": {"v": 2}}],
        "rollout": {"strategy": "canary", "canary": {"count": 1}},
    }
    answer = hub.client.put("deployments/web", params={"dry_run": "true"}, json={"spec": spec})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["preview"]["devices"]) == 10


def test_an_abort_restores_the_previous_document_as_a_new_generation(hub: Hub) -> None:
    before = {d: hub.device(d) for d in IDS}
    hub.put(2, {"strategy": "canary", "canary": {"count": 2}})
    hub.look(T0)
    canary = [d for d in IDS if hub.version(d) == 2]
    assert len(canary) == 2
    hub.report(canary[0], applied=False)
    hub.look(T0 + timedelta(seconds=1))
    view = hub.rollout()
    assert view["state"] == "aborted" and "threshold" in view["reason"], view
    for d in IDS:
        now = hub.device(d)
        assert now["desired_config"] == before[d]["desired_config"]
        expected = before[d]["desired_generation"] + (2 if d in canary else 0)
        assert now["desired_generation"] == expected, d
    deployment = hub.client.get("deployments/web").json()
    assert deployment["version"] == 3 and deployment["spec"]["workloads"][0]["config"] == {"v": 1}
    # Nothing can clear the abort into a retry; later looks change nothing.
    assert hub.client.post("deployments/web/rollout/resume").status_code == 409
    assert hub.client.post("deployments/web/rollout/retry-failed").status_code == 409
    assert hub.look(T0 + timedelta(seconds=60)) == ((), None)


def test_retry_failed_hands_a_failed_device_a_new_generation(hub: Hub) -> None:
    hub.put(2, {"strategy": "all-at-once", "failure_threshold": {"count": 5}})
    hub.look(T0)
    failed = IDS[0]
    generation = hub.device(failed)["desired_generation"]
    hub.report(failed, applied=False)
    hub.look(T0 + timedelta(seconds=1))
    assert hub.rollout()["counts"]["failed"] == 1
    answer = hub.client.post("deployments/web/rollout/retry-failed")
    assert answer.status_code == 200, answer.text
    hub.look(T0 + timedelta(seconds=2))
    assert hub.device(failed)["desired_generation"] == generation + 1
    assert hub.version(failed) == 2


def test_operator_commands_and_their_refusals(hub: Hub) -> None:
    assert hub.client.get("deployments/web/rollout").status_code == 404
    assert hub.client.post("deployments/web/rollout/pause").status_code == 404
    assert hub.client.post("deployments/web/rollout/explode").status_code == 422
    hub.put(2, {"strategy": "canary", "canary": {"count": 1}})
    hub.look(T0)
    assert hub.client.post("deployments/web/rollout/resume").status_code == 409
    paused = hub.client.post("deployments/web/rollout/pause", json={"reason": "lunch"})
    assert paused.status_code == 200 and paused.json()["state"] == "paused"
    assert "lunch" in paused.json()["reason"]
    hub.look(T0 + timedelta(seconds=1))
    assert len([d for d in IDS if hub.version(d) == 2]) == 1  # nobody more while paused
    resumed = hub.client.post("deployments/web/rollout/resume")
    assert resumed.status_code == 200 and resumed.json()["state"] == "running"
    listed = hub.client.get("rollouts", params={"deployment": "web"}).json()["items"]
    assert [r["deployment"] for r in listed] == ["web"]
    assert hub.client.get(f"rollouts/{listed[0]['id']}").status_code == 200
    assert hub.client.get("rollouts/999").status_code == 404


def test_a_bad_policy_is_refused_with_the_field_named(hub: Hub) -> None:
    answer = hub.put(2, {"strategy": "sideways"})
    assert answer.status_code == 422
    answer = hub.put(2, {"strategy": "canary", "canary": {"percent": 0}})
    assert answer.status_code == 422
    answer = hub.put(2, {"strategy": "all-at-once", "activate_at": "2026-12-07T00:00:00Z"})
    assert answer.status_code == 422 and "activate_at" in answer.text


def test_two_hubs_never_both_advance_one_rollout(hub: Hub) -> None:
    hub.put(2, {"strategy": "waves", "waves": [2]})
    hub.look(T0, owner="hub-a")
    handed = sorted(d for d in IDS if hub.version(d) == 2)
    for d in handed:
        hub.report(d)
    # hub-b looks while hub-a's lease runs: it leaves the rollout alone.
    assert hub.look(T0 + timedelta(seconds=1), owner="hub-b") == ((), 30.0)
    assert sorted(d for d in IDS if hub.version(d) == 2) == handed
    # hub-a stops renewing; once the lease lapses hub-b carries on from the rows.
    bumped, _ = hub.look(T0 + timedelta(seconds=31), owner="hub-b")
    assert len(bumped) == 8
    assert hub.rollout()["state"] == "running"


def test_a_restarted_controller_changes_nothing_it_already_did(hub: Hub) -> None:
    hub.put(2, {"strategy": "waves", "waves": [3]})
    hub.look(T0)
    before = {d: hub.device(d)["desired_generation"] for d in IDS}
    # A new process (a fresh look, nothing in memory) at the same instant.
    bumped, _ = hub.look(T0)
    assert bumped == ()
    assert {d: hub.device(d)["desired_generation"] for d in IDS} == before


def test_an_operators_abort_restores_in_its_own_request(hub: Hub) -> None:
    before = {d: hub.device(d) for d in IDS}
    hub.put(2, {"strategy": "canary", "canary": {"count": 2}})
    hub.look(T0)
    canary = [d for d in IDS if hub.version(d) == 2]
    answer = hub.client.post("deployments/web/rollout/abort", json={"reason": "smoke"})
    assert answer.status_code == 200 and answer.json()["state"] == "aborted", answer.text
    # No controller look in between: the request itself restored the documents.
    for d in canary:
        assert hub.device(d)["desired_config"] == before[d]["desired_config"]
        assert hub.device(d)["desired_generation"] == before[d]["desired_generation"] + 2


def test_the_rollouts_devices_page_shows_where_each_stands(hub: Hub) -> None:
    hub.put(2, {"strategy": "waves", "waves": [3]})
    hub.look(T0)
    rollout_id = hub.rollout()["id"]
    page = hub.client.get(f"rollouts/{rollout_id}/devices", params={"state": "in_flight"})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["total"] == 3 and all(d["wave"] == 0 for d in body["items"])
    assert all(
        d["generation"] == hub.device(d["device_id"])["desired_generation"] for d in body["items"]
    )
    pending = hub.client.get(
        f"rollouts/{rollout_id}/devices", params={"state": "pending", "limit": 2}
    )
    assert pending.json()["total"] == 7 and len(pending.json()["items"]) == 2
    lost = hub.client.get(f"rollouts/{rollout_id}/devices", params={"state": "lost"})
    assert lost.status_code == 422
    assert hub.client.get("rollouts/999/devices").status_code == 404
    # No command route swallows the listing's path: another method is a 405.
    assert hub.client.post(f"rollouts/{rollout_id}/devices").status_code == 405
    assert hub.client.post("deployments/web/rollout/devices").status_code == 422  # no action


def test_a_policy_change_alone_steers_the_running_rollout(hub: Hub) -> None:
    hub.put(2, {"strategy": "waves", "waves": [2], "max_in_flight": 1})
    hub.look(T0)
    assert len([d for d in IDS if hub.version(d) == 2]) == 1
    hub.put(2, {"strategy": "waves", "waves": [2], "max_in_flight": 2})  # same workloads
    listed = hub.client.get("rollouts", params={"deployment": "web"}).json()["items"]
    assert len(listed) == 1 and listed[0]["policy"]["max_in_flight"] == 2
    hub.look(T0 + timedelta(seconds=1))
    assert len([d for d in IDS if hub.version(d) == 2]) == 2


def test_a_rollout_with_a_start_time_waits_for_it(hub: Hub) -> None:
    start = (T0 + timedelta(hours=1)).isoformat()
    assert hub.put(2, {"strategy": "all-at-once", "start_at": start}).status_code == 200
    hub.look(T0)
    assert hub.rollout()["state"] == "scheduled"
    assert [hub.version(d) for d in IDS] == [1] * 10
    hub.look(T0 + timedelta(hours=1, seconds=1))
    assert hub.rollout()["state"] == "running"
    assert [hub.version(d) for d in IDS] == [2] * 10


def test_a_look_with_nothing_to_do_takes_no_write_lock(hub: Hub, tmp_path: Path) -> None:
    hub.put(2, {"strategy": "waves", "waves": [2]})
    hub.look(T0)
    # Another writer holds the database (as ingest does in a batch): a look that would
    # change nothing returns at once instead of waiting for it.
    writer = sqlite3.connect(tmp_path / "hub.db", timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        assert hub.look(T0 + timedelta(seconds=1)) == ((), 599.0)  # the apply deadline
        assert time.monotonic() - started < 2.0
    finally:
        writer.rollback()
        writer.close()
    # Evidence arrives: the next look writes again.
    for d in [d for d in IDS if hub.version(d) == 2]:
        hub.report(d)
    hub.look(T0 + timedelta(seconds=2))
    assert hub.rollout()["counts"]["succeeded"] == 2
