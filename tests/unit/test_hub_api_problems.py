"""Bad requests from outside get a clear answer, in one shape, and change nothing.

Each case is one an outside fuzzer or a hand found: numbers SQLite cannot hold,
lone UTF-16 surrogates, NaN and Infinity, invalid UTF-8, bodies sent without a
token, a method the path does not serve. Every refusal is RFC 9457 problem
details (``application/problem+json``) and never echoes the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from devtools.broker import free_port
from hub.app import create_app
from hub.auth.models import Role
from hub.settings import HubSettings
from tests.unit.auth_support import API_BASE_URL, bearer, mint

HUGE = "9223372036854775808"  # 2**63: past SQLite's integers
JSON = {"content-type": "application/json"}


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(
        HubSettings(
            broker_url=f"mqtt://127.0.0.1:{free_port()}",
            db_url=f"sqlite:///{tmp_path / 'hub.db'}",
            identity_dir=tmp_path / "identity",
        )
    )


@pytest.fixture
def admin(app: FastAPI) -> Iterator[TestClient]:
    headers = bearer(mint(app, Role.admin))
    with TestClient(
        app, base_url=API_BASE_URL, headers=headers, raise_server_exceptions=False
    ) as client:
        client.post("devices", json={"id": "d1"}).raise_for_status()
        yield client


@pytest.fixture
def anonymous(app: FastAPI, admin: TestClient) -> TestClient:
    return TestClient(app, base_url=API_BASE_URL, raise_server_exceptions=False)


def assert_problem(response: object, status: int, *, mentions: str = "") -> dict[str, object]:
    assert getattr(response, "status_code") == status, getattr(response, "text")  # noqa: B009
    assert getattr(response, "headers")["content-type"] == "application/problem+json"  # noqa: B009
    body: dict[str, object] = getattr(response, "json")()  # noqa: B009
    assert body["status"] == status and body["type"] == "about:blank"
    assert isinstance(body["title"], str) and isinstance(body["detail"], str)
    assert mentions in str(body["detail"]), body
    return body


@pytest.mark.parametrize("path", ["devices", "bundles", "audit"])
def test_an_offset_past_any_integer_is_refused_not_a_500(admin: TestClient, path: str) -> None:
    body = assert_problem(admin.get(path, params={"offset": HUGE}), 422, mentions="offset")
    assert body["errors"] and "input" not in str(body["errors"][0])  # type: ignore[index]


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        pytest.param("PUT", "devices/d1/desired", b'{"config": {"a": "\\ud800"}}', id="desired"),
        pytest.param(
            "POST", "enroll", b'{"token": "\\ud800", "device_id": "x", "csr_pem": "y"}',
            id="enroll-without-token",
        ),
        pytest.param("POST", "devices", b'{"id": "\\udfff"}', id="register"),
        pytest.param("POST", "tokens", b'{"name": "a\\ud800", "role": "admin"}', id="token"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_refused_with_422_and_never_echoed(
    admin: TestClient, method: str, path: str, raw: bytes
) -> None:
    response = admin.request(method, path, content=raw, headers=JSON)
    body = assert_problem(response, 422, mentions="not valid JSON")
    assert "\\ud800" not in response.text.replace("such as \\\\ud800", "")  # only our hint
    assert "errors" not in body


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"config": {"rate": NaN}}', id="nan"),
        pytest.param(b'{"config": {"rate": Infinity}}', id="infinity"),
        pytest.param(b'{"config": {"rate": -Infinity}}', id="minus-infinity"),
        pytest.param(b'{"config": {"rate": 1e999}}', id="overflowing-number"),
    ],
)
def test_non_finite_numbers_are_refused_and_bump_nothing(admin: TestClient, raw: bytes) -> None:
    before = admin.get("devices/d1").json()["desired_generation"]
    assert_problem(admin.put("devices/d1/desired", content=raw, headers=JSON), 422)
    assert admin.get("devices/d1").json()["desired_generation"] == before


def test_a_body_that_is_not_utf8_is_a_422_problem(admin: TestClient) -> None:
    response = admin.put("devices/d1/desired", content=b"\xff\xfe{}", headers=JSON)
    assert_problem(response, 422, mentions="not valid JSON")


def test_the_hubs_own_422_and_the_schemas_422_share_one_shape(admin: TestClient) -> None:
    ours = assert_problem(admin.get("devices", params={"label": "no-equals"}), 422)
    schemas = assert_problem(admin.put("devices/d1/desired", json={"config": "x"}), 422)
    assert set(ours) <= set(schemas) and schemas["errors"] == [
        {
            "loc": ["body", "config"],
            "msg": "Input should be a valid dictionary",
            "type": "dict_type",
        }
    ]


@pytest.mark.parametrize(
    ("method", "path", "raw"),
    [
        pytest.param("PUT", "fleet/desired", b"{bad", id="fleet-desired-malformed"),
        pytest.param("PUT", "devices/d1/desired", b"x" * 500_000, id="large-garbage"),
        pytest.param("POST", "devices", b'{"id": NaN}', id="register-nan"),
        pytest.param("POST", "tokens", b"\xff", id="not-utf8"),
    ],
)
def test_without_a_token_the_answer_is_401_before_the_body_is_read(
    anonymous: TestClient, method: str, path: str, raw: bytes
) -> None:
    response = anonymous.request(method, path, content=raw, headers=JSON)
    assert_problem(response, 401, mentions="bearer token")
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_wrong_token_is_401_too_before_the_body(anonymous: TestClient) -> None:
    response = anonymous.put(
        "fleet/desired", content=b"{bad", headers={**JSON, **bearer("dl_not-a-token")}
    )
    assert_problem(response, 401, mentions="unknown or revoked")


def test_the_bundle_file_names_both_its_methods(admin: TestClient) -> None:
    response = admin.options("bundles/" + "a" * 64 + "/file")
    assert_problem(response, 405)
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


def test_the_schema_declares_the_problem_shape_and_the_codes_routes_give(app: FastAPI) -> None:
    schema = app.openapi()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert set(schema["components"]["schemas"]["Problem"]["required"]) >= {"title", "status"}
    desired = schema["paths"]["/api/v1/devices/{device_id}/desired"]["put"]["responses"]
    assert set(desired) >= {"200", "401", "403", "404", "409", "413", "422"}
    assert "application/problem+json" in desired["404"]["content"]
    health = schema["paths"]["/api/v1/health"]["get"]["responses"]
    assert "401" not in health  # open
    devices = schema["paths"]["/api/v1/devices"]["get"]["parameters"]
    limit = next(p for p in devices if p["name"] == "limit")["schema"]
    assert limit["anyOf"][0]["maximum"] == 1000
    device_id = schema["paths"]["/api/v1/devices/{device_id}"]["get"]["parameters"][0]
    assert device_id["schema"]["pattern"].startswith("^[A-Za-z0-9]")
    labels = schema["components"]["schemas"]["DeviceCreate"]["properties"]["labels"]
    assert labels["additionalProperties"] is False
    file_ops = schema["paths"]["/api/v1/bundles/{sha256}/file"]
    assert file_ops["get"]["operationId"] != file_ops["head"]["operationId"]
