"""Certificate renewal: the hub's rules and the device's checks, each refusal named."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from cryptography import x509
from sqlalchemy import Engine
from sqlmodel import select

from edge_agent.enroll import Identity
from edge_agent.identity import create_key, make_csr, sign_proof
from edge_agent.renewal import Renewal, renewal_due
from hub.db import init_db, make_engine, new_session
from hub.devices import store
from hub.devices.models import Device
from hub.enrollment.models import DeviceCertificate
from hub.enrollment.renewal import renew
from hub.identity import CertificateAuthority
from protocols import CertIssued, CertRequest, decode, encode, renewal_proof_bytes

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
        (tmp_path / "k0.crt").write_bytes(issued.pem)
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


def request_for(device_id: str, pem: bytes, *, cert: Path | None, key: Path | None) -> CertRequest:
    """A renewal request proving possession of ``key`` with ``cert`` (None: no proof)."""
    if cert is None or key is None:
        return CertRequest(device_id=device_id, request_id=7, csr_pem=pem.decode(), ts=1.0)
    proof = sign_proof(key, renewal_proof_bytes(device_id, 7, pem.decode()))
    return CertRequest(
        device_id=device_id, request_id=7, csr_pem=pem.decode(),
        certificate_pem=cert.read_text(), proof=proof, ts=1.0,
    )  # fmt: skip


def ask(
    engine: Engine,
    ca: CertificateAuthority,
    request: CertRequest,
    *,
    now: dt.datetime = NOW,
    min_interval_s: float = 3600,
) -> CertIssued:
    with new_session(engine) as session:
        return renew(
            session, ca, request=request, now=now, validity_days=30, min_interval_s=min_interval_s
        )


def test_the_hub_issues_a_renewal_and_records_it(
    tmp_path: Path, engine: Engine, ca: CertificateAuthority
) -> None:
    pem = csr("pump-1", tmp_path / "k1")
    request = request_for("pump-1", pem, cert=tmp_path / "k0.crt", key=tmp_path / "k0")
    answer = ask(engine, ca, request)
    assert answer.error is None and answer.request_id == 7 and answer.certificate_pem
    cert = x509.load_pem_x509_certificate(answer.certificate_pem.encode())
    assert cert.not_valid_after_utc - NOW == dt.timedelta(days=30)
    with new_session(engine) as session:
        assert len(session.exec(select(DeviceCertificate)).all()) == 2


def csr_name_for(case: str) -> str:
    return {"unknown-device": "pump-9", "csr-for-another": "pump-2"}.get(case, "pump-1")


def _other_ca_cert(tmp_path: Path) -> Path:
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca", now=NOW - DAY)
    issued = other.issue_from_csr(csr("pump-1", tmp_path / "ko"), device_id="pump-1", now=NOW)
    (tmp_path / "ko.crt").write_bytes(issued.pem)
    return tmp_path / "ko.crt"


def _unrecorded_cert(tmp_path: Path, ca: CertificateAuthority, device_id: str) -> Path:
    """A certificate the fleet CA signed that is not on the hub's record (key: ku)."""
    issued = ca.issue_from_csr(csr(device_id, tmp_path / "ku"), device_id=device_id, now=NOW)
    (tmp_path / "ku.crt").write_bytes(issued.pem)
    return tmp_path / "ku.crt"


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        pytest.param("unknown-device", "not registered", id="unknown-device"),
        pytest.param("csr-for-another", "CSR refused", id="csr-names-another-device"),
        pytest.param("too-soon", "renewals are at most one per 3600 s", id="too-soon"),
        pytest.param("revoked", "not a current certificate", id="revoked-certificate"),
        pytest.param("decommissioned", "decommissioned", id="decommissioned"),
        pytest.param("no-proof", "no proof of possession", id="topic-alone-no-proof"),
        pytest.param("wrong-key", "does not verify", id="device-cert-signed-by-another-key"),
        pytest.param("other-device", "is not 'pump-1''s", id="another-devices-certificate"),
        pytest.param("other-ca", "not from this fleet's CA", id="certificate-of-another-ca"),
        pytest.param("unrecorded", "not on record", id="certificate-not-on-record"),
        pytest.param("garbled", "unreadable", id="certificate-garbled"),
    ],
)
def test_the_hub_refuses_and_says_why(
    tmp_path: Path, engine: Engine, ca: CertificateAuthority, case: str, expect: str
) -> None:
    mine, my_key = tmp_path / "k0.crt", tmp_path / "k0"
    if case == "revoked":
        with new_session(engine) as session:
            row = session.exec(select(DeviceCertificate)).one()
            row.revoked_at = NOW - dt.timedelta(minutes=1)
            session.add(row)
            session.commit()
    if case == "decommissioned":
        with new_session(engine) as session:
            store.decommission_device(session, device_id="pump-1", now=NOW)
    presented: dict[str, Callable[[], tuple[Path | None, Path | None]]] = {
        "no-proof": lambda: (None, None),
        "wrong-key": lambda: (mine, tmp_path / "k2"),  # k2: the new key, not the current one
        "other-device": lambda: (_unrecorded_cert(tmp_path, ca, "pump-2"), tmp_path / "ku"),
        "other-ca": lambda: (_other_ca_cert(tmp_path), tmp_path / "ko"),
        "unrecorded": lambda: (_unrecorded_cert(tmp_path, ca, "pump-1"), tmp_path / "ku"),
    }
    pem = csr(csr_name_for(case), tmp_path / "k2")
    cert, key = presented.get(case, lambda: (mine, my_key))()
    device_id, now = {
        "unknown-device": ("pump-9", NOW),
        "too-soon": ("pump-1", NOW - DAY + dt.timedelta(minutes=5)),
    }.get(case, ("pump-1", NOW))
    request = request_for(device_id, pem, cert=cert, key=key)
    if case == "garbled":
        request = msgspec.structs.replace(request, certificate_pem="-----BEGIN nonsense")
    answer = ask(engine, ca, request, now=now)
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
