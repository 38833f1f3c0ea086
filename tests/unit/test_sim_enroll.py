"""Simulated devices enrolled as real ones: when an identity is reused, what an answer must be,
and a whole round against the hub's app in process (``simulator.enroll``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import secrets
import ssl
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from devtools.broker import free_port
from driftless.cli import main
from edge_agent.identity import make_csr
from firmware_bundles.devfleet import DevFleet
from hub.app import create_app
from hub.auth.models import Role
from hub.db import new_session
from hub.devices import store as device_store
from hub.enrollment import store
from hub.identity import CertificateAuthority
from hub.settings import HubSettings
from simulator.enroll import (
    DeviceIdentities,
    EnrollError,
    EnrollmentResult,
    FleetTrust,
    _check_answer,
    enroll_fleet,
    why_enroll,
)
from simulator.fleet import FleetConfig
from simulator.link import DeviceLink, LinkSettings
from tests.unit.auth_support import bearer, mint

NOW = dt.datetime.now(dt.UTC)
IDS = ("sim-00000", "sim-00001", "sim-00002", "sim-00003", "sim-00004")
LABELS = {"sim": "sim"}


def der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, ...]:
    base = tmp_path_factory.mktemp("cas")
    return tuple(CertificateAuthority.load_or_create(base / n, now=NOW) for n in ("ours", "other"))


# ---------------------------------------------------------------- pure: reuse or enroll


@pytest.mark.parametrize(
    "case, expected",
    [
        pytest.param("usable", None, id="usable-identity-is-reused"),
        pytest.param("no-key", "no_key", id="no-key"),
        pytest.param("no-cert", "no_certificate", id="key-without-certificate"),
        pytest.param("no-ca", "other_ca", id="stored-ca-does-not-sign-the-hubs-crl"),
        pytest.param("other-ca", "other_ca", id="certificate-from-another-ca"),
        pytest.param("other-device", "other_device", id="certificate-names-another-device"),
        pytest.param("other-key", "other_key", id="certificate-for-another-key"),
        pytest.param("revoked", "revoked", id="certificate-on-the-crl"),
        pytest.param("expiring", "expiring", id="certificate-expiring-within-a-day"),
        pytest.param("garbage", "other_ca", id="unreadable-certificate"),
    ],
)
def test_why_enroll(
    cas: tuple[CertificateAuthority, CertificateAuthority], case: str, expected: str | None
) -> None:
    ours, other = cas
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = other if case == "other-ca" else ours
    name = "sim-99999" if case == "other-device" else "sim-00007"
    signer = ec.generate_private_key(ec.SECP256R1()) if case == "other-key" else key
    validity = 1 if case == "expiring" else 365
    issued = issuer.issue_from_csr(
        make_csr(signer, name), device_id=name, now=NOW, validity_days=validity
    )
    cert_pem: bytes | None = b"not a certificate" if case == "garbage" else issued.pem
    trust = FleetTrust(
        ca=None if case == "no-ca" else ours.cert,
        revoked=frozenset({issued.serial} if case == "revoked" else ()),
        now=NOW + dt.timedelta(hours=1),
    )
    public = None if case == "no-key" else der(key)
    if case == "no-cert":
        cert_pem = None
    assert why_enroll("sim-00007", cert_pem, public, trust) == expected


@pytest.mark.parametrize(
    "case, message",
    [
        pytest.param("other-device", "names ['sim-99999']", id="certificate-for-another-device"),
        pytest.param("other-key", "not for this device's key", id="certificate-for-another-key"),
        pytest.param("other-ca", "does not check out", id="not-signed-by-the-ca-it-came-with"),
        pytest.param("garbage", "does not check out", id="not-a-certificate"),
        pytest.param("missing", "does not check out", id="no-certificate-field"),
    ],
)
def test_an_answer_that_does_not_check_out_is_refused(
    cas: tuple[CertificateAuthority, CertificateAuthority], case: str, message: str
) -> None:
    ours, other = cas
    key = ec.generate_private_key(ec.SECP256R1())
    name = "sim-99999" if case == "other-device" else "sim-00007"
    signer = ec.generate_private_key(ec.SECP256R1()) if case == "other-key" else key
    issued = ours.issue_from_csr(make_csr(signer, name), device_id=name, now=NOW)
    answer: dict[str, str] = {
        "certificate_pem": "garbage" if case == "garbage" else issued.pem.decode(),
        "ca_pem": (other if case == "other-ca" else ours).cert_pem.decode(),
    }
    if case == "missing":
        del answer["certificate_pem"]
    with pytest.raises(EnrollError, match=re.escape(message)):
        _check_answer(answer, "sim-00007", der(key))
    good = ours.issue_from_csr(make_csr(key, "sim-00007"), device_id="sim-00007", now=NOW)
    ok = {"certificate_pem": good.pem.decode(), "ca_pem": ours.cert_pem.decode()}
    assert _check_answer(ok, "sim-00007", der(key)) == (good.pem, ours.cert_pem)


# ---------------------------------------------------------------- a round against the hub app


def hub_app(directory: Path, fleet: DevFleet) -> FastAPI:
    return create_app(
        HubSettings(
            broker_url=f"mqtt://127.0.0.1:{free_port()}",  # the link is never started here
            db_url=f"sqlite:///{directory / 'hub.db'}",
            trust_root_path=fleet.root_path,
            public_broker_url="mqtts://127.0.0.1:8883",
        )
    )


def enroll(
    app: FastAPI, identities: DeviceIdentities, ids: Sequence[str] = IDS, role: Role = Role.admin
) -> EnrollmentResult:
    async def go() -> EnrollmentResult:
        transport = httpx.ASGITransport(app=app)
        base = "http://hub/api/v1"
        headers = bearer(mint(app, role, name=f"sim-{role.name}-{secrets.token_hex(4)}"))
        async with (
            httpx.AsyncClient(transport=transport, base_url=base, headers=headers) as api,
            httpx.AsyncClient(transport=transport, base_url=base) as device_api,
        ):
            return await enroll_fleet(
                api, device_api, ids, identities, labels=LABELS, now=NOW, concurrency=3
            )

    return asyncio.run(go())


def files(identities: DeviceIdentities, suffix: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(identities.directory.glob(f"*.{suffix}"))}


@pytest.fixture
def fleet(tmp_path: Path) -> DevFleet:
    return DevFleet(tmp_path / "fleet")


def test_a_round_enrolls_every_device_then_a_rerun_reuses_every_identity(
    tmp_path: Path, fleet: DevFleet
) -> None:
    app = hub_app(tmp_path / "hub", fleet)
    identities = DeviceIdentities(tmp_path / "identities")
    first = enroll(app, identities)
    assert (first.enrolled, first.reused, first.reasons) == (5, 0, {"no_key": 5})
    assert len(first.request_ms) == 5 and first.broker_url == "mqtts://127.0.0.1:8883"
    assert identities.directory.stat().st_mode & 0o777 == 0o700
    keys, certs = files(identities, "key"), files(identities, "crt")
    assert set(keys) == {f"{d}.key" for d in IDS}
    assert all((identities.directory / k).stat().st_mode & 0o077 == 0 for k in keys)
    ca = app.state.context.ca
    assert certs.pop("ca.crt") == ca.cert_pem
    assert identities.root.read_bytes() == fleet.root_path.read_bytes()
    for device_id in IDS:  # each certificate is for the key that stayed here
        cert = x509.load_pem_x509_certificate(certs[f"{device_id}.crt"])
        cert.verify_directly_issued_by(ca.cert)
        key = serialization.load_pem_private_key(keys[f"{device_id}.key"], password=None)
        assert cert.public_key() == key.public_key()
    with new_session(app.state.context.engine) as session:  # registered by enrollment, labelled
        assert store.cut_off_devices(session) == []
    assert first.as_dict()["per_s"] is not None

    again = enroll(app, identities)
    assert (again.enrolled, again.reused, again.reasons) == (0, 5, {})
    assert again.broker_url == "mqtts://127.0.0.1:8883" and again.root
    assert files(identities, "key") == keys
    assert files(identities, "crt") == {**certs, "ca.crt": ca.cert_pem}


def test_revoked_and_missing_certificates_are_enrolled_again_with_the_same_keys(
    tmp_path: Path, fleet: DevFleet
) -> None:
    app = hub_app(tmp_path / "hub", fleet)
    identities = DeviceIdentities(tmp_path / "identities")
    enroll(app, identities)
    keys, certs = files(identities, "key"), files(identities, "crt")
    # decommissioned, and the broker cut it off
    with new_session(app.state.context.engine) as session:
        device_store.decommission_device(session, device_id=IDS[1], now=NOW)
        device_store.confirm_cut_offs(session, device_ids=[IDS[1]], now=NOW)
    identities.cert(IDS[3]).unlink()
    result = enroll(app, identities)
    assert (result.enrolled, result.reused) == (2, 3)
    assert result.reasons == {"no_certificate": 1, "revoked": 1}
    assert files(identities, "key") == keys  # a key never changes once made
    now_certs = files(identities, "crt")
    assert [n for n in certs if now_certs.get(n) != certs[n]] == [f"{IDS[1]}.crt", f"{IDS[3]}.crt"]


def test_a_hub_with_another_ca_gets_every_device_enrolled_again(
    tmp_path: Path, fleet: DevFleet
) -> None:
    identities = DeviceIdentities(tmp_path / "identities")
    enroll(hub_app(tmp_path / "hub-1", fleet), identities)
    keys = files(identities, "key")
    second = hub_app(tmp_path / "hub-2", fleet)  # a new hub: new database, new fleet CA
    result = enroll(second, identities)
    assert (result.enrolled, result.reasons) == (5, {"other_ca": 5})
    assert files(identities, "key") == keys
    assert identities.ca.read_bytes() == second.state.context.ca.cert_pem


def test_a_token_that_may_not_make_enrollment_tokens_stops_the_round_and_says_why(
    tmp_path: Path, fleet: DevFleet
) -> None:
    identities = DeviceIdentities(tmp_path / "identities")
    with pytest.raises(EnrollError, match="needs an admin token"):
        enroll(hub_app(tmp_path / "hub", fleet), identities, role=Role.operator)
    assert not identities.ca.exists() and files(identities, "crt") == {}


# ---------------------------------------------------------------- using the identities


def test_a_device_tls_context_trusts_the_fleet_ca_and_presents_its_certificate(
    tmp_path: Path, fleet: DevFleet
) -> None:
    identities = DeviceIdentities(tmp_path / "identities")
    enroll(hub_app(tmp_path / "hub", fleet), identities, ids=IDS[:1])
    context = identities.tls_context(IDS[0], identities.ca_pem())
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] != []
    with pytest.raises(EnrollError, match=f"{IDS[1]}: no usable identity"):
        identities.tls_context(IDS[1], identities.ca_pem())
    with pytest.raises(EnrollError, match="no fleet CA"):
        DeviceIdentities(tmp_path / "empty").ca_pem()


@pytest.mark.parametrize(
    "broker, identity_dir",
    [
        pytest.param("mqtts://127.0.0.1:8883", None, id="mqtts-without-identities"),
        pytest.param("mqtt://127.0.0.1:1883", Path("ids"), id="identities-over-plain-mqtt"),
    ],
)
def test_fleet_config_pairs_mqtts_with_identities(broker: str, identity_dir: Path | None) -> None:
    with pytest.raises(ValueError, match="mqtts"):
        FleetConfig(broker_url=broker, device_ids=("a",), identity_dir=identity_dir)
    FleetConfig(broker_url="mqtts://127.0.0.1:8883", device_ids=("a",), identity_dir=Path("ids"))


def test_a_link_needs_a_tls_context_exactly_when_it_is_mqtts() -> None:
    tls = LinkSettings.from_url("mqtts://127.0.0.1:8883")
    assert tls.tls and not LinkSettings.from_url("mqtt://127.0.0.1").tls
    with pytest.raises(ValueError, match="TLS context"):
        DeviceLink("a", tls, will_topic="t", will_payload=b"")
    with pytest.raises(ValueError, match="TLS context"):
        DeviceLink(
            "a",
            LinkSettings.from_url("mqtt://127.0.0.1"),
            will_topic="t",
            will_payload=b"",
            tls_context=ssl.create_default_context(),
        )


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--enroll"], "the broker must be mqtts://", id="enroll-over-plain-mqtt"),
        pytest.param(["--broker", "mqtts://127.0.0.1:8883"], "needs --enroll", id="tls-no-enroll"),
    ],
)
def test_sim_run_refuses_enroll_and_tls_apart(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    argv = ["sim", "run", "--devices", "3", "--state-dir", str(tmp_path / "state"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
