"""The admin API against a fresh SQLite file per test, with the MQTT link not connected.

The broker URL points at a port nobody listens on: the link keeps retrying in the
background, which is exactly the "broker down" case the API must tolerate.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devtools.broker import free_port
from hub.app import create_app
from hub.settings import HubSettings, parse_broker_url
from tests.unit.auth_support import api_client

MAX_CONFIG_BYTES = 4096


@pytest.fixture
def settings(tmp_path: Path) -> HubSettings:
    return HubSettings(
        broker_url=f"mqtt://127.0.0.1:{free_port()}",
        db_url=f"sqlite:///{tmp_path / 'db' / 'hub.db'}",
        max_config_bytes=MAX_CONFIG_BYTES,
        max_request_body_bytes=64 * 1024,
        page_size_default=20,
        page_size_max=50,
    )


@pytest.fixture
def client(settings: HubSettings) -> Iterator[TestClient]:
    with api_client(create_app(settings)) as c:
        yield c


def register(client: TestClient, device_id: str, **labels: str) -> dict[str, Any]:
    response = client.post("devices", json={"id": device_id, "labels": labels})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_sqlite_parent_directory_is_created(settings: HubSettings, client: TestClient) -> None:
    assert Path(settings.db_url.removeprefix("sqlite:///")).is_file()


def test_health_reports_link_down(client: TestClient) -> None:
    assert client.get("health").json() == {"status": "ok", "mqtt_connected": False}
    stats = client.get("hub/stats").json()
    assert stats["mqtt_connected"] is False
    assert stats["rejected"] == {}


def test_register_returns_201_and_public_device(client: TestClient) -> None:
    device = register(client, "dev-1", site="lab")
    assert device["id"] == "dev-1"
    assert device["labels"] == {"site": "lab"}
    assert device["desired_generation"] == 0
    assert device["reported_generation"] == 0
    assert device["in_sync"] is True
    assert device["online"] is False
    assert device["session"] == -1
    assert device["last_report_epoch"] == -1 and device["last_report_seq"] == -1
    assert device["status"] == {"phase": None, "generation": 0, "error": None}
    assert client.get("devices/dev-1").json() == device


def test_duplicate_register_is_409(client: TestClient) -> None:
    register(client, "dev-1")
    response = client.post("devices", json={"id": "dev-1"})
    assert response.status_code == 409
    assert "already registered" in response.json()["detail"]


@pytest.mark.parametrize(
    "device_id",
    [
        pytest.param("a/b", id="slash"),
        pytest.param("+", id="plus"),
        pytest.param("#", id="hash"),
        pytest.param("x" * 65, id="65-chars"),
        pytest.param("", id="empty"),
        pytest.param("-lead", id="leading-dash"),
        pytest.param("sp ace", id="space"),
    ],
)
def test_bad_device_id_is_422(client: TestClient, device_id: str) -> None:
    response = client.post("devices", json={"id": device_id})
    assert response.status_code == 422, response.text
    assert client.get("devices").json()["total"] == 0


def test_64_char_id_is_accepted(client: TestClient) -> None:
    register(client, "x" * 64)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing-id"),
        pytest.param({"id": 5}, id="id-not-string"),
        pytest.param({"id": "d", "labels": {"k": 1}}, id="label-value-not-string"),
        pytest.param({"id": "d", "labels": {"bad key": "v"}}, id="label-key-space"),
        pytest.param({"id": "d", "labels": {"k": 'q"uote'}}, id="label-value-quote"),
        pytest.param({"id": "d", "labels": {f"k{i}": "v" for i in range(33)}}, id="too-many"),
        pytest.param({"id": "d", "extra": 1}, id="unknown-field"),
    ],
)
def test_bad_register_body_is_422(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("devices", json=body).status_code == 422


def test_unknown_device_is_404(client: TestClient) -> None:
    for response in (
        client.get("devices/ghost"),
        client.put("devices/ghost/desired", json={"config": {}}),
        client.delete("devices/ghost"),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["detail"] == "device 'ghost' is not registered"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({}, id="missing-config"),
        pytest.param({"config": [1, 2]}, id="config-not-object"),
        pytest.param({"config": "x"}, id="config-string"),
        pytest.param({"config": {}, "generation": 7}, id="client-chosen-generation"),
    ],
)
def test_bad_desired_body_is_422(client: TestClient, body: dict[str, Any]) -> None:
    register(client, "dev-1")
    assert client.put("devices/dev-1/desired", json=body).status_code == 422
    assert client.get("devices/dev-1").json()["desired_generation"] == 0


def test_desired_generation_bumps_by_exactly_one_per_put(client: TestClient) -> None:
    register(client, "dev-1")
    for expected in (1, 2, 3):
        response = client.put("devices/dev-1/desired", json={"config": {"rate": expected}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["desired_generation"] == expected
        assert body["desired_config"] == {"rate": expected}
        assert body["in_sync"] is False
    # the same document again is still a change request: a new generation
    again = client.put("devices/dev-1/desired", json={"config": {"rate": 3}}).json()
    assert again["desired_generation"] == 4
    assert client.get("devices/dev-1").json()["desired_generation"] == 4


def test_oversized_config_is_413_and_nothing_changes(client: TestClient) -> None:
    register(client, "dev-1")
    client.put("devices/dev-1/desired", json={"config": {"ok": True}})
    big = {"blob": "x" * MAX_CONFIG_BYTES}
    response = client.put("devices/dev-1/desired", json={"config": big})
    assert response.status_code == 413
    assert "max_config_bytes" in response.json()["detail"]
    device = client.get("devices/dev-1").json()
    assert device["desired_generation"] == 1
    assert device["desired_config"] == {"ok": True}


def test_config_just_under_the_limit_is_accepted(client: TestClient) -> None:
    register(client, "dev-1")
    overhead = len('{"blob":""}')
    config = {"blob": "x" * (MAX_CONFIG_BYTES - overhead)}
    assert client.put("devices/dev-1/desired", json={"config": config}).status_code == 200


def test_request_body_over_the_http_limit_is_413(client: TestClient) -> None:
    register(client, "dev-1")
    response = client.put(
        "devices/dev-1/desired",
        content=b'{"config": {"blob": "' + b"x" * (64 * 1024) + b'"}}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413


def test_delete_decommissions_and_purge_forgets(client: TestClient) -> None:
    """Plain MQTT (no identities to cut off): the purge needs no broker confirmation."""
    register(client, "dev-1")
    assert client.delete("devices/dev-1?purge=true").status_code == 409  # active: not yet
    assert client.delete("devices/dev-1").status_code == 204
    device = client.get("devices/dev-1").json()  # still visible, for the operator
    assert device["state"] == "decommissioned" and device["decommissioned_at"] is not None
    assert device["broker_cut_off_at"] is None
    assert client.post("devices", json={"id": "dev-1"}).status_code == 409
    assert client.put("devices/dev-1/desired", json={"config": {}}).status_code == 409
    assert client.delete("devices/dev-1").status_code == 204  # again: idempotent
    listed = client.get("devices", params={"state": "decommissioned"}).json()
    assert [d["id"] for d in listed["items"]] == ["dev-1"]
    assert client.get("devices", params={"state": "active"}).json()["total"] == 0
    assert client.delete("devices/dev-1?purge=true").status_code == 204
    assert client.get("devices/dev-1").status_code == 404
    register(client, "dev-1")  # the id can be registered again


def test_paging_is_ordered_by_id_with_total(client: TestClient) -> None:
    for i in range(7):
        register(client, f"dev-{i}")
    first = client.get("devices", params={"limit": 3}).json()
    assert first["total"] == 7 and first["limit"] == 3 and first["offset"] == 0
    assert [d["id"] for d in first["items"]] == ["dev-0", "dev-1", "dev-2"]
    last = client.get("devices", params={"limit": 3, "offset": 6}).json()
    assert [d["id"] for d in last["items"]] == ["dev-6"]
    beyond = client.get("devices", params={"offset": 100}).json()
    assert beyond["items"] == [] and beyond["total"] == 7
    assert client.get("devices").json()["limit"] == 20  # page_size_default


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": 0}, id="limit-zero"),
        pytest.param({"limit": 51}, id="limit-over-max"),
        pytest.param({"offset": -1}, id="negative-offset"),
        pytest.param({"label": "novalue"}, id="label-without-equals"),
        pytest.param({"label": "k=a b"}, id="label-bad-value"),
    ],
)
def test_bad_list_parameters_are_422(client: TestClient, params: dict[str, Any]) -> None:
    assert client.get("devices", params=params).status_code == 422


def test_label_filter_ands_pairs(client: TestClient) -> None:
    register(client, "a", site="lab", role="gw")
    register(client, "b", site="lab", role="sensor")
    register(client, "c", site="field", role="gw")
    register(client, "d")

    def ids(*labels: str) -> list[str]:
        page = client.get("devices", params={"label": list(labels)}).json()
        assert page["total"] == len(page["items"])
        return [d["id"] for d in page["items"]]

    assert ids("site=lab") == ["a", "b"]
    assert ids("site=lab", "role=gw") == ["a"]
    assert ids("role=gw") == ["a", "c"]
    assert ids("site=nowhere") == []
    assert ids() == ["a", "b", "c", "d"]


def test_bulk_desired_by_selector_bumps_each_matching_device_once(client: TestClient) -> None:
    register(client, "a", site="lab")
    register(client, "b", site="lab")
    register(client, "c", site="field")
    client.put("devices/a/desired", json={"config": {"v": 0}})  # a is at generation 1

    response = client.put(
        "fleet/desired", json={"selector": {"labels": {"site": "lab"}}, "config": {"v": 1}}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {
        "updated": 2,
        "devices": [{"id": "a", "generation": 2}, {"id": "b", "generation": 1}],
    }
    assert client.get("devices/c").json()["desired_generation"] == 0
    assert client.get("devices/b").json()["desired_config"] == {"v": 1}

    everyone = client.put("fleet/desired", json={"config": {"v": 2}}).json()
    assert everyone["updated"] == 3
    assert {d["id"]: d["generation"] for d in everyone["devices"]} == {"a": 3, "b": 2, "c": 1}


def test_bulk_desired_matching_nothing_and_bad_bodies(client: TestClient) -> None:
    register(client, "a")
    nothing = client.put(
        "fleet/desired", json={"selector": {"labels": {"site": "moon"}}, "config": {}}
    )
    assert nothing.json() == {"updated": 0, "devices": []}
    assert client.put("fleet/desired", json={"selector": {}}).status_code == 422
    too_big = {"config": {"blob": "x" * MAX_CONFIG_BYTES}}
    assert client.put("fleet/desired", json=too_big).status_code == 413
    assert client.get("devices/a").json()["desired_generation"] == 0


def test_bulk_desired_for_many_devices_is_one_request(client: TestClient) -> None:
    for i in range(100):
        register(client, f"d{i:04d}")
    result = client.put("fleet/desired", json={"config": {"rate": 5}}).json()
    assert result["updated"] == 100
    assert {d["generation"] for d in result["devices"]} == {1}
    summary = client.get("fleet/summary").json()
    assert summary["total"] == 100
    assert summary["in_sync"] == 0 and summary["out_of_sync"] == 100
    assert summary["by_generation"] == {"1": 100}


def test_fleet_summary_counts(client: TestClient) -> None:
    assert client.get("fleet/summary").json() == {
        "total": 0,
        "online": 0,
        "in_sync": 0,
        "out_of_sync": 0,
        "failed": 0,
        "by_generation": {},
        "decommissioned": 0,
    }
    register(client, "a")
    register(client, "b")
    client.put("devices/a/desired", json={"config": {}})
    summary = client.get("fleet/summary").json()
    assert summary["total"] == 2
    assert summary["in_sync"] == 1  # b: nothing desired, nothing reported
    assert summary["out_of_sync"] == 1
    assert summary["by_generation"] == {"0": 1, "1": 1}


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("http://hub/docs").status_code == 200
    paths = client.get("http://hub/openapi.json").json()["paths"]
    assert "/api/v1/devices/{device_id}/desired" in paths
    assert "/api/v1/fleet/desired" in paths


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("tcp://h:1", "must start with mqtt://", id="scheme"),
        pytest.param("mqtt://:1883", "no host", id="no-host"),
        pytest.param("mqtt://h:notaport", "invalid port", id="port"),
        pytest.param("mqtt://h:1/path", "only mqtt://HOST:PORT", id="path"),
    ],
)
def test_bad_broker_url_is_rejected_at_start(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HubSettings(broker_url=url, db_url="sqlite:///x.db")


def test_broker_url_default_port() -> None:
    assert parse_broker_url("mqtt://broker.example").port == 1883
    assert parse_broker_url("mqtt://127.0.0.1:1884").url == "mqtt://127.0.0.1:1884"
    tls = parse_broker_url("mqtts://broker.example")  # mutual TLS to the broker
    assert (tls.tls, tls.port) == (True, 8883)


def test_batch_registration_is_idempotent(client: TestClient) -> None:
    register(client, "d-0", site="old")
    body = {"devices": [{"id": f"d-{i}", "labels": {"site": "new"}} for i in range(3)]}
    first = client.post("devices/batch", json=body)
    assert first.status_code == 200
    assert first.json() == {"created": ["d-1", "d-2"], "existing": ["d-0"]}
    assert client.post("devices/batch", json=body).json()["created"] == []
    assert client.get("devices/d-0").json()["labels"] == {"site": "old"}
    assert client.get("devices").json()["total"] == 3


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"devices": []}, id="empty"),
        pytest.param({"devices": [{"id": "a/b"}]}, id="bad-id"),
        pytest.param({"devices": [{"id": "ok"}], "extra": 1}, id="unknown-field"),
    ],
)
def test_batch_registration_rejects_bad_bodies(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("devices/batch", json=body)
    assert response.status_code == 422
    assert client.get("devices").json()["total"] == 0
