"""The agent's own reader of a certificate's serial and dates, checked against cryptography's."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from hub.identity import CertificateAuthority
from plumbing.certinfo import read_der_certificate, read_pem_certificate

UTC = dt.UTC


def _cert(
    serial: int,
    not_before: dt.datetime,
    not_after: dt.datetime,
    *,
    ed: bool = False,
    extensions: bool = True,
) -> x509.Certificate:
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
        ed25519.Ed25519PrivateKey.generate() if ed else ec.generate_private_key(ec.SECP256R1())
    )
    # A name longer than 127 bytes: its length takes the long form.
    name = x509.Name(
        [
            x509.NameAttribute(oid, "device-1" * 7)
            for oid in (
                NameOID.ORGANIZATION_NAME,
                NameOID.ORGANIZATIONAL_UNIT_NAME,
                NameOID.COMMON_NAME,
            )
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    if extensions:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
    return builder.sign(key, None if ed else hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _at(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0
) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, sec, tzinfo=UTC)


@pytest.mark.parametrize(
    ("serial", "not_before", "not_after", "ed"),
    [
        (1, _at(2026, 1, 2, 3, 4, 5), _at(2028, 4, 6), False),
        # The largest serial RFC 5280 allows (20 octets, high bit set: a leading zero in DER).
        (2**159 - 1, _at(1950, 1, 1), _at(2049, 12, 31), True),
        # From 2050 on, GeneralizedTime; before, UTCTime (both in one certificate).
        (0x80, _at(2049, 6, 1), _at(2060, 2, 29, 23, 59, 59), False),
        (x509.random_serial_number(), _at(2026, 12, 6), _at(9999, 12, 31, 23, 59, 59), True),
    ],
)
def test_serial_and_dates_match_cryptographys(
    serial: int, not_before: dt.datetime, not_after: dt.datetime, ed: bool
) -> None:
    cert = _cert(serial, not_before, not_after, ed=ed)
    info = read_pem_certificate(_pem(cert))
    assert info.serial == cert.serial_number == serial
    assert info.serial_hex == format(cert.serial_number, "x")
    assert info.not_before == cert.not_valid_before_utc.timestamp() == not_before.timestamp()
    assert info.not_after == cert.not_valid_after_utc.timestamp() == not_after.timestamp()


def test_the_first_certificate_of_a_chain_is_read() -> None:
    now = dt.datetime(2026, 12, 6, tzinfo=UTC)
    first, second = _cert(7, now, now + dt.timedelta(days=1)), _cert(8, now, now, extensions=False)
    assert read_pem_certificate(b"junk\n" + _pem(first) + _pem(second)).serial == 7


def test_a_certificate_made_by_the_fleet_ca_is_read(tmp_path: Path) -> None:
    now = dt.datetime.now(UTC).replace(microsecond=0)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", now=now)
    _, issued = ca.issue_keypair("device-1", server=False, now=now)
    cert = x509.load_pem_x509_certificate(issued.pem)
    info = read_pem_certificate(issued.pem)
    assert (info.serial, info.not_after) == (
        cert.serial_number,
        cert.not_valid_after_utc.timestamp(),
    )


def _der() -> bytes:
    now = dt.datetime(2026, 12, 6, tzinfo=UTC)
    return _cert(5, now, now + dt.timedelta(days=1)).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "truncated DER"),
        (b"\x02\x01\x05", "one SEQUENCE spanning it all"),
        (b"\x30\x03\x02\x01\x05", "TBSCertificate: expected SEQUENCE"),
        (b"\x30\x85\x00\x00\x00\x00\x01\x00", "5 length bytes"),
        (b"\x30\x81\x05\x30\x03\x02\x01\x05", "not in its shortest form"),
        (b"\x30\x05\x30\x03\x04\x01\x05", "serialNumber: expected INTEGER"),
        (b"\x30\x06\x30\x04\x02\x01\x05\x31", "truncated DER"),
        (b"\x30\x07\x30\x05\x02\x01\x05\x31\x00", "signature: expected SEQUENCE"),
    ],
)
def test_malformed_der_is_refused_saying_what(data: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        read_der_certificate(data)


def test_truncated_and_padded_certificates_are_refused() -> None:
    der = _der()
    for cut in (1, 2, 10, len(der) // 2, len(der) - 1):
        with pytest.raises(ValueError, match=r"truncated DER|spanning"):
            read_der_certificate(der[:cut])
    with pytest.raises(ValueError, match="spanning it all"):
        read_der_certificate(der + b"\x00")


def test_a_time_that_is_not_a_der_utc_time_is_refused() -> None:
    der = _der()
    when = b"261206000000Z"  # notBefore as UTCTime
    assert der.count(when) == 1
    for bad, error in (
        (b"261306000000Z", "not a valid date"),
        (b"2612060000+01", "not a DER time"),
    ):
        with pytest.raises(ValueError, match=error):
            read_der_certificate(der.replace(when, bad))
    with pytest.raises(ValueError, match="expected UTCTime or GeneralizedTime"):
        read_der_certificate(der.replace(b"\x17\x0d" + when, b"\x04\x0d" + when))


def test_text_that_is_not_a_pem_certificate_is_refused() -> None:
    with pytest.raises(ValueError, match="no BEGIN/END CERTIFICATE"):
        read_pem_certificate(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="bad base64"):
        read_pem_certificate(b"-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n")
