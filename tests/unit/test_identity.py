"""The hub CA: who gets a certificate, and in which name."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.identity import create_key, make_csr
from hub.broker_config import render_acl
from hub.identity import CertificateAuthority, IdentityError

NOW = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW)


def csr_with(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cn: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_ca_key_is_private_and_reloaded(ca: CertificateAuthority, tmp_path: Path) -> None:
    assert (tmp_path / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    again = CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW)
    assert again.cert == ca.cert


def test_ca_key_readable_by_others_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    (tmp_path / "ca" / "ca.key").chmod(0o644)
    with pytest.raises(IdentityError, match="readable by others"):
        CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW)


def test_half_a_ca_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    (tmp_path / "ca" / "ca.crt").unlink()
    with pytest.raises(IdentityError, match="half a CA"):
        CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW)


def test_device_certificate_from_its_own_csr(ca: CertificateAuthority, tmp_path: Path) -> None:
    key = create_key(tmp_path / "dev.key")
    assert (tmp_path / "dev.key").stat().st_mode & 0o777 == 0o600
    issued = ca.issue_from_csr(make_csr(key, "pump-17"), device_id="pump-17", now=NOW)
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pump-17"
    assert cert.public_key() == key.public_key()
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(ca.cert)


def test_device_key_file_is_never_overwritten(tmp_path: Path) -> None:
    create_key(tmp_path / "dev.key")
    with pytest.raises(FileExistsError):
        create_key(tmp_path / "dev.key")


@pytest.mark.parametrize(
    "make, device_id, reason",
    [
        pytest.param(
            lambda: csr_with(ec.generate_private_key(ec.SECP256R1()), "pump-18"),
            "pump-17",
            "does not match",
            id="csr-name-of-another-device",
        ),
        pytest.param(
            lambda: csr_with(ec.generate_private_key(ec.SECP384R1()), "pump-17"),
            "pump-17",
            "not P-256",
            id="wrong-curve",
        ),
        pytest.param(
            lambda: csr_with(rsa.generate_private_key(65537, 2048), "pump-17"),
            "pump-17",
            "P-256 or Ed25519",
            id="rsa-key",
        ),
        pytest.param(lambda: b"not a csr", "pump-17", "not a PEM", id="garbage"),
    ],
)
def test_bad_csrs_are_refused(
    ca: CertificateAuthority, make: object, device_id: str, reason: str
) -> None:
    with pytest.raises(IdentityError, match=reason):
        ca.issue_from_csr(make(), device_id=device_id, now=NOW)  # type: ignore[operator]


def test_tampered_csr_is_refused(ca: CertificateAuthority) -> None:
    pem = csr_with(ec.generate_private_key(ec.SECP256R1()), "pump-17")
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x01  # inside the signature
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(IdentityError, match="signature"):
        ca.issue_from_csr(forged, device_id="pump-17", now=NOW)


def test_crl_lists_revoked_serials(ca: CertificateAuthority) -> None:
    crl = x509.load_pem_x509_crl(ca.crl([(1234, NOW)], now=NOW))
    assert crl.get_revoked_certificate_by_serial_number(1234) is not None
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]


def test_acl_confines_devices_to_their_own_channels() -> None:
    acl = render_acl(["driftless-hub"])
    assert "user driftless-hub\ntopic readwrite driftless/v1/devices/#" in acl
    assert "pattern read driftless/v1/devices/%u/desired" in acl
    assert "pattern write driftless/v1/devices/%u/reported" in acl
    assert "pattern readwrite" not in acl
