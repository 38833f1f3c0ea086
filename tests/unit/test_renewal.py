"""Certificate renewal: the hub's rules and the device's checks, each refusal named."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from sqlalchemy import Engine
from sqlmodel import select

from edge_agent.enroll import Identity
from edge_agent.identity import create_key, make_csr
from edge_agent.renewal import Renewal, renewal_due
from hub.db import init_db, make_engine, new_session
from hub.enrollment.models import DeviceCertificate
from hub.enrollment.renewal import renew
from hub.enrollment.store import revoke_device_certificates
from hub.identity import CertificateAuthority
from hub.models import Device
from protocols import CertIssued, CertRequest, decode, encode

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def test_renewal_is_due_after_the_given_part_of_the_lifetime() -> None:
    assert not renewal_due(0, 300, 199, 2 / 3)
    assert renewal_due(0, 300, 200, 2 / 3)
    assert renewal_due(0, 300, 0, 0.0)


# ---------------------------------------------------------------- the hub


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW - DAY)


@pytest.fixture
def engine(tmp_path: Path, ca: CertificateAuthority) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=5000)
    init_db(engine)
    with new_session(engine) as session:
        session.add(Device(id="pump-1", labels={}, created_at=NOW - DAY))
        issued = ca.issue_from_csr(
            csr("pump-1", tmp_path / "k0"), device_id="pump-1", now=NOW - DAY
        )
        session.add(
            DeviceCertificate(
                serial=format(issued.serial, "x"),
                device_id="pump-1",
                not_after=issued.not_after,
                issued_at=NOW - DAY,
            )
        )
        session.commit()
    return engine


def csr(device_id: str, key_path: Path) -> bytes:
    return make_csr(create_key(key_path), device_id)


def ask(
    engine: Engine,
    ca: CertificateAuthority,
    device_id: str,
    pem: bytes,
    *,
    now: dt.datetime = NOW,
    min_interval_s: float = 3600,
) -> CertIssued:
    request = CertRequest(device_id=device_id, request_id=7, csr_pem=pem.decode(), ts=1.0)
    with new_session(engine) as session:
        return renew(
            session, ca, request=request, now=now, validity_days=30, min_interval_s=min_interval_s
        )


def test_the_hub_issues_a_renewal_and_records_it(
    tmp_path: Path, engine: Engine, ca: CertificateAuthority
) -> None:
    answer = ask(engine, ca, "pump-1", csr("pump-1", tmp_path / "k1"))
    assert answer.error is None and answer.request_id == 7 and answer.certificate_pem
    cert = x509.load_pem_x509_certificate(answer.certificate_pem.encode())
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=30)
    with new_session(engine) as session:
        assert len(session.exec(select(DeviceCertificate)).all()) == 2


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("unknown-device", "not registered"),
        ("csr-for-another", "CSR refused"),
        ("too-soon", "renewals are at most one per 3600 s"),
        ("revoked", "no valid certificate"),
    ],
)
def test_the_hub_refuses_and_says_why(
    tmp_path: Path, engine: Engine, ca: CertificateAuthority, case: str, expect: str
) -> None:
    if case == "revoked":
        with new_session(engine) as session:
            revoke_device_certificates(session, device_id="pump-1", now=NOW)
    device_id, csr_name, now = {
        "unknown-device": ("pump-9", "pump-9", NOW),
        "csr-for-another": ("pump-1", "pump-2", NOW),
        "too-soon": ("pump-1", "pump-1", NOW - DAY + dt.timedelta(minutes=5)),
        "revoked": ("pump-1", "pump-1", NOW),
    }[case]
    answer = ask(engine, ca, device_id, csr(csr_name, tmp_path / "k2"), now=now)
    assert answer.certificate_pem is None and answer.error is not None and expect in answer.error
    if case == "too-soon":
        assert answer.retry_after_s == pytest.approx(3300, abs=1)
    with new_session(engine) as session:
        assert len(session.exec(select(DeviceCertificate)).all()) == 1  # nothing issued


# ---------------------------------------------------------------- the device


class Device_:
    """An enrolled device directory and its Renewal, publishing into a list."""

    def __init__(self, tmp_path: Path, ca: CertificateAuthority) -> None:
        self.identity = Identity(tmp_path / "agent")
        self.ca = ca
        key_pem_path = self.identity.key
        issued = ca.issue_from_csr(
            csr("pump-1", key_pem_path), device_id="pump-1", now=NOW - DAY, validity_days=3
        )
        self.identity.cert.write_bytes(issued.pem)
        self.identity.ca.write_bytes(ca.cert_pem)
        self.identity.record.write_text('{"device_id": "pump-1"}')
        self.sent: list[tuple[str, bytes]] = []
        self.renewal = Renewal(
            self.identity,
            "pump-1",
            publish=lambda name, payload: self.sent.append((name, payload)),
            at_fraction=0.1,
            clock=NOW.timestamp,
        )

    def request(self) -> CertRequest:
        assert self.renewal.maybe_request()
        return decode(self.sent[-1][1], CertRequest)

    def answer_for(self, request: CertRequest, *, device_id: str = "pump-1") -> bytes:
        issued = self.ca.issue_from_csr(request.csr_pem.encode(), device_id=device_id, now=NOW)
        return encode(
            CertIssued(
                device_id="pump-1",
                request_id=request.request_id,
                certificate_pem=issued.pem.decode(),
                ts=1.0,
            )
        )


def test_the_device_switches_to_the_renewed_pair(tmp_path: Path, ca: CertificateAuthority) -> None:
    device = Device_(tmp_path, ca)
    old = device.identity.cert.read_bytes()
    request = device.request()
    assert device.sent[-1][0].endswith("/pump-1/cert_req")
    assert not device.renewal.maybe_request()  # one in flight: no second request
    assert device.renewal.on_answer(device.answer_for(request))
    assert device.identity.cert.read_bytes() != old
    assert not device.renewal.next_key.exists() and not device.renewal.next_cert.exists()


def test_the_device_takes_nothing_it_cannot_check(tmp_path: Path, ca: CertificateAuthority) -> None:
    device = Device_(tmp_path, ca)
    old = device.identity.cert.read_bytes()
    request = device.request()
    other_ca = CertificateAuthority.load_or_create(tmp_path / "other", now=NOW)
    foreign = other_ca.issue_from_csr(request.csr_pem.encode(), device_id="pump-1", now=NOW)
    wrong_key = ca.issue_from_csr(csr("pump-1", tmp_path / "x"), device_id="pump-1", now=NOW)
    for pem, why in ((foreign.pem, "foreign CA"), (wrong_key.pem, "another key")):
        answer = CertIssued(
            device_id="pump-1", request_id=request.request_id, certificate_pem=pem.decode(), ts=1
        )
        assert not device.renewal.on_answer(encode(answer)), why
    stale = CertIssued(device_id="pump-1", request_id=request.request_id + 1, error="x", ts=1)
    assert not device.renewal.on_answer(encode(stale))  # not the request in flight
    assert not device.renewal.on_answer(b"{not json")
    assert device.identity.cert.read_bytes() == old


def test_a_refusal_with_a_retry_time_is_asked_again_then(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    device = Device_(tmp_path, ca)
    request = device.request()
    refusal = CertIssued(
        device_id="pump-1", request_id=request.request_id, error="too soon", retry_after_s=5, ts=1
    )
    assert not device.renewal.on_answer(encode(refusal))
    assert not device.renewal.maybe_request()
    device.renewal.clock = lambda: NOW.timestamp() + 5
    assert device.renewal.maybe_request()


def test_a_switch_interrupted_by_a_crash_is_finished_at_start(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """Crash after the certificate was written but before the renames: start completes it."""
    device = Device_(tmp_path, ca)
    request = device.request()
    pem = decode(device.answer_for(request), CertIssued).certificate_pem
    assert pem is not None
    device.renewal.next_cert.write_bytes(pem.encode())  # ...and then the power went
    device.renewal.recover()
    assert device.identity.cert.read_bytes() == pem.encode()
    key = device.identity.key.read_bytes()
    assert not device.renewal.next_key.exists() and not device.renewal.next_cert.exists()
    # The key in place is the one the new certificate is for.
    from cryptography.hazmat.primitives import serialization

    loaded = serialization.load_pem_private_key(key, password=None)
    cert = x509.load_pem_x509_certificate(pem.encode())
    assert loaded.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
