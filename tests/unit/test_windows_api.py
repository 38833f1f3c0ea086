"""``/api/v1/windows`` in-process (no broker): validation, views, zones, the 409 on delete."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from devtools.broker import free_port
from hub.app import create_app
from hub.auth.models import Role
from hub.db import new_session
from hub.rollouts.models import Rollout
from hub.settings import HubSettings
from tests.unit.auth_support import api_client, bearer, mint

NOW = datetime(2026, 12, 6, 1, 30, tzinfo=UTC)  # 02:30 in Berlin


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = HubSettings(
        broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=f"sqlite:///{tmp_path / 'hub.db'}"
    )
    with api_client(create_app(settings, clock=lambda: NOW)) as c:
        yield c


def test_put_get_list_delete(client: TestClient) -> None:
    answer = client.put("windows/nightly", json={"cron": "0 1 * * *", "duration_s": 3600})
    assert answer.status_code == 200, answer.text
    view = answer.json()
    assert view["timezone"] == "UTC" and view["open_now"] is True
    assert view["closes_at"].startswith("2026-12-06T02:00:00")
    assert view["next_open"].startswith("2026-12-07T01:00:00")
    again = client.get("windows/nightly").json()
    assert again["open_now"] is True and again["zones"] is None
    replaced = client.put("windows/nightly", json={"cron": "0 3 * * *", "duration_s": 600})
    assert replaced.json()["open_now"] is False
    assert replaced.json()["next_open"].startswith("2026-12-06T03:00:00")
    assert [w["name"] for w in client.get("windows").json()["items"]] == ["nightly"]
    assert client.delete("windows/nightly").status_code == 204
    assert client.get("windows/nightly").status_code == 404
    assert client.delete("windows/nightly").status_code == 404


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        pytest.param({"cron": "0 1 * *", "duration_s": 60}, "cron: 5 fields", id="bad-cron"),
        pytest.param({"cron": "0 1 * * 9", "duration_s": 60}, "day of week", id="bad-weekday"),
        pytest.param({"cron": "0 1 * * *", "duration_s": 0}, "duration_s", id="zero"),
        pytest.param({"cron": "0 1 * * *", "duration_s": 700000}, "duration_s", id="too-long"),
        pytest.param(
            {"cron": "0 1 * * *", "duration_s": 60, "timezone": "Mars/Base"},
            "timezone:",
            id="bad-zone",
        ),
    ],
)
def test_bad_windows_are_422_naming_the_field(
    client: TestClient, body: dict[str, object], detail: str
) -> None:
    answer = client.put("windows/w", json=body)
    assert answer.status_code == 422, answer.text
    problem = answer.json()
    # The store's check names the field in the detail; the schema's in ``errors``.
    named = [str(e["loc"][-1]) + ":" for e in problem.get("errors") or []]
    assert detail in problem["detail"] or any(detail.startswith(n) for n in named), problem
    assert client.get("windows/w").status_code == 404


def test_schema_refusals(client: TestClient) -> None:
    assert (
        client.put("windows/Bad_Name", json={"cron": "0 1 * * *", "duration_s": 1}).status_code
        == 422
    )
    extra = client.put("windows/w", json={"cron": "0 1 * * *", "duration_s": 1, "x": 1})
    assert extra.status_code == 422


def test_a_label_window_shows_zones_and_devices_that_fell_back(client: TestClient) -> None:
    for device_id, labels in [
        ("b1", {"tz": "Europe.Berlin"}),
        ("b2", {"tz": "Europe.Berlin"}),
        ("t1", {"tz": "Asia.Tokyo"}),
        ("n1", {}),
        ("x1", {"tz": "Nowhere"}),
    ]:
        assert client.post("devices", json={"id": device_id, "labels": labels}).status_code == 201
    put = client.put(
        "windows/local", json={"cron": "0 2 * * *", "duration_s": 3600, "timezone": "label:tz"}
    )
    assert put.status_code == 200, put.text
    view = client.get("windows/local").json()
    zones = {z["zone"]: z for z in view["zones"]}
    assert {z: zones[z]["devices"] for z in zones} == {
        "Asia/Tokyo": 1,
        "Europe/Berlin": 2,
        "UTC": 2,
    }
    assert zones["Europe/Berlin"]["open_now"] is True
    assert zones["UTC"]["open_now"] is False and zones["Asia/Tokyo"]["open_now"] is False
    assert view["unzoned_devices"] == 2
    assert {u["device_id"]: u["reason"] for u in view["unzoned"]} == {
        "n1": "no label 'tz'",
        "x1": "label tz='Nowhere' names no time zone",
    }


def test_delete_is_409_while_a_rollout_that_has_not_finished_names_it(
    client: TestClient,
) -> None:
    assert (
        client.put("windows/nightly", json={"cron": "0 1 * * *", "duration_s": 60}).status_code
        == 200
    )
    engine = client.app.state.context.engine  # type: ignore[attr-defined]
    with new_session(engine) as session:
        for state in ("running", "succeeded"):
            session.add(
                Rollout(
                    deployment="web",
                    to_version=2,
                    policy={"window": "nightly"},
                    state=state,
                    created_at=NOW,
                    updated_at=NOW,
                )
            )
        session.add(
            Rollout(
                deployment="db",
                to_version=2,
                policy={"window": "other"},
                state="running",
                created_at=NOW,
                updated_at=NOW,
            )
        )
        session.commit()
    refused = client.delete("windows/nightly")
    assert refused.status_code == 409, refused.text
    assert "rollouts that have not finished (1)" in refused.json()["detail"]
    with new_session(engine) as session:
        row = session.get(Rollout, 1)
        assert row is not None
        row.state = "aborted"
        session.add(row)
        session.commit()
    assert client.delete("windows/nightly").status_code == 204


def test_changing_needs_operator_reading_any_token(client: TestClient) -> None:
    viewer = bearer(mint(client.app, Role.viewer))  # type: ignore[arg-type]
    body = {"cron": "0 1 * * *", "duration_s": 60}
    assert client.put("windows/w", json=body, headers=viewer).status_code == 403
    assert client.put("windows/w", json=body).status_code == 200
    assert client.get("windows/w", headers=viewer).status_code == 200
    assert client.delete("windows/w", headers=viewer).status_code == 403
