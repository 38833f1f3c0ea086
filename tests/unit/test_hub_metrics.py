"""``GET /metrics`` in-process: who may read it, what it counts, and how it is labelled.

Each test has its own hub app on a fresh SQLite file (broker unreachable, as in
``test_hub_api``); the link's own counters are exercised against a real broker in
``tests/integration/test_hub_metrics.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.core import Metric
from sqlmodel import Session

from devtools.broker import free_port
from hub.app import create_app
from hub.auth.models import Role
from hub.db import new_session
from hub.devices.models import Device
from hub.metrics import StatsSnapshot, stats_families
from hub.settings import HubSettings
from hub.stats import ChunkServerStats, LinkStats
from tests.support import Scrape
from tests.unit.auth_support import bearer, mint
from tests.unit.hub_bundles_support import bundle_hub, upload

HUB = "http://hub"
REPO = Path(__file__).resolve().parents[2]


def settings_for(tmp_path: Path, **overrides: Any) -> HubSettings:
    return HubSettings(
        broker_url=f"mqtt://127.0.0.1:{free_port()}",
        db_url=f"sqlite:///{tmp_path / 'db' / 'hub.db'}",
        **overrides,
    )


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(settings_for(tmp_path))


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """No token by default: each request says whose it is."""
    with TestClient(app, base_url=HUB) as c:
        yield c


@pytest.fixture
def tokens(app: FastAPI) -> dict[Role, dict[str, str]]:
    return {role: bearer(mint(app, role)) for role in Role}


def scrape(client: TestClient, headers: dict[str, str]) -> Scrape:
    response = client.get(f"{HUB}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(response.text)


def register(client: TestClient, admin: dict[str, str], *ids: str) -> None:
    for device_id in ids:
        response = client.post("/api/v1/devices", json={"id": device_id}, headers=admin)
        assert response.status_code == 201, response.text


# --- who may read it -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("Bearer not-a-token", id="unknown-token"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
    ],
)
def test_without_a_valid_token_metrics_are_401(
    client: TestClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "driftless_" not in response.text


def test_every_role_reads_metrics(client: TestClient, tokens: dict[Role, dict[str, str]]) -> None:
    for role in Role:
        assert scrape(client, tokens[role]).value("driftless_devices", state="active") == 0


def test_metrics_stay_out_of_the_openapi_schema(app: FastAPI) -> None:
    paths = app.openapi()["paths"]
    assert "/metrics" not in paths
    assert all(path.startswith("/api/v1/") for path in paths)


def test_auth_failures_are_counted_by_reason(
    client: TestClient, tokens: dict[Role, dict[str, str]]
) -> None:
    register(client, tokens[Role.admin], "dev-1")
    client.get("/api/v1/devices")  # 401: no token
    client.get("/metrics")  # 401: no token
    client.get("/api/v1/devices", headers={"Authorization": "Bearer stolen"})  # 401
    for _ in range(3):  # 403: a viewer may not change desired state
        client.put(
            "/api/v1/devices/dev-1/desired", json={"config": {}}, headers=tokens[Role.viewer]
        )
    metrics = scrape(client, tokens[Role.viewer])
    failures = "driftless_api_auth_failures_total"
    assert metrics.value(failures, reason="missing_token") == 2
    assert metrics.value(failures, reason="invalid_token") == 1
    assert metrics.value(failures, reason="insufficient_role") == 3


# --- API requests ---------------------------------------------------------------------------


def test_requests_are_counted_by_route_template_never_by_raw_path(
    client: TestClient, tokens: dict[Role, dict[str, str]]
) -> None:
    admin = tokens[Role.admin]
    register(client, admin, "pump-17", "pump-18")
    for device_id in ("pump-17", "pump-18", "ghost-1"):
        client.get(f"/api/v1/devices/{device_id}", headers=admin)
    client.put("/api/v1/devices/pump-17/desired", json={"config": {"a": 1}}, headers=admin)
    client.patch("/api/v1/devices", headers=admin)  # 405: the route exists, not the method
    client.get("/api/v1/no-such-thing/ghost-2", headers=admin)  # matches no route
    client.request("BREW", "/api/v1/devices", headers=admin)
    metrics = scrape(client, admin)
    requests = "driftless_api_requests_total"
    device = "/api/v1/devices/{device_id}"
    assert metrics.value(requests, method="POST", route="/api/v1/devices", status="201") == 2
    assert metrics.value(requests, method="GET", route=device, status="200") == 2
    assert metrics.value(requests, method="GET", route=device, status="404") == 1
    desired = "/api/v1/devices/{device_id}/desired"
    assert metrics.value(requests, method="PUT", route=desired, status="200") == 1
    assert metrics.value(requests, method="PATCH", route="/api/v1/devices", status="405") == 1
    assert metrics.value(requests, method="GET", route="other", status="404") == 1
    assert metrics.total(requests, method="other") == 1
    duration = "driftless_api_request_duration_seconds"
    assert metrics.value(f"{duration}_count", method="GET", route=device) == 3
    assert metrics.value(f"{duration}_sum", method="GET", route=device) > 0
    for raw in ("pump-17", "pump-18", "ghost-1", "ghost-2", "no-such-thing", "BREW"):
        assert raw not in metrics.text, raw


def test_each_app_counts_only_its_own_requests(tmp_path: Path) -> None:
    """One registry per app: two apps in one process share no counter."""
    first = create_app(settings_for(tmp_path / "a"))
    second = create_app(settings_for(tmp_path / "b"))
    with TestClient(first, base_url=HUB) as a, TestClient(second, base_url=HUB) as b:
        token_a, token_b = bearer(mint(first, Role.admin)), bearer(mint(second, Role.admin))
        register(a, token_a, "only-in-a")
        requests = "driftless_api_requests_total"
        assert scrape(a, token_a).total(requests, route="/api/v1/devices") == 1
        assert scrape(b, token_b).total(requests, route="/api/v1/devices") == 0


# --- the fleet, read from the database ------------------------------------------------------


def _set(session: Session, device_id: str, **fields: Any) -> None:
    row = session.get(Device, device_id)
    assert row is not None
    for name, value in fields.items():
        setattr(row, name, value)
    session.add(row)
    session.commit()


def test_device_gauges_are_read_from_the_database_at_scrape_time(
    app: FastAPI, client: TestClient, tokens: dict[Role, dict[str, str]]
) -> None:
    admin = tokens[Role.admin]
    assert scrape(client, admin).value("driftless_devices", state="active") == 0
    register(client, admin, "behind", "idle", "failing", "retired")
    for device_id in ("behind", "failing"):
        client.put(f"/api/v1/devices/{device_id}/desired", json={"config": {}}, headers=admin)
    with new_session(app.state.context.engine) as session:
        _set(session, "behind", online=True)
        _set(session, "failing", report_phase="failed", failed_generation=1)
        _set(session, "retired", decommissioned_at=datetime.now(UTC))
    metrics = scrape(client, admin)
    devices = {s.labels["state"]: s.value for s in metrics.families["driftless_devices"].samples}
    assert devices == {
        "active": 3,
        "online": 1,
        "in_sync": 1,  # idle: nothing desired, nothing reported
        "behind": 2,
        "failed": 1,
        "decommissioned": 1,
    }
    summary = client.get("/api/v1/fleet/summary", headers=admin).json()
    assert (summary["total"], summary["online"], summary["in_sync"]) == (3, 1, 1)
    assert (summary["out_of_sync"], summary["failed"], summary["decommissioned"]) == (2, 1, 1)


# --- what the link counts, rendered from a snapshot -----------------------------------------


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def test_link_and_chunk_server_counters_are_rendered_from_a_snapshot() -> None:
    link = LinkStats(broker="mqtts://broker:8883", mqtt_connected=True, connects=2)
    link.received.update({"total": 7, "birth": 3, "reported": 4})
    link.rejected.update({"malformed": 2})
    link.stale.update({"stale_report": 1})
    link.applied = 4
    link.desired_published = 5
    link.cutoffs_requested, link.cutoffs_confirmed = 3, 2
    link.renewals.update({"refused": 1})
    chunks = ChunkServerStats(bytes_served=4096, chunks_served=2, requests=3)
    snapshot = StatsSnapshot(link=link.as_dict(), bundles=chunks.as_dict(), http_bundle_bytes=100)
    metrics = Scrape(generate_latest(_Families(stats_families(snapshot))).decode())
    assert metrics.value("driftless_mqtt_connected", connection="link") == 1
    assert metrics.value("driftless_mqtt_connected", connection="bundles") == 0
    assert metrics.value("driftless_mqtt_connects_total", connection="link") == 2
    received = "driftless_ingest_messages_received_total"
    assert metrics.total(received) == 7  # "total" is not a channel
    assert metrics.value(received, channel="status") == 0  # known channels from the start
    assert metrics.value("driftless_ingest_messages_rejected_total", reason="malformed") == 2
    assert metrics.value("driftless_ingest_messages_rejected_total", reason="unknown_device") == 0
    assert metrics.value("driftless_ingest_messages_stale_total", reason="stale_report") == 1
    assert metrics.value("driftless_ingest_messages_applied_total") == 4
    assert metrics.value("driftless_desired_published_total") == 5
    assert metrics.value("driftless_broker_cutoffs_requested_total") == 3
    assert metrics.value("driftless_broker_cutoffs_confirmed_total") == 2
    assert metrics.value("driftless_certificate_renewals_total", outcome="refused") == 1
    assert metrics.value("driftless_certificate_renewals_total", outcome="granted") == 0
    served = "driftless_bundle_served_bytes_total"
    assert metrics.value(served, transport="mqtt") == 4096
    assert metrics.value(served, transport="http") == 100
    assert metrics.value("driftless_bundle_chunks_served_total") == 2
    for family in metrics.families.values():
        assert family.name.startswith("driftless_")
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name


def test_every_family_appears_once_and_follows_the_naming_conventions(
    client: TestClient, tokens: dict[Role, dict[str, str]]
) -> None:
    metrics = scrape(client, tokens[Role.viewer])
    types = [line.split()[2] for line in metrics.text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))
    assert not [name for name in types if name.endswith("_created")]
    ours = {n: f for n, f in metrics.families.items() if n.startswith("driftless_")}
    assert len(ours) > 30
    for family in ours.values():
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith(("_seconds", "_messages")), family.name
    assert "process_resident_memory_bytes" in metrics.families


def test_the_docs_and_the_dashboard_name_only_metrics_the_hub_serves(
    client: TestClient, tokens: dict[Role, dict[str, str]]
) -> None:
    metrics = scrape(client, tokens[Role.viewer])
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    served = {  # by family, so that families with no sample yet count too
        family.name + suffix
        for family in metrics.families.values()
        for suffix in ("", *suffixes.get(family.type, ()))
    }
    dashboard = (REPO / "docs" / "grafana" / "driftless-hub.json").read_text()
    expressions = [
        target["expr"]
        for panel in json.loads(dashboard)["panels"]
        for target in panel.get("targets", [])
    ]
    assert len(expressions) > 20
    operations = (REPO / "docs" / "operations.md").read_text()
    metrics_section = operations[operations.index("## Metrics") : operations.index("## Logs")]
    named = re.compile(r"\bdriftless_[a-z_]*[a-z](?![a-z_*])")  # not prefixes like driftless_mqtt_*
    for source, text in (("dashboard", "\n".join(expressions)), ("operations.md", metrics_section)):
        unknown = sorted(set(named.findall(text)) - served)
        assert not unknown, f"{source} names metrics the hub does not serve: {unknown}"


def test_an_api_only_process_shows_no_link_counters(tmp_path: Path) -> None:
    app = create_app(settings_for(tmp_path, run_link=False))
    with TestClient(app, base_url=HUB) as client:
        metrics = scrape(client, bearer(mint(app, Role.viewer)))
    assert "driftless_mqtt_connected" not in metrics.families
    assert "driftless_ingest_messages_received" not in metrics.families
    served = metrics.families["driftless_bundle_served_bytes"].samples
    assert [(s.labels, s.value) for s in served] == [({"transport": "http"}, 0)]
    assert metrics.value("driftless_devices", state="active") == 0


# --- bundles over HTTP ----------------------------------------------------------------------


def test_bundle_bytes_sent_over_http_are_counted(tmp_path: Path) -> None:
    with bundle_hub(tmp_path) as (hub, client):
        path = hub.bundle(payload_bytes=150_000)  # several 64 KiB body messages
        sha = upload(client, path).json()["sha256"]
        assert client.get(f"bundles/{sha}/file").content == path.read_bytes()
        ranged = client.get(f"bundles/{sha}/file", headers={"Range": "bytes=100-1099"})
        assert ranged.status_code == 206 and len(ranged.content) == 1000
        assert client.head(f"bundles/{sha}/file").content == b""
        metrics = Scrape(client.get(f"{HUB}/metrics").text)
    served = path.stat().st_size + 1000
    assert metrics.value("driftless_bundle_served_bytes_total", transport="http") == served
