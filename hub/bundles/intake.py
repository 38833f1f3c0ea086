"""Verification of an uploaded bundle file against the fleet root.

Rules:
- :func:`verify_upload` is the only way to get a :class:`VerifiedBundle`, and
  the store records nothing else. It runs :func:`firmware_bundles.archive.verify`
  (release threshold of the trusted root, root and manifest expiry at ``now``,
  then the payload streamed through SHA-256 in constant memory) before reading
  any field of the manifest.
- Every verification failure (a :class:`firmware_bundles.errors.BundleError`)
  becomes :class:`BundleRejected` with the one-line reason
  ``"<ErrorClass>: <message>"``, as ``driftless bundle verify`` prints it.
  Disk trouble (``OSError``) is not bad data and propagates as it is.
- Blocking: it reads the whole file. Async callers run it in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from firmware_bundles import archive
from firmware_bundles.errors import BundleError, SizeMismatchError
from firmware_bundles.limits import DEFAULT_LIMITS, Limits
from firmware_bundles.model import Manifest, decode_envelope
from firmware_bundles.trust import TrustedRoot, verify_role
from hub.bundles.errors import BundleRejected


@dataclass(frozen=True, slots=True)
class VerifiedBundle:
    """A bundle file that passed verification, and what the store records about it."""

    sha256: str
    """SHA-256 of the whole file, as hashed while it was received."""
    size: int
    manifest: Manifest
    manifest_object: dict[str, Any]
    """The signed manifest as a JSON object, decoded from the exact signed bytes."""
    payload_offset: int
    signer_keyids: tuple[str, ...]
    """Authorised release keys whose valid signatures met the threshold, sorted."""


def verify_upload(
    path: Path,
    *,
    sha256: str,
    size: int,
    trusted_root: TrustedRoot,
    now: float,
    clock_skew_s: int,
    limits: Limits = DEFAULT_LIMITS,
) -> VerifiedBundle:
    """The verified bundle at ``path`` (``sha256`` and ``size`` as received); raises BundleRejected.

    Also raises OSError for disk trouble.
    """
    try:
        manifest = archive.verify(path, trusted_root, now, clock_skew_s, limits=limits)
        # Verified above; read again only to report which keys signed and where the payload is.
        envelope = archive.read_signed_manifest(path, limits=limits)
        parsed = decode_envelope(envelope, limits=limits)
        signed = bytes(parsed.signed)
        signers = verify_role(signed, parsed.signatures, trusted_root.root, "release")
        payload_offset = archive.HEADER_BYTES + len(envelope)
        if payload_offset + manifest.payload.size != size:
            raise SizeMismatchError(
                f"file of {size} bytes does not hold a {manifest.payload.size}-byte payload "
                f"at offset {payload_offset} (changed while being verified?)"
            )
    except BundleError as exc:
        raise BundleRejected(f"{type(exc).__name__}: {exc}") from None
    return VerifiedBundle(
        sha256=sha256,
        size=size,
        manifest=manifest,
        manifest_object=msgspec.json.decode(signed),
        payload_offset=payload_offset,
        signer_keyids=tuple(sorted(signers)),
    )
