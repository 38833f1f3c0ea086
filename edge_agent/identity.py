"""The device's own identity: a key pair made on the device and a CSR for the hub's CA.

Rules:
- The private key is generated here, written 0600 with O_EXCL, and never
  sent anywhere; only the CSR (public key + device id, self-signed) leaves.
- ``cryptography`` is imported by the functions that need it (making keys and
  CSRs, signing, checking a certificate), not by this module: a connected,
  idle agent reads only its certificate's serial and dates
  (:func:`certificate_serial`, :mod:`plumbing.certinfo`) and does not pay
  ~8 MB resident for it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from plumbing.certinfo import read_pem_certificate

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec


def create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Make a P-256 key and write it to ``path`` (0600, never overwriting)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return key


def make_csr(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """A PEM CSR naming ``device_id``, signed by the device's own key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey | None:
    """The key stored at ``path``, or None when there is none.

    Raises ValueError (with the path and what to do) for a file that is not an
    unencrypted EC private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable private key ({exc}); move it away") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key; move it away and retry")
    return key


def load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The key at ``path``, made there first if there is none; raises ValueError as load_key."""
    key = load_key(path)
    return key if key is not None else create_key(path)


def certificate_serial(pem: bytes) -> str:
    """The serial of a PEM certificate as the hub records it (lowercase hex): births
    name the certificate their connection presented. Raises ValueError if unreadable.

    Read without ``cryptography`` (:mod:`plumbing.certinfo`): births happen while idle."""
    return read_pem_certificate(pem).serial_hex


def sign_proof(key_path: Path, message: bytes) -> str:
    """The base64 signature of ``message`` by the key at ``key_path`` (ECDSA P-256 with
    SHA-256): proof that this device holds its current key. Raises ValueError when
    there is no usable key there."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = load_key(key_path)
    if key is None:
        raise ValueError(f"{key_path} is missing: no current key to prove possession with")
    return base64.b64encode(key.sign(message, ec.ECDSA(hashes.SHA256()))).decode()


def public_key_der(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> bytes:
    """The SubjectPublicKeyInfo of ``key`` (its public half), to compare keys by."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    public = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_problem(
    cert: x509.Certificate, ca: x509.Certificate, device_id: str, key_der: bytes
) -> str | None:
    """Pure: why ``cert`` is not this device's own, or None when it is.

    Checked in this order: ``other_ca`` (not signed by ``ca``), ``other_device``
    (its common name is not exactly ``device_id``), ``other_key`` (not for the
    key whose SubjectPublicKeyInfo is ``key_der``). Enrollment, renewal and the
    simulator all take a certificate only when this says None.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "other_ca"
    names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        return "other_device"
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public_key_der(public) != key_der:
        return "other_key"
    return None
