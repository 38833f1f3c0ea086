"""The admin API with authentication switched on: bearer tokens, roles, the audit log.

Each test has its own hub app on a fresh SQLite file (broker unreachable, as in
``test_hub_api``), but for the refusals without a valid token: they change nothing a
later case could see, so they share one app (``refusing``; an app takes ~1 s to build).
Tokens are minted straight into the app's database with ``tests.unit.auth_support``, the
way ``driftless hub token create`` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import select

from devtools.broker import free_port
from driftless.cli import main
from hub.app import create_app
from hub.auth.models import ApiToken, AuditEntry, Role
from hub.auth.routes import RoleName
from hub.db import new_session
from hub.settings import HubSettings
from tests.unit.auth_support import API_BASE_URL, bearer, mint

SHA = "ab" * 32


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "hub.db"


@pytest.fixture
def app(db_path: Path) -> FastAPI:
    return create_app(
        HubSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=f"sqlite:///{db_path}")
    )


@pytest.fixture
def anon(app: FastAPI) -> Iterator[TestClient]:
    """A client that sends no token (each request may add its own header)."""
    with TestClient(app, base_url=API_BASE_URL) as client:
        yield client


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app, without tokens, for every case of the 401 test (each refusal changes
    nothing but the audit log, which that test does not read)."""
    db = tmp_path_factory.mktemp("refusing") / "hub.db"
    settings = HubSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=f"sqlite:///{db}")
    with TestClient(create_app(settings), base_url=API_BASE_URL) as client:
        yield client


@pytest.fixture
def tokens(app: FastAPI) -> dict[Role, str]:
    return {role: mint(app, role) for role in Role}


def as_(token: str) -> dict[str, str]:
    return bearer(token)


def register(anon: TestClient, admin: str, device_id: str = "dev-1") -> None:
    response = anon.post("devices", json={"id": device_id}, headers=as_(admin))
    assert response.status_code == 201, response.text


def audit(anon: TestClient, admin: str) -> list[dict[str, Any]]:
    response = anon.get("audit", headers=as_(admin))
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


