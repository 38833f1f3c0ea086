"""Ed25519 signing keys and their private key files.

Rules:
- A key id is the SHA-256 (hex) of the raw 32-byte public key
  (:func:`firmware_bundles.model.key_id`).
- A private key file is PEM (PKCS#8), optionally encrypted with a passphrase
  (the best encryption ``cryptography`` offers). It is created with
  ``O_CREAT | O_EXCL`` and mode 0600 in the same call, so it is never readable
  by others, not even for an instant; an existing file is never overwritten.
  It is durable when the call returns: the file and then its directory are fsynced.
- Loading refuses a key file that group or others may read or write (as ssh
  does), and says clearly whether a passphrase was missing or wrong.
- Signing is pure (Ed25519 is deterministic); only the two file functions do I/O.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware_bundles import canonical
from firmware_bundles.atomic import fsync_dir
from firmware_bundles.errors import KeyFileError, PassphraseError
from firmware_bundles.limits import DEFAULT_LIMITS, Limits
from firmware_bundles.model import KeyInfo, Signature, decode_envelope, encode_envelope, key_id

MAX_KEY_FILE_BYTES = 16 * 1024
KEY_FILE_MODE = 0o600


class SigningKey:
    """An Ed25519 private key with its key id; signs bytes into :class:`Signature`."""

    __slots__ = ("_private", "keyid", "public_hex")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_hex = raw.hex()
        self.keyid = key_id(raw)

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the operating system's random source."""
        return cls(Ed25519PrivateKey.generate())

    def key_info(self) -> KeyInfo:
        """Pure: the public half, as root metadata lists it."""
        return KeyInfo(keytype="ed25519", public=self.public_hex)

    def sign(self, data: bytes) -> Signature:
        """Pure: a signature over exactly ``data``."""
        return Signature(keyid=self.keyid, sig=self._private.sign(data).hex())

    def private_pem(self, passphrase: bytes | None) -> bytes:
        """Pure: the PKCS#8 PEM encoding, encrypted when ``passphrase`` is given."""
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase)
            if passphrase
            else serialization.NoEncryption()
        )
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
        )

    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid[:16]}…)"


def verify_signature(info: KeyInfo, signature_hex: str, data: bytes) -> bool:
    """Pure: whether ``signature_hex`` is a valid Ed25519 signature by ``info`` over ``data``."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(info.public))
        public.verify(bytes.fromhex(signature_hex), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def write_private_key(path: Path, key: SigningKey, passphrase: bytes | None = None) -> None:
    """Create ``path`` holding ``key`` with mode 0600; raises KeyFileError if it exists.

    The file is created and its mode set in one ``open`` (``O_CREAT | O_EXCL``),
    written, and fsynced, then its directory is fsynced: a key survives a power
    cut once this returns (a root naming it may be published next). On any
    failure the partial file is removed.
    """
    data = key.private_pem(passphrase)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, KEY_FILE_MODE)
    except FileExistsError:
        raise KeyFileError(f"key file {path} already exists; refusing to overwrite it") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def load_private_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Read an Ed25519 private key file; raises KeyFileError or PassphraseError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyFileError(f"cannot open key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"key file {path} has mode {mode:04o}; it must not be accessible to group "
                "or others (chmod 600)"
            )
        data = handle.read(MAX_KEY_FILE_BYTES + 1)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes")
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted and not passphrase:
        raise PassphraseError(f"key file {path} is encrypted and no passphrase was given")
    try:
        private = serialization.load_pem_private_key(
            data, password=passphrase if encrypted else None
        )
    except ValueError:
        if encrypted:
            raise PassphraseError(f"wrong passphrase for key file {path}") from None
        raise KeyFileError(f"key file {path} is not a PEM private key") from None
    except (TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"key file {path} cannot be loaded: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"key file {path} holds a {type(private).__name__}, not Ed25519")
    return SigningKey(private)


def sign_document(value: object, keys: Sequence[SigningKey]) -> bytes:
    """Pure: the envelope of ``value`` in canonical form, signed by each of ``keys``.

    ``value`` is a metadata Struct (``RootMetadata``, ``Manifest``) or any
    JSON-like value the hub signs; raises FormatError if it has no canonical form.
    """
    signed = canonical.encode(value)
    return encode_envelope(signed, [key.sign(signed) for key in keys])


def sign_bytes(signed: bytes, keys: Sequence[SigningKey]) -> bytes:
    """Pure: the envelope of exactly ``signed`` (a JSON object, not re-encoded), signed by ``keys``.

    The counterpart of :func:`firmware_bundles.trust.verify_signed_bytes`.
    """
    if not signed.startswith(b"{"):
        raise ValueError("the signed part of an envelope must be a JSON object")
    return encode_envelope(signed, [key.sign(signed) for key in keys])


def add_signatures(
    envelope: bytes, keys: Sequence[SigningKey], *, limits: Limits = DEFAULT_LIMITS
) -> bytes:
    """Pure: ``envelope`` with signatures by ``keys`` added (a key that signed is re-signed).

    The signed part must already be canonical; raises FormatError otherwise.
    Existing signatures are kept as they are, valid or not: verifiers judge them.
    """
    parsed = decode_envelope(envelope, limits=limits)
    signed = bytes(parsed.signed)
    canonical.check(signed)
    return encode_envelope(signed, [*parsed.signatures, *(key.sign(signed) for key in keys)])
