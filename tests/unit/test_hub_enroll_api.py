"""Enrollment over the API: tokens made by an admin, redeemed by a device with its CSR.

The refusals each named: unknown, expired, used up (also when two devices race
for the last use), for another device, a CSR naming another device, a malformed
CSR, a body that is not the schema, and no admin role for making tokens. A
refusal consumes nothing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import select

from devtools.broker import free_port
from edge_agent.identity import make_csr
from firmware_bundles.devfleet import DevFleet
from hub.app import create_app
from hub.auth.models import Role
from hub.db import new_session
from hub.devices.models import Device
from hub.enrollment.models import DeviceCertificate, EnrollmentToken
from hub.enrollment.store import token_hash
from hub.settings import HubSettings
from tests.support import Scrape
from tests.unit.auth_support import API_BASE_URL, api_client, bearer, mint


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    fleet = DevFleet(tmp_path / "fleet")
    return create_app(
        HubSettings(
            broker_url=f"mqtt://127.0.0.1:{free_port()}",
            db_url=f"sqlite:///{tmp_path / 'hub.db'}",
            trust_root_path=fleet.root_path,
            public_broker_url="mqtts://broker.example:8883",
        )
    )


@pytest.fixture
def device(app: FastAPI) -> Iterator[TestClient]:
    """A client with no API token: what a device has (it runs the app's lifespan)."""
    with TestClient(app, base_url=API_BASE_URL) as client:
        yield client


@pytest.fixture
def admin(app: FastAPI, device: TestClient) -> TestClient:
    """An admin's client on the same running app (not entered: one lifespan is enough)."""
    return api_client(app)


def new_token(admin: TestClient, **body: Any) -> str:
    response = admin.post("enrollment-tokens", json=body)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def csr(device_id: str) -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, make_csr(key, device_id).decode()


def enroll(device: TestClient, token: str, device_id: str, csr_pem: str | None = None) -> Any:
    pem = csr_pem if csr_pem is not None else csr(device_id)[1]
    return device.post("enroll", json={"token": token, "device_id": device_id, "csr_pem": pem})


def test_a_device_enrolls_with_a_token_and_gets_what_it_needs(
    app: FastAPI, admin: TestClient, device: TestClient
) -> None:
    token = new_token(admin, device_id="pump-1", labels={"site": "plant-7"})
    key, pem = csr("pump-1")
    response = enroll(device, token, "pump-1", pem)
    assert response.status_code == 200, response.text
    body = response.json()
    cert = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
    ca = x509.load_pem_x509_certificate(body["ca_pem"].encode())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pump-1"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    assert body["root_json"] == app.state.context.fleet_root.load().envelope.decode()
    assert body["broker_url"] == "mqtts://broker.example:8883"
    assert body["created_device"] is True
    # The device is registered with the token's preset labels.
    assert admin.get("devices/pump-1").json()["labels"] == {"site": "plant-7"}


def test_tokens_are_stored_hashed(app: FastAPI, admin: TestClient) -> None:
    token = new_token(admin, uses=3)
    with new_session(app.state.context.engine) as session:
        rows = session.exec(select(EnrollmentToken)).all()
    assert [row.token_hash for row in rows] == [token_hash(token)]
    assert token not in {row.token_hash for row in rows}


def test_a_claim_token_serves_its_count_and_no_more(admin: TestClient, device: TestClient) -> None:
    token = new_token(admin, uses=2)
    assert enroll(device, token, "line-a-1").status_code == 200
    assert enroll(device, token, "line-a-2").status_code == 200
    third = enroll(device, token, "line-a-3")
    assert third.status_code == 403 and "used up" in third.json()["detail"]


def test_a_single_use_token_redeemed_twice_at_once_enrolls_once_and_refuses_once(
    app: FastAPI, admin: TestClient, device: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write lock around redemption (``begin_write`` in ``store.redeem``): two devices
    race with one single-use token. Without it both pass the token check, and the
    loser's commit fails on SQLite's stale snapshot: a raw 500 (or, on a database
    without that check, two enrollments). With it the second waits, then is refused."""
    token = new_token(admin, uses=1)
    ca = app.state.context.ca
    sign = ca.issue_from_csr

    def slow_sign(csr_pem: bytes, **kwargs: Any) -> Any:
        time.sleep(0.2)  # a slow signer (a hardware key, a busy host) widens the window
        return sign(csr_pem, **kwargs)

    monkeypatch.setattr(ca, "issue_from_csr", slow_sign)
    racers = {name: csr(name)[1] for name in ("racer-1", "racer-2")}
    client = TestClient(app, base_url=API_BASE_URL, raise_server_exceptions=False)
    start = threading.Barrier(len(racers))

    def race(name: str) -> Any:
        start.wait(timeout=10)
        return enroll(client, token, name, racers[name])

    with ThreadPoolExecutor(len(racers)) as pool:
        answers = dict(zip(racers, pool.map(race, racers), strict=True))
    codes = sorted(answer.status_code for answer in answers.values())
    assert codes == [200, 403], {name: (a.status_code, a.text[:60]) for name, a in answers.items()}
    (winner,) = [name for name, answer in answers.items() if answer.status_code == 200]
    (loser,) = set(racers) - {winner}
    assert "used up" in answers[loser].json()["detail"]
    with new_session(app.state.context.engine) as session:
        assert [row.id for row in session.exec(select(Device)).all()] == [winner]
        assert [row.device_id for row in session.exec(select(DeviceCertificate)).all()] == [winner]
        row = session.get(EnrollmentToken, token_hash(token))
        assert row is not None and row.uses_left == 0


def test_enrollments_are_counted_by_outcome(admin: TestClient, device: TestClient) -> None:
    token = new_token(admin, uses=2)
    assert enroll(device, token, "line-b-1").status_code == 200
    assert enroll(device, token, "line-b-2").status_code == 200
    assert enroll(device, token, "line-b-3").status_code == 403  # used up
    assert enroll(device, "no-such-token", "line-b-4").status_code == 403
    assert device.post("enroll", json={"token": token}).status_code == 422  # not counted
    metrics = Scrape(admin.get("http://hub/metrics").text)
    enrollments = "driftless_enrollments_total"
    assert metrics.value(enrollments, outcome="granted") == 2
    assert metrics.value(enrollments, outcome="refused") == 2
    assert metrics.value(enrollments, outcome="cut_off_pending") == 0


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("unknown", "unknown enrollment token"),
        ("reused", "used up"),
        ("other-device", "for another device"),
        ("csr-names-another", "CSR refused"),
        ("malformed-csr", "CSR refused"),
        ("expired", "expired"),
    ],
)
def test_refusals_are_403_with_the_reason_and_consume_nothing(
    app: FastAPI, admin: TestClient, device: TestClient, case: str, expect: str
) -> None:
    token = new_token(admin, device_id="pump-2")
    if case == "reused":
        assert enroll(device, token, "pump-2").status_code == 200
    if case == "expired":
        with new_session(app.state.context.engine) as session:
            row = session.get(EnrollmentToken, token_hash(token))
            assert row is not None
            row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
            session.add(row)
            session.commit()
    response = {
        "unknown": lambda: enroll(device, "no-such-token", "pump-2"),
        "reused": lambda: enroll(device, token, "pump-2"),
        "other-device": lambda: enroll(device, token, "pump-3"),
        "csr-names-another": lambda: enroll(device, token, "pump-2", csr("pump-3")[1]),
        "malformed-csr": lambda: enroll(device, token, "pump-2", "-----BEGIN nonsense"),
        "expired": lambda: enroll(device, token, "pump-2"),
    }[case]()
    assert response.status_code == 403, response.text
    assert expect in response.json()["detail"]
    if case in ("other-device", "csr-names-another", "malformed-csr"):
        # Nothing was consumed: the right device can still enroll with the same token.
        assert enroll(device, token, "pump-2").status_code == 200
    assert admin.get("devices/pump-3").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"token": "t", "device_id": "d"},
        {"token": "t", "device_id": "d", "csr_pem": "x" * 9000},
        {"token": "t", "device_id": "d", "csr_pem": "x", "extra": 1},
    ],
    ids=["missing-csr", "oversized-csr", "unknown-field"],
)
def test_a_body_that_is_not_the_schema_is_422(device: TestClient, body: dict[str, Any]) -> None:
    assert device.post("enroll", json=body).status_code == 422


def test_only_an_admin_makes_enrollment_tokens(app: FastAPI, device: TestClient) -> None:
    assert device.post("enrollment-tokens", json={}).status_code == 401
    operator = bearer(mint(app, Role.operator))
    response = device.post("enrollment-tokens", json={}, headers=operator)
    assert response.status_code == 403


def test_token_limits_are_checked(admin: TestClient) -> None:
    assert admin.post("enrollment-tokens", json={"uses": 0}).status_code == 422
    assert admin.post("enrollment-tokens", json={"expires_in_s": 10}).status_code == 422
    assert admin.post("enrollment-tokens", json={"device_id": "bad/id"}).status_code == 422


def test_without_an_identity_directory_enrollment_is_503(
    tmp_path: Path, app: FastAPI, device: TestClient
) -> None:
    in_memory = create_app(
        HubSettings(
            broker_url=f"mqtt://127.0.0.1:{free_port()}",
            db_url="sqlite://",
            bundles_dir=tmp_path / "bundles",
        )
    )
    assert in_memory.state.context.ca is None  # nowhere to keep a CA: enrollment is off
    app.state.context = dataclasses.replace(app.state.context, ca=None)
    response = device.post("enroll", json={"token": "t", "device_id": "d", "csr_pem": csr("d")[1]})
    assert response.status_code == 503 and "identity" in response.json()["detail"]


def test_secrets_never_look_like_command_line_options() -> None:
    """``--token -Xn3…`` broke ``driftless agent enroll``: every secret has a fixed prefix."""
    from hub.identity import TOKEN_PREFIX, new_token

    secrets = {new_token() for _ in range(2000)}
    assert len(secrets) == 2000
    assert all(s.startswith(TOKEN_PREFIX) and len(s) >= 46 for s in secrets)


@pytest.mark.parametrize(
    "name", ["hub:driftless-hub", "hub:driftless-hub-bundles", "admin:peer-00", "admin:x"]
)
def test_a_claim_token_never_enrolls_a_reserved_name(
    admin: TestClient, device: TestClient, name: str
) -> None:
    """A claim token (any device id) or a token naming a service identity: refused, and
    nothing is consumed. The broker grants rights to exactly these names."""
    claim = new_token(admin, uses=2)
    response = enroll(device, claim, name)
    assert response.status_code in (403, 422), response.text
    assert admin.post("enrollment-tokens", json={"device_id": name}).status_code == 422
    assert enroll(device, claim, "plain-device").status_code == 200  # the claim still works
