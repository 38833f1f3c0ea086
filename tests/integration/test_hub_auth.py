"""Authentication, roles and the audit log on a real hub process (real HTTP, real SQLite file).

The hub child mints its own admin token before it starts (``HubProcess.api``
sends it); the other tokens come from the API or from ``driftless hub token
create`` run against the hub's database while the hub is serving.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.support import HubProcess, wait_until

pytestmark = pytest.mark.integration


def token_create(hub: HubProcess, role: str, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "driftless.cli", "hub", "token", "create"),
            *("--role", role, "--name", name, "--db", f"sqlite:///{hub.db_path}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def audit_rows(hub: HubProcess) -> list[tuple[Any, ...]]:
    items = hub.api.get("/audit", params={"limit": 1000}).json()["items"]
    return [(e["actor"], e["method"], e["path"], e["status"]) for e in reversed(items)]


def test_without_a_token_only_health_and_bundle_files_answer(hub: HubProcess) -> None:
    with httpx.Client(base_url=hub.base_url + "/api/v1", timeout=10) as anon:
        assert anon.get("/health").json()["mqtt_connected"] is True
        for method, path in (("GET", "/devices"), ("GET", "/hub/stats"), ("POST", "/devices")):
            response = anon.request(method, path, json={"id": "x"} if method == "POST" else None)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert anon.get(f"/bundles/{'0' * 64}/file").status_code == 404  # open: not 401
        unknown = anon.get("/devices", headers={"Authorization": "Bearer made-up"})
        assert unknown.status_code == 401


def test_token_create_prints_a_token_that_works_against_the_running_hub(
    hub: HubProcess,
) -> None:
    hub.api.post("/devices", json={"id": "dev-1"}).raise_for_status()
    made = token_create(hub, "viewer", "ops")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert made.stdout == secret + "\n" and secret not in made.stderr
    with hub.client(secret) as viewer:
        assert [d["id"] for d in viewer.get("/devices").json()["items"]] == ["dev-1"]
        refused = viewer.put("/devices/dev-1/desired", json={"config": {"a": 1}})
        assert refused.status_code == 403
        assert "operator role required" in refused.json()["detail"]
        assert hub.api.delete("/tokens/ops").status_code == 204
        assert viewer.get("/devices").status_code == 401
    assert token_create(hub, "viewer", "ops").returncode == 1  # names are unique, even revoked


def test_roles_tokens_and_the_audit_trail_on_a_real_hub(hub: HubProcess) -> None:
    assert hub.api.post("/devices", json={"id": "dev-1"}).status_code == 201
    made = hub.api.post("/tokens", json={"name": "deployer", "role": "operator"})
    assert made.status_code == 201, made.text
    secret = made.json()["token"]
    with hub.client(secret) as operator, hub.client(None) as admin:
        assert operator.put("/devices/dev-1/desired", json={"config": {"a": 1}}).status_code == 200
        assert operator.post("/devices", json={"id": "dev-2"}).status_code == 403
        assert operator.get("/audit").status_code == 403
        assert admin.get("/devices/dev-2").status_code == 404
    with httpx.Client(base_url=hub.base_url + "/api/v1", timeout=10) as anon:
        assert anon.delete("/devices/dev-1").status_code == 401

    # Only the SHA-256 of a token is in the database file.
    with sqlite3.connect(hub.db_path) as db:
        rows = dict(db.execute("SELECT name, token_hash FROM api_token").fetchall())
    assert rows["deployer"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in repr(rows)

    # The audit row is written once the response has gone out: wait for the last one.
    names = [t["name"] for t in hub.api.get("/tokens").json()]
    child = next(name for name in names if name.startswith("tests-"))  # HubProcess's own
    expected = [
        (child, "POST", "/api/v1/devices", 201),
        (child, "POST", "/api/v1/tokens", 201),
        ("deployer", "PUT", "/api/v1/devices/dev-1/desired", 200),
        ("deployer", "POST", "/api/v1/devices", 403),
        ("anonymous", "DELETE", "/api/v1/devices/dev-1", 401),
    ]
    wait_until(lambda: len(audit_rows(hub)) >= len(expected), timeout_s=10, what="audit rows")
    assert audit_rows(hub) == expected
