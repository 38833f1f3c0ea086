"""Deployments, labels, previews and device events through the admin API (no broker).

Each test starts from a fresh SQLite file; the link is not connected (documents are
committed; delivery is another test's business).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devtools.broker import free_port
from hub.app import create_app
from hub.settings import HubSettings
from tests.unit.auth_support import api_client


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = HubSettings(
        broker_url=f"mqtt://127.0.0.1:{free_port()}",
        db_url=f"sqlite:///{tmp_path / 'hub.db'}",
        max_config_bytes=8192,
    )
    with api_client(create_app(settings)) as c:
        yield c


def register(client: TestClient, device_id: str, **labels: str) -> None:
    response = client.post("devices", json={"id": device_id, "labels": labels})
    assert response.status_code == 201, response.text


def device(client: TestClient, device_id: str) -> dict[str, Any]:
    response = client.get(f"devices/{device_id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def workload(name: str, **config: Any) -> dict[str, Any]:
    return {"name": name, "config": config}


def put(client: TestClient, name: str, spec: dict[str, Any], *, dry_run: bool = False) -> Any:
    return client.put(
        f"deployments/{name}", params={"dry_run": str(dry_run).lower()}, json={"spec": spec}
    )


def test_a_fleet_deployment_reaches_matching_devices_and_one_registered_later(
    client: TestClient,
) -> None:
    register(client, "eu-1", env="prod", region="eu")
    register(client, "us-1", env="prod", region="us")
    register(client, "ap-1", env="prod", region="ap")
    spec = {"selector": "env=prod,region in (eu,us)", "workloads": [workload("web", v=1)]}
    answer = put(client, "web", spec)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["dry_run"] is False and body["deployment"]["version"] == 1
    assert sorted(d["device_id"] for d in body["preview"]["devices"]) == ["eu-1", "us-1"]
    assert device(client, "eu-1")["desired_config"] == {"workloads": [workload("web", v=1)]}
    assert device(client, "eu-1")["contributions"] == {"web": "deployment:web"}
    assert device(client, "ap-1")["desired_generation"] == 0
    # The device's labels change: the deployment follows in the same request.
    patched = client.patch("devices/ap-1/labels", json={"region": "eu"})
    assert patched.status_code == 200, patched.text
    assert patched.json()["desired_config"] == {"workloads": [workload("web", v=1)]}
    assert patched.json()["desired_generation"] == 1


def test_layers_merge_by_priority_and_a_no_op_bumps_nothing(client: TestClient) -> None:
    register(client, "d1", env="prod", canary="yes")
    register(client, "d2", env="prod")
    client.put("devices/d1/desired", json={"config": {"rate": 5, "workloads": [workload("own")]}})
    base = {"selector": "env=prod", "priority": 0, "workloads": [workload("web", v=1)]}
    layer = {"selector": "canary", "priority": 10, "workloads": [workload("web", v=2)]}
    assert put(client, "base", base).status_code == 200
    assert put(client, "canary", layer).status_code == 200
    d1 = device(client, "d1")
    assert d1["desired_config"] == {
        "rate": 5,
        "workloads": [workload("own"), workload("web", v=2)],
    }
    assert d1["contributions"] == {"own": "device", "web": "deployment:canary"}
    assert device(client, "d2")["desired_config"] == {"workloads": [workload("web", v=1)]}
    generations = {d: device(client, d)["desired_generation"] for d in ("d1", "d2")}
    # The same spec again: no generation moves, and the preview says nothing changes.
    again = put(client, "canary", layer)
    assert again.json()["preview"]["summary"]["changed"] == 0
    assert again.json()["deployment"]["version"] == 1
    assert {d: device(client, d)["desired_generation"] for d in ("d1", "d2")} == generations


def test_the_preview_is_what_the_change_then_does(client: TestClient) -> None:
    for i in range(6):
        register(client, f"d{i}", env="prod" if i % 2 else "dev")
    spec = {"selector": "env=prod", "workloads": [workload("web", v=1)]}
    preview = put(client, "web", spec, dry_run=True).json()
    assert preview["dry_run"] is True
    assert all(device(client, f"d{i}")["desired_generation"] == 0 for i in range(6))
    assert client.get("deployments/web").status_code == 404  # nothing stored
    done = put(client, "web", spec).json()
    assert done["preview"] == preview["preview"]
    for entry in preview["preview"]["devices"]:
        assert device(client, entry["device_id"])["desired_config"]["workloads"] == [
            entry["after"]["web"]
        ]
    removal = client.delete("deployments/web", params={"dry_run": "true"}).json()
    assert {d["device_id"] for d in removal["preview"]["devices"]} == {"d1", "d3", "d5"}
    assert client.delete("deployments/web").status_code == 200
    assert device(client, "d1")["desired_config"] == {}
    assert device(client, "d1")["desired_generation"] == 2


def test_unplaceable_devices_carry_their_reasons(client: TestClient) -> None:
    register(client, "d1", env="prod")
    spec = {
        "selector": "env=prod",
        "workloads": [workload("web")],
        "constraints": [{"attribute": "arch", "op": "=", "value": "aarch64"}],
    }
    body = put(client, "web", spec).json()
    assert body["preview"]["unplaceable"] == [{"device_id": "d1", "reasons": ["no inventory yet"]}]
    status = client.get("deployments/web/status").json()
    assert status["targeted"] == 1 and status["placed"] == 0 and status["unplaceable"] == 1
    assert status["reasons"] == {"no inventory yet": 1}


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ({"selector": "env in (", "workloads": []}, "selector"),
        ({"kind": "fleet", "replicas": 2, "workloads": []}, "replicas"),
        ({"workloads": [], "bogus": 1}, "bogus"),
        ({"workloads": [{"name": "w", "bundle": "ab" * 32}]}, "bundle"),
        ({"workloads": [], "priority": 5000}, "priority"),
    ],
)
def test_a_bad_spec_is_a_422_naming_the_problem(
    client: TestClient, spec: dict[str, Any], why: str
) -> None:
    answer = put(client, "web", spec)
    assert answer.status_code == 422, answer.text
    assert why in answer.text
    assert client.get("deployments/web").status_code == 404


def test_labels_put_patch_and_bad_labels(client: TestClient) -> None:
    register(client, "d1", env="prod", legacy="yes")
    assert client.put("devices/d1/labels", json={"labels": {"a": "1"}}).json()["labels"] == {
        "a": "1"
    }
    assert client.patch("devices/d1/labels", json={"a": None, "b": "2"}).json()["labels"] == {
        "b": "2"
    }
    assert client.patch("devices/d1/labels", json={"bad key": "x"}).status_code == 422
    assert client.patch("devices/d1/labels", json={"k": "bad value!"}).status_code == 422
    assert client.patch("devices/nope/labels", json={"k": "v"}).status_code == 404
    listed = client.get("devices", params={"selector": "b in (2,3),!a"}).json()
    assert [d["id"] for d in listed["items"]] == ["d1"] and listed["total"] == 1
    assert client.get("devices", params={"selector": "b in (("}).status_code == 422


def test_device_events_record_placements(client: TestClient) -> None:
    register(client, "d1", env="prod")
    put(client, "web", {"selector": "env=prod", "workloads": [workload("web")]})
    events = client.get("devices/d1/events").json()
    assert events["total"] >= 1
    assert events["items"][0]["kind"] == "placed" and events["items"][0]["deployment"] == "web"
    assert client.get("devices/nope/events").status_code == 404


def test_reported_outcomes_become_events_once_without_a_plan(client: TestClient) -> None:
    """The controller's cheap pass: applied/failed once per generation, for devices with
    deployments; a device without any moves its mark silently."""
    import datetime as dt

    from sqlalchemy import update

    from hub.db import new_session
    from hub.deployments import reconcile
    from hub.devices.models import Device

    register(client, "d1", env="prod")
    register(client, "d2", env="prod")
    register(client, "solo")
    put(client, "web", {"selector": "env=prod", "workloads": [workload("web")]})
    client.put("devices/solo/desired", json={"config": {"rate": 1}})
    engine = client.app.state.context.engine  # type: ignore[attr-defined]
    now = dt.datetime(2026, 12, 6, tzinfo=dt.UTC)
    with new_session(engine) as session:
        session.exec(update(Device).where(Device.id == "d1").values(reported_generation=1))
        session.exec(update(Device).where(Device.id == "d2").values(failed_generation=1))
        session.exec(update(Device).where(Device.id == "solo").values(reported_generation=1))
        session.commit()
        assert reconcile.record_outcomes(session, now=now) == 2
        assert reconcile.record_outcomes(session, now=now) == 0  # once per generation
    kinds = {
        d: [e["kind"] for e in client.get(f"devices/{d}/events").json()["items"]]
        for d in ("d1", "d2", "solo")
    }
    assert kinds == {"d1": ["applied", "placed"], "d2": ["failed", "placed"], "solo": []}
    detail = client.get("devices/d1/events").json()["items"][0]["detail"]
    assert detail == "generation 1 applied (deployment:web)"
