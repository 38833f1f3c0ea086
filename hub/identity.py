"""The hub's certificate authority: device and broker certificates, CSR checks, the CRL.

Rules:
- ECDSA P-256 everywhere. Mosquitto 2.0.11 accepts Ed25519 too (FIELD-NOTES),
  but P-256 is what every TLS stack a device may carry (OpenSSL, mbedTLS,
  wolfSSL, hardware secure elements) implements, and it is as fast to verify.
- The CA key file is created 0600 with O_EXCL and never rewritten; the CA
  certificate is public.
- A device certificate is issued only from a CSR whose signature verifies, whose
  key is P-256 or Ed25519, and whose common name is exactly the device id the
  caller authorised (an enrollment token's device): the private key never leaves
  the device, and no device can get a certificate in another's name.
- The certificate's common name is the device's MQTT username on the broker
  (``use_identity_as_username``), so the ACL pattern ``%u`` confines it.
- Names with rights beyond one device (the hub's connections, admin consoles)
  are *service names*, ``hub:NAME`` or ``admin:NAME``. No device id can hold a
  ``:`` (:data:`protocols.DEVICE_ID_PATTERN`), so enrollment, renewal and the
  API, which only ever issue certificates for device ids, cannot mint one: the
  two name spaces are disjoint by construction, not by a deny list.
- Time is a parameter (``now``) so issuance and the CRL are testable.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import protocols

CA_COMMON_NAME = "Driftless fleet CA"
SERVICE_KINDS = ("hub", "admin")
# X.509 caps a common name at 64 characters; a service name is "<kind>:<name>".
_SERVICE_NAME_RE = re.compile(r"(hub|admin):[A-Za-z0-9][A-Za-z0-9_.-]{0,57}")


class IdentityError(Exception):
    """A CSR, certificate or CA file that cannot be used; the message says why."""


def service_name(kind: str, name: str) -> str:
    """``kind:name``, the certificate (and MQTT user) name of a hub connection or an
    admin console; raises ValueError unless it is a legal service name."""
    return check_service_name(f"{kind}:{name}")


def is_service_name(name: str) -> bool:
    """Pure: whether ``name`` is in the service name space (never a device id)."""
    return _SERVICE_NAME_RE.fullmatch(name) is not None


def check_service_name(name: str, *, kinds: tuple[str, ...] = SERVICE_KINDS) -> str:
    """Return ``name`` unchanged; raise ValueError unless it is ``<kind>:NAME`` for one of
    ``kinds`` (NAME: letters, digits, '_', '.', '-'; at most 64 characters in all)."""
    kind = name.partition(":")[0]
    if not is_service_name(name) or kind not in kinds:
        wanted = " or ".join(f"'{k}:NAME'" for k in kinds)
        raise ValueError(
            f"{name[:80]!r} is not a service name: it must be {wanted} (NAME: letters, "
            "digits, '_', '.', '-'; 64 characters at most). The ':' keeps it apart from "
            "device ids, which can never hold one."
        )
    return name


def write_new_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 with O_EXCL: never widen permissions, never overwrite."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@dataclass(frozen=True)
class Issued:
    """A certificate the CA issued: PEM bytes, serial and expiry."""

    pem: bytes
    serial: int
    not_after: dt.datetime


class CertificateAuthority:
    """A CA kept in a directory: ``ca.key`` (0600) and ``ca.crt``."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, directory: Path):
        self._key = key
        self.cert = cert
        self.directory = directory

    @property
    def cert_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def load_or_create(
        cls, directory: Path, *, now: dt.datetime, validity_days: int = 3650
    ) -> CertificateAuthority:
        """Load the CA in ``directory``, creating it on first start."""
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            if key_path.stat().st_mode & 0o077:
                raise IdentityError(f"{key_path} is readable by others; chmod 600 it")
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise IdentityError(f"{key_path} is not an ECDSA key")
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()), directory)
        if key_path.exists() or cert_path.exists():
            raise IdentityError(f"{directory} holds half a CA (ca.key or ca.crt missing)")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(CA_COMMON_NAME))
            .issuer_name(_name(CA_COMMON_NAME))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=validity_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        write_new_private(key_path, _pem_key(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, directory)

    def _leaf(
        self,
        *,
        common_name: str,
        public_key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey,
        usage: x509.ObjectIdentifier,
        now: dt.datetime,
        validity_days: int,
        sans: Iterable[x509.GeneralName] = (),
    ) -> Issued:
        serial = x509.random_serial_number()
        not_after = now + dt.timedelta(days=validity_days)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
        )
        names = list(sans)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), serial, not_after)

    def issue_from_csr(
        self, csr_pem: bytes, *, device_id: str, now: dt.datetime, validity_days: int = 365
    ) -> Issued:
        """Issue a client certificate for ``device_id`` from the device's CSR.

        Raises IdentityError when the CSR is malformed, its signature does not verify,
        its key type is not allowed, or its common name is not ``device_id``.
        """
        protocols.validate_device_id(device_id)
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise IdentityError(f"CSR is not a PEM certificate request: {exc}") from None
        if not csr.is_signature_valid:
            raise IdentityError("CSR signature does not verify")
        public_key = csr.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(public_key.curve, ec.SECP256R1):
                raise IdentityError(f"CSR key curve {public_key.curve.name} is not P-256")
        elif not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise IdentityError("CSR key must be ECDSA P-256 or Ed25519")
        names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or names[0].value != device_id:
            got = ", ".join(str(n.value) for n in names) or "none"
            raise IdentityError(f"CSR common name ({got}) does not match device {device_id!r}")
        return self._leaf(
            common_name=device_id,
            public_key=public_key,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            now=now,
            validity_days=validity_days,
        )

    def issue_keypair(
        self, common_name: str, *, server: bool, now: dt.datetime, validity_days: int = 825
    ) -> tuple[bytes, Issued]:
        """A key made here (for the broker and the hub, which run beside the CA)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        if server:
            sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        issued = self._leaf(
            common_name=common_name,
            public_key=key.public_key(),
            usage=ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH,
            now=now,
            validity_days=validity_days,
            sans=sans,
        )
        return _pem_key(key), issued

    def crl(
        self, revoked: Iterable[tuple[int, dt.datetime]], *, now: dt.datetime, next_days: int = 7
    ) -> bytes:
        """A CRL (PEM) listing ``(serial, revoked_at)``; Mosquitto refuses those certificates."""
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=next_days))
        )
        for serial, revoked_at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(revoked_at)
                .build()
            )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def proven_certificate(
    ca: CertificateAuthority, *, certificate_pem: str, device_id: str, message: bytes, proof: str
) -> x509.Certificate:
    """The certificate a device presents with a signature over ``message`` by its key,
    after checking that the fleet CA issued it, that it names ``device_id``, and that
    ``proof`` (base64) verifies with its key: proof of possession, so no one but the
    holder of that key gets anything for it. Raises IdentityError saying which failed.
    Whether the certificate is still current (not revoked, not expired) is the
    caller's to check against its records.
    """
    import base64
    import binascii

    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
    except ValueError as exc:
        raise IdentityError(f"the presented certificate is unreadable: {exc}") from None
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise IdentityError("the presented certificate is not from this fleet's CA") from None
    names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise IdentityError(f"the presented certificate is not {device_id!r}'s")
    try:
        signature = base64.b64decode(proof, validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError("the proof is not base64") from None
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            raise IdentityError("the presented certificate's key is neither P-256 nor Ed25519")
    except InvalidSignature:
        raise IdentityError("the proof does not verify with the certificate's key") from None
    return cert


def client_identity(
    ca: CertificateAuthority,
    directory: Path,
    common_name: str,
    *,
    now: dt.datetime,
    renew_before_days: int = 30,
) -> tuple[Path, Path]:
    """``(cert, key)`` files for a hub-side MQTT client, issued by ``ca`` when missing or due.

    The hub runs beside its CA, so it makes its own client keys; the broker maps the
    certificate's common name to the MQTT username (and client id), which the ACL
    grants the whole device tree. Reissued ``renew_before_days`` before expiry.
    """
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{common_name}.crt", directory / f"{common_name}.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        fresh = cert.not_valid_after_utc - now > dt.timedelta(days=renew_before_days)
        if fresh and cert.issuer == ca.cert.subject:
            return cert_path, key_path
    key, issued = ca.issue_keypair(common_name, server=False, now=now)
    key_path.unlink(missing_ok=True)
    write_new_private(key_path, key)
    cert_path.write_bytes(issued.pem)
    return cert_path, key_path


TOKEN_PREFIX = "dl_"


def new_token() -> str:
    """A fresh secret for enrollment or API tokens (store only its hash).

    256 random bits, URL-safe, behind a fixed prefix: a secret that starts with
    ``-`` would be read as an option by every command line that takes it
    (``--token -Xn3...``), and the prefix lets secret scanners recognise a leak.
    """
    return TOKEN_PREFIX + secrets.token_urlsafe(32)