# --- who may call at all -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        pytest.param("GET", "devices", id="list-devices"),
        pytest.param("GET", "devices/dev-1", id="get-device"),
        pytest.param("GET", "fleet/summary", id="fleet-summary"),
        pytest.param("GET", "hub/stats", id="hub-stats"),
        pytest.param("GET", "bundles", id="list-bundles"),
        pytest.param("GET", f"bundles/{SHA}", id="get-bundle"),
        pytest.param("POST", "devices", id="register"),
        pytest.param("PUT", "fleet/desired", id="fleet-desired"),
        pytest.param("POST", "bundles", id="upload"),
        pytest.param("GET", "tokens", id="list-tokens"),
        pytest.param("GET", "audit", id="audit"),
    ],
)
@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="no-header"),
        pytest.param("Bearer ", id="empty-bearer"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("Bearer not-a-token", id="unknown-token"),
    ],
)
def test_without_a_valid_token_every_route_is_401_with_a_bearer_challenge(
    refusing: TestClient, method: str, path: str, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = refusing.request(method, path, headers=headers, json={} if method != "GET" else None)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert "token" in response.json()["detail"]


def test_health_needs_no_token(anon: TestClient) -> None:
    assert anon.get("health").json() == {"status": "ok", "mqtt_connected": False}


def test_openapi_names_the_bearer_scheme_and_leaves_only_open_routes_without_it(
    app: FastAPI,
) -> None:
    schema = app.openapi()
    assert schema["components"]["securitySchemes"]["ApiToken"]["scheme"] == "bearer"
    open_routes = sorted(
        f"{method.upper()} {path}"
        for path, operations in schema["paths"].items()
        for method, operation in operations.items()
        if not operation.get("security")
    )
    assert open_routes == [
        "GET /api/v1/bundles/{sha256}/file",
        "GET /api/v1/health",
        "HEAD /api/v1/bundles/{sha256}/file",
        "POST /api/v1/enroll",  # the enrollment token in the body is the credential
    ]


def test_a_revoked_token_is_refused(anon: TestClient, tokens: dict[Role, str]) -> None:
    admin = tokens[Role.admin]
    made = anon.post("tokens", json={"name": "ci", "role": "viewer"}, headers=as_(admin))
    assert made.status_code == 201, made.text
    secret = made.json()["token"]
    assert anon.get("devices", headers=as_(secret)).status_code == 200
    assert anon.delete("tokens/ci", headers=as_(admin)).status_code == 204
    refused = anon.get("devices", headers=as_(secret))
    assert refused.status_code == 401
    assert refused.json()["detail"] == "unknown or revoked token"
    listed = {t["name"]: t for t in anon.get("tokens", headers=as_(admin)).json()}
    assert listed["ci"] == {"name": "ci", "role": "viewer", "revoked": True}
    assert anon.delete("tokens/nobody", headers=as_(admin)).status_code == 404


# --- roles ---------------------------------------------------------------------------------

# (method, path, body, least role). Every route of the API but the open ones.
ROUTES = [
    pytest.param("GET", "devices", None, Role.viewer, id="list-devices"),
    pytest.param("GET", "devices/dev-1", None, Role.viewer, id="get-device"),
    pytest.param("GET", "fleet/summary", None, Role.viewer, id="fleet-summary"),
    pytest.param("GET", "hub/stats", None, Role.viewer, id="hub-stats"),
    pytest.param("GET", "bundles", None, Role.viewer, id="list-bundles"),
    pytest.param("GET", f"bundles/{SHA}", None, Role.viewer, id="get-bundle"),
    pytest.param("PUT", "devices/dev-1/desired", {"config": {"a": 1}}, Role.operator, id="desired"),
    pytest.param("PUT", "fleet/desired", {"config": {"a": 1}}, Role.operator, id="fleet-desired"),
    pytest.param("POST", "bundles", None, Role.operator, id="upload-bundle"),
    pytest.param("DELETE", f"bundles/{SHA}", None, Role.operator, id="delete-bundle"),
    pytest.param("POST", "devices", {"id": "dev-2"}, Role.admin, id="register"),
    pytest.param(
        "POST", "devices/batch", {"devices": [{"id": "dev-3"}]}, Role.admin, id="register-batch"
    ),
    pytest.param("DELETE", "devices/dev-1", None, Role.admin, id="delete-device"),
    pytest.param("POST", "tokens", {"name": "new", "role": "viewer"}, Role.admin, id="new-token"),
    pytest.param("GET", "tokens", None, Role.admin, id="list-tokens"),
    pytest.param("DELETE", "tokens/test-viewer", None, Role.admin, id="revoke-token"),
    pytest.param("GET", "audit", None, Role.admin, id="read-audit"),
]


@pytest.mark.parametrize(("method", "path", "body", "least"), ROUTES)
def test_each_route_lets_its_least_role_and_above_through_and_refuses_the_rest_with_403(
    anon: TestClient,
    tokens: dict[Role, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    least: Role,
) -> None:
    register(anon, tokens[Role.admin])
    for role in Role:  # ascending: a call that goes through (a deletion, a revocation) is last
        response = anon.request(method, path, json=body, headers=as_(tokens[role]))
        if role < least:
            assert response.status_code == 403, (role, response.text)
            assert f"{least.name} role required" in response.json()["detail"]
        else:
            assert response.status_code not in (401, 403), (role, response.text)


def test_a_viewer_reads_devices_but_cannot_set_desired_state(
    anon: TestClient, tokens: dict[Role, str]
) -> None:
    register(anon, tokens[Role.admin])
    viewer = as_(tokens[Role.viewer])
    assert [d["id"] for d in anon.get("devices", headers=viewer).json()["items"]] == ["dev-1"]
    refused = anon.put("devices/dev-1/desired", json={"config": {"a": 1}}, headers=viewer)
    assert refused.status_code == 403
    assert refused.json()["detail"] == "operator role required; token 'test-viewer' is viewer"
    assert anon.get("devices/dev-1", headers=viewer).json()["desired_generation"] == 0


def test_an_operator_sets_desired_state_but_cannot_register_devices(
    anon: TestClient, tokens: dict[Role, str]
) -> None:
    register(anon, tokens[Role.admin])
    operator = as_(tokens[Role.operator])
    changed = anon.put("devices/dev-1/desired", json={"config": {"a": 1}}, headers=operator)
    assert changed.status_code == 200 and changed.json()["desired_generation"] == 1
    assert anon.post("devices", json={"id": "dev-2"}, headers=operator).status_code == 403
    batch = {"devices": [{"id": "dev-2"}]}
    assert anon.post("devices/batch", json=batch, headers=operator).status_code == 403
    assert anon.delete("devices/dev-1", headers=operator).status_code == 403
    assert anon.get("devices/dev-2", headers=operator).status_code == 404


def test_an_admin_makes_a_token_through_the_api_and_it_works_with_its_role(
    anon: TestClient, tokens: dict[Role, str]
) -> None:
    register(anon, tokens[Role.admin])
    made = anon.post(
        "tokens", json={"name": "deployer", "role": "operator"}, headers=as_(tokens[Role.admin])
    )
    assert made.status_code == 201, made.text
    assert made.json()["name"] == "deployer" and made.json()["role"] == "operator"
    new = as_(made.json()["token"])
    assert anon.put("devices/dev-1/desired", json={"config": {}}, headers=new).status_code == 200
    assert anon.post("devices", json={"id": "dev-2"}, headers=new).status_code == 403
    again = anon.post(
        "tokens", json={"name": "deployer", "role": "viewer"}, headers=as_(tokens[Role.admin])
    )
    assert again.status_code == 409
    assert set(get_args(RoleName)) == {role.name for role in Role}  # every role can be made
    for bad in ({"name": "a b", "role": "viewer"}, {"name": "x", "role": "root"}):
        response = anon.post("tokens", json=bad, headers=as_(tokens[Role.admin]))
        assert response.status_code == 422, bad


def test_tokens_are_stored_only_as_their_sha256(
    app: FastAPI, anon: TestClient, tokens: dict[Role, str], db_path: Path
) -> None:
    admin = as_(tokens[Role.admin])
    made = anon.post("tokens", json={"name": "api-made", "role": "viewer"}, headers=admin)
    secrets_ = {**{r.name: s for r, s in tokens.items()}, "api-made": made.json()["token"]}
    with new_session(app.state.context.engine) as session:
        rows = {row.name: row for row in session.exec(select(ApiToken)).all()}
    for role_name, secret in secrets_.items():
        row = rows[role_name if role_name == "api-made" else f"test-{role_name}"]
        assert row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
        assert secret not in repr(row.model_dump())
    listing = anon.get("tokens", headers=admin).text
    files = b"".join(p.read_bytes() for p in db_path.parent.glob("hub.db*"))  # with the WAL
    for secret in secrets_.values():
        assert secret not in listing
        assert secret.encode() not in files


# --- the audit log -------------------------------------------------------------------------


def test_every_mutating_call_is_audited_refusals_included_and_reads_are_not(
    anon: TestClient, tokens: dict[Role, str]
) -> None:
    admin, viewer = tokens[Role.admin], tokens[Role.viewer]
    register(anon, admin)  # 201
    anon.put("devices/dev-1/desired", json={"config": {}}, headers=as_(viewer))  # 403
    anon.post("devices", json={"id": "dev-2"})  # 401, no token
    anon.delete("devices/dev-1", headers={"Authorization": "Bearer stolen"})  # 401
    anon.put("fleet/desired", json={"config": {}}, headers=as_(tokens[Role.operator]))  # 200
    anon.get("devices", headers=as_(admin))  # a read: not audited
    entries = audit(anon, admin)
    assert [
        (e["actor"], e["role"], e["method"], e["path"], e["status"]) for e in reversed(entries)
    ] == [
        ("test-admin", "admin", "POST", "/api/v1/devices", 201),
        ("test-viewer", "viewer", "PUT", "/api/v1/devices/dev-1/desired", 403),
        ("anonymous", None, "POST", "/api/v1/devices", 401),
        ("anonymous", None, "DELETE", "/api/v1/devices/dev-1", 401),
        ("test-operator", "operator", "PUT", "/api/v1/fleet/desired", 200),
    ]
    assert all(e["at"].endswith("Z") and e["client"] for e in entries)
    assert entries[0]["id"] > entries[-1]["id"]  # newest first


def test_the_audit_log_is_for_admins_only_and_pages(
    anon: TestClient, tokens: dict[Role, str]
) -> None:
    for role in (Role.viewer, Role.operator):
        refused = anon.get("audit", headers=as_(tokens[role]))
        assert refused.status_code == 403
    for n in range(5):
        anon.post("devices", json={"id": f"dev-{n}"}, headers=as_(tokens[Role.admin]))
    page = anon.get("audit", params={"limit": 2, "offset": 1}, headers=as_(tokens[Role.admin]))
    body = page.json()
    assert (body["total"], body["limit"], body["offset"]) == (5, 2, 1)
    assert [e["path"] for e in body["items"]] == ["/api/v1/devices"] * 2
    too_small = anon.get("audit", params={"limit": 0}, headers=as_(tokens[Role.admin]))
    assert too_small.status_code == 422


def test_audit_rows_are_written_to_the_database(
    app: FastAPI, anon: TestClient, tokens: dict[Role, str]
) -> None:
    anon.post("devices", json={"id": "dev-1"}, headers=as_(tokens[Role.operator]))
    with new_session(app.state.context.engine) as session:
        rows = session.exec(select(AuditEntry)).all()
    assert [(r.actor, r.method, r.path, r.status) for r in rows] == [
        ("test-operator", "POST", "/api/v1/devices", 403)
    ]


# --- driftless hub token create ------------------------------------------------------------


def test_token_create_prints_the_secret_once_and_it_works(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{db_path}"
    assert main(["hub", "token", "create", "--role", "viewer", "--name", "ops", "--db", url]) == 0
    out, err = capsys.readouterr()
    secret = out.strip()
    assert out == secret + "\n" and len(secret) >= 40
    assert "viewer token 'ops' created" in err and secret not in err
    app = create_app(HubSettings(broker_url=f"mqtt://127.0.0.1:{free_port()}", db_url=url))
    with TestClient(app, base_url=API_BASE_URL, headers=bearer(secret)) as client:
        assert client.get("devices").status_code == 200
        assert client.post("devices", json={"id": "d"}).status_code == 403


def test_token_create_reads_the_database_from_the_environment_like_hub_serve(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DRIFTLESS_DB", f"sqlite:///{db_path}")
    assert main(["hub", "token", "create", "--role", "admin", "--name", "ops"]) == 0
    capsys.readouterr()
    assert main(["hub", "token", "create", "--role", "viewer", "--name", "ops"]) == 1
    assert "a token named 'ops' exists" in capsys.readouterr().err
    assert main(["hub", "token", "create", "--role", "viewer", "--name", "no spaces"]) == 2


def test_token_create_refuses_an_unknown_role(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["hub", "token", "create", "--role", "root", "--name", "ops"])
    assert exited.value.code == 2
    assert "invalid choice: 'root'" in capsys.readouterr().err
