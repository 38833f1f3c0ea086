"""The hub CA: who gets a certificate, and in which name."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import protocols
from edge_agent.identity import create_key, make_csr
from hub.broker_config import hub_identities, render_acl
from hub.identity import CertificateAuthority, IdentityError, check_service_name, is_service_name
from hub.settings import HubSettings

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
    acl = render_acl(["hub:driftless-hub", "admin:console"])
    assert "user hub:driftless-hub\ntopic readwrite driftless/v1/devices/#" in acl
    # Only the hub's own identities may command the broker (cutting off revoked devices).
    assert (
        "user hub:driftless-hub\ntopic readwrite driftless/v1/devices/#\n"
        + (
            "topic write $CONTROL/dynamic-security/v1\n"
            "topic read $CONTROL/dynamic-security/v1/response\n"
        )
        in acl
    )
    assert "user admin:console\ntopic readwrite driftless/v1/devices/#\n\n" in acl
    assert "pattern read driftless/v1/devices/%u/desired" in acl
    assert "pattern write driftless/v1/devices/%u/reported" in acl
    assert "pattern readwrite" not in acl


# ---------------------------------------------------------------- reserved names


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("hub:driftless-hub", id="hub"),
        pytest.param("hub:driftless-hub-bundles", id="hub-chunk-server"),
        pytest.param("admin:ops-console", id="admin"),
    ],
)
def test_no_device_id_is_a_service_name(name: str) -> None:
    """By construction: every service name holds a ':', which no device id may hold."""
    assert is_service_name(name)
    assert not protocols.is_valid_device_id(name)
    assert ":" not in protocols.DEVICE_ID_PATTERN
    bare = name.split(":", 1)[1]
    assert protocols.is_valid_device_id(bare) and not is_service_name(bare)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("driftless-hub", id="a-device-id"),
        pytest.param("root:x", id="unknown-kind"),
        pytest.param("hub:", id="empty-name"),
        pytest.param("hub:a/b", id="slash"),
        pytest.param("hub:#", id="wildcard"),
        pytest.param("admin:" + "x" * 60, id="longer-than-a-common-name"),
    ],
)
def test_anything_else_is_refused_as_a_service_name(name: str) -> None:
    with pytest.raises(ValueError, match="not a service name"):
        check_service_name(name)


def test_the_acl_refuses_to_give_a_device_id_the_hubs_rights() -> None:
    with pytest.raises(ValueError, match="not a service name"):
        render_acl(["driftless-hub"])
    assert hub_identities("driftless-hub") == ("hub:driftless-hub", "hub:driftless-hub-bundles")


def test_hub_settings_take_only_admin_names_as_broker_admins(tmp_path: Path) -> None:
    base = {"broker_url": "mqtts://127.0.0.1:8883", "db_url": f"sqlite:///{tmp_path}/h.db"}
    HubSettings(**base, broker_acl_admins=("admin:console",))  # type: ignore[arg-type]
    for name in ("console", "hub:console", "victim-1"):
        with pytest.raises(ValueError, match="admin:NAME"):
            HubSettings(**base, broker_acl_admins=(name,))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["hub:driftless-hub", "admin:console", "hub:x"])
def test_the_ca_never_issues_a_service_name_from_a_csr(
    ca: CertificateAuthority, tmp_path: Path, name: str
) -> None:
    """The path enrollment and renewal take: device ids only."""
    csr = csr_with(ec.generate_private_key(ec.SECP256R1()), name)
    with pytest.raises(ValueError, match="device id"):
        ca.issue_from_csr(csr, device_id=name, now=NOW)
