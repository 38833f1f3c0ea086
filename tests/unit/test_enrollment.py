"""Enrollment tokens: who may enroll, in which name, how often, until when."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import Session, select

from edge_agent.identity import make_csr
from hub.db import init_db, make_engine, new_session
from hub.devices import store
from hub.devices.errors import CutOffPending, DeviceActive, DeviceDecommissioned, DeviceNotFound
from hub.devices.models import Device
from hub.enrollment.models import DeviceCertificate, EnrollmentToken
from hub.enrollment.revocation import current_crl
from hub.enrollment.store import (
    EnrollmentRefused,
    create_token,
    redeem,
    revoked,
    token_hash,
)
from hub.identity import CertificateAuthority

NOW = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(hours=1)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=1000)
    init_db(engine)
    with new_session(engine) as s:
        yield s


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW)


def csr(device_id: str) -> bytes:
    return make_csr(ec.generate_private_key(ec.SECP256R1()), device_id)


def test_token_is_stored_hashed_only(session: Session) -> None:
    secret, _ = create_token(session, device_id="d1", uses=1, expires_at=LATER, labels={}, now=NOW)
    rows = session.exec(select(EnrollmentToken)).all()
    assert [r.token_hash for r in rows] == [token_hash(secret)]
    assert all(secret not in str(r.model_dump()) for r in rows)


def test_single_use_token_enrolls_once_and_registers(
    session: Session, ca: CertificateAuthority
) -> None:
    secret, _ = create_token(
        session, device_id="d1", uses=5, expires_at=LATER, labels={"site": "lab"}, now=NOW
    )
    enrolled = redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
    assert enrolled.created_device
    assert session.get(Device, "d1").labels == {"site": "lab"}  # type: ignore[union-attr]
    with pytest.raises(EnrollmentRefused, match="used up"):
        redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)


def test_claim_token_counts_down(session: Session, ca: CertificateAuthority) -> None:
    secret, _ = create_token(session, device_id=None, uses=2, expires_at=LATER, labels={}, now=NOW)
    for device in ("m1", "m2"):
        redeem(session, secret=secret, device_id=device, csr_pem=csr(device), ca=ca, now=NOW)
    with pytest.raises(EnrollmentRefused, match="used up"):
        redeem(session, secret=secret, device_id="m3", csr_pem=csr("m3"), ca=ca, now=NOW)


@pytest.mark.parametrize(
    "secret_of, device_id, csr_for, now, reason",
    [
        pytest.param(lambda s: "nope", "d1", "d1", NOW, "unknown", id="unknown-token"),
        pytest.param(lambda s: s, "d1", "d1", LATER, "expired", id="expired-token"),
        pytest.param(lambda s: s, "d2", "d2", NOW, "another device", id="token-for-other-device"),
        pytest.param(lambda s: s, "d1", "d9", NOW, "does not match", id="csr-name-mismatch"),
        pytest.param(lambda s: s, "a/b", "d1", NOW, "not valid", id="bad-device-id"),
    ],
)
def test_refusals_consume_nothing(
    session: Session,
    ca: CertificateAuthority,
    secret_of: object,
    device_id: str,
    csr_for: str,
    now: dt.datetime,
    reason: str,
) -> None:
    secret, _ = create_token(session, device_id="d1", uses=1, expires_at=LATER, labels={}, now=NOW)
    with pytest.raises(EnrollmentRefused, match=reason):
        redeem(
            session,
            secret=secret_of(secret),
            device_id=device_id,  # type: ignore[operator]
            csr_pem=csr(csr_for),
            ca=ca,
            now=now,
        )
    assert session.get(EnrollmentToken, token_hash(secret)).uses_left == 1  # type: ignore[union-attr]
    assert session.exec(select(DeviceCertificate)).all() == []
    redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)


def test_revocation_lists_serials(session: Session, ca: CertificateAuthority) -> None:
    secret, _ = create_token(session, device_id=None, uses=3, expires_at=LATER, labels={}, now=NOW)
    first = redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
    redeem(session, secret=secret, device_id="d2", csr_pem=csr("d2"), ca=ca, now=NOW)
    done = store.decommission_device(session, device_id="d1", now=LATER)
    assert done.revoked_serials == [first.certificate.serial] and not done.already
    assert revoked(session) == [(first.certificate.serial, LATER)]
    again = store.decommission_device(session, device_id="d1", now=LATER)
    assert again.revoked_serials == [] and again.already


def test_decommissioning_puts_exactly_the_device_s_serials_on_the_crl(
    session: Session, ca: CertificateAuthority
) -> None:
    """What the broker refuses at the next handshake: every certificate the device was
    issued (here two, as after a re-enrollment), signed by the fleet CA, and no other."""
    secret, _ = create_token(session, device_id=None, uses=3, expires_at=LATER, labels={}, now=NOW)
    issued = [
        redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
        for _ in range(2)
    ]
    other = redeem(session, secret=secret, device_id="d2", csr_pem=csr("d2"), ca=ca, now=NOW)

    def crl_now() -> x509.CertificateRevocationList:
        crl = x509.load_pem_x509_crl(current_crl(session, ca, now=LATER))
        assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
        return crl

    assert list(crl_now()) == []
    store.decommission_device(session, device_id="d1", now=LATER)
    crl = crl_now()
    assert sorted(entry.serial_number for entry in crl) == sorted(
        enrolled.certificate.serial for enrolled in issued
    )
    assert {entry.revocation_date_utc for entry in crl} == {LATER}
    assert crl.get_revoked_certificate_by_serial_number(other.certificate.serial) is None


def test_decommissioning_keeps_the_device_visible_and_clears_its_document(
    session: Session, ca: CertificateAuthority
) -> None:
    secret, _ = create_token(session, device_id="d1", uses=1, expires_at=LATER, labels={}, now=NOW)
    redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
    store.set_desired(session, device_id="d1", config={"a": 1}, now=NOW, max_config_bytes=1000)
    store.decommission_device(session, device_id="d1", now=LATER)
    row = store.get_device(session, device_id="d1")
    assert row.decommissioned_at == LATER and row.cut_off_at is None
    assert row.desired_config == {} and row.desired_generation == 2  # a new generation
    assert store.desired_documents(session, device_ids=["d1"]) == {"d1": None}
    assert store.pending_cut_offs(session, limit=10) == ["d1"]
    with pytest.raises(DeviceDecommissioned):
        store.set_desired(session, device_id="d1", config={}, now=LATER, max_config_bytes=1000)
    with pytest.raises(DeviceDecommissioned):
        store.register_device(session, device_id="d1", labels={}, now=LATER)
    assert store.fleet_summary(session).decommissioned == 1
    assert store.fleet_summary(session).total == 0


def test_a_decommissioned_id_is_enrolled_again_only_once_the_broker_cut_it_off(
    session: Session, ca: CertificateAuthority
) -> None:
    secret, _ = create_token(session, device_id="d1", uses=1, expires_at=LATER, labels={}, now=NOW)
    redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
    session.exec(select(Device)).one().session = 7
    session.commit()
    store.decommission_device(session, device_id="d1", now=NOW)
    again, _ = create_token(session, device_id="d1", uses=1, expires_at=LATER, labels={}, now=NOW)
    with pytest.raises(CutOffPending):
        redeem(session, secret=again, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
    token = session.get(EnrollmentToken, token_hash(again))
    assert token is not None and token.uses_left == 1  # nothing consumed
    assert store.confirm_cut_offs(session, device_ids=["d1", "other"], now=NOW) == ["d1"]
    assert store.confirm_cut_offs(session, device_ids=["d1"], now=NOW) == []  # once
    redeem(session, secret=again, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
    row = store.get_device(session, device_id="d1")
    assert row.decommissioned_at is None and row.cut_off_at is None
    assert row.awaiting_birth and row.session == -1 and not row.online  # a new unit


def test_without_broker_cut_offs_an_id_is_enrolled_again_at_once(
    session: Session, ca: CertificateAuthority
) -> None:
    secret, _ = create_token(session, device_id="d1", uses=1, expires_at=LATER, labels={}, now=NOW)
    redeem(session, secret=secret, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW)
    store.decommission_device(session, device_id="d1", now=NOW)
    again, _ = create_token(session, device_id="d1", uses=1, expires_at=LATER, labels={}, now=NOW)
    redeem(
        session, secret=again, device_id="d1", csr_pem=csr("d1"), ca=ca, now=NOW,
        require_cut_off=False,
    )  # fmt: skip
    assert store.get_device(session, device_id="d1").decommissioned_at is None


def test_purge_needs_a_decommissioned_and_cut_off_device(
    session: Session, ca: CertificateAuthority
) -> None:
    store.register_device(session, device_id="d1", labels={}, now=NOW)
    with pytest.raises(DeviceActive):
        store.purge_device(session, device_id="d1", now=NOW, require_cut_off=True)
    store.decommission_device(session, device_id="d1", now=NOW)
    with pytest.raises(CutOffPending):
        store.purge_device(session, device_id="d1", now=NOW, require_cut_off=True)
    store.confirm_cut_offs(session, device_ids=["d1"], now=NOW)
    store.purge_device(session, device_id="d1", now=NOW, require_cut_off=True)
    with pytest.raises(DeviceNotFound):
        store.get_device(session, device_id="d1")
    store.register_device(session, device_id="d1", labels={}, now=LATER)  # the id is free
