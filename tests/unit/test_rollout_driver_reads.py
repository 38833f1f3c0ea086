"""The rollout controller's reads (hub/controllers/rollout/driver.py) on a real database.

A look reads only plain columns of every device; the JSON ones are read when a rule
needs them: the devices' assignments when a rollout starts (its members), their labels
when the policy names a maintenance window whose time zone is a label. These tests
drive :func:`advance` through both, so a column left out of a read fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devtools.broker import free_port
from hub.app import create_app
from hub.controllers.rollout.driver import advance
from hub.db import make_engine, new_session
from hub.settings import HubSettings
from tests.unit.auth_support import api_client

NOW = datetime(2026, 12, 6, 1, 30, tzinfo=UTC)  # 02:30 in Berlin, 10:30 in Tokyo
ZONES = {"b1": "Europe.Berlin", "b2": "Europe.Berlin", "t1": "Asia.Tokyo", "t2": "Asia.Tokyo"}
OUTSIDER = "o1"  # matches no selector: never a member


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = HubSettings(
        broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=f"sqlite:///{tmp_path / 'hub.db'}"
    )
    with api_client(create_app(settings, clock=lambda: NOW)) as c:
        for device_id, zone in ZONES.items():
            body = {"id": device_id, "labels": {"env": "prod", "tz": zone}}
            assert c.post("devices", json=body).status_code == 201
        assert c.post("devices", json={"id": OUTSIDER, "labels": {"env": "dev"}}).status_code == 201
        yield c


def look(client: TestClient, at: datetime) -> tuple[tuple[str, ...], float | None]:
    engine = make_engine(str(client.app.state.context.engine.url), busy_timeout_ms=5000)  # type: ignore[attr-defined]
    try:
        with new_session(engine) as session:
            return advance(session, now=at, owner="hub-a", lease_s=30.0, max_config_bytes=65536)
    finally:
        engine.dispose()


def put(client: TestClient, v: int, rollout: dict[str, Any] | None) -> None:
    spec: dict[str, Any] = {
        "selector": "env=prod",
        "workloads": [{"name": "web", "config": {"v": v}}],
    }
    if rollout is not None:
        spec["rollout"] = rollout
    answer = client.put("deployments/web", json={"spec": spec})
    assert answer.status_code == 200, answer.text


def test_a_label_window_admits_the_devices_whose_zone_is_open_and_holds_the_rest(
    client: TestClient,
) -> None:
    window = {"cron": "0 2 * * *", "duration_s": 3600, "timezone": "label:tz"}
    assert client.put("windows/local", json=window).status_code == 200
    put(client, 1, None)
    put(client, 2, {"strategy": "all-at-once", "window": "local"})

    bumped, _ = look(client, NOW)

    view = client.get("deployments/web/rollout").json()
    assert view["state"] == "running", view
    assert view["targeted"] == len(ZONES)  # the members: assigned devices, not o1
    assert view["counts"]["in_flight"] == 2 and view["counts"]["waiting_window"] == 2, view
    states = {}
    for device_id in ZONES:
        config = client.get(f"devices/{device_id}").json()["desired_config"]
        states[device_id] = "held" if config.get("hold") else config["workloads"][0]["config"]
    assert states == {"b1": {"v": 2}, "b2": {"v": 2}, "t1": "held", "t2": "held"}
    assert set(bumped) == set(ZONES)


def test_a_rollout_starts_with_the_devices_its_deployment_is_assigned_to(
    client: TestClient,
) -> None:
    put(client, 1, None)
    put(client, 2, {"strategy": "waves", "waves": [1]})

    bumped, _ = look(client, NOW)

    view = client.get("deployments/web/rollout").json()
    assert view["targeted"] == len(ZONES)
    assert [w["size"] for w in view["waves"]] == [1, 3]
    assert len(bumped) == 1 and bumped[0] in ZONES
    assert client.get(f"devices/{OUTSIDER}").json()["desired_config"].get("workloads") is None
