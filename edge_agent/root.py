"""The device's trust anchor: the fleet's ``root.json``, read once at start.

Rules:
- A root that cannot be read, or is not a valid self-signed root, stops the
  start with a one-line reason (:class:`RootFileError`): a device must not run
  with a trust anchor it cannot check.
- Checking the self-signature needs ``cryptography`` (~8 MB resident for the
  life of the process). So a root whose exact bytes were verified before is not
  verified again: its SHA-256 is kept beside it (``root.json.verified``,
  :func:`remember_verified`), and a root whose digest matches it is only
  parsed (structure, canonical form and limits checked as always). This
  weakens nothing: the signature check is deterministic over those bytes, and
  whoever can write the marker can write a self-signed root of their own.
  Any other root is verified in full, as before.
- The marker is written by enrollment, which verified the root it stores, and
  here after a full verification of the root in an enrolled data directory
  (``DATA_DIR/root.json`` beside ``DATA_DIR/identity/enrollment.json``), never
  beside a root the operator pointed ``--root`` at elsewhere.
- Used by the agent and by the simulator's fleets alike; loads the
  verification stack only when it verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from firmware_bundles.trust import TrustedRoot

MARKER_SUFFIX = ".verified"


class RootFileError(ValueError):
    """The root file cannot be read or is not a valid, self-signed root."""


def marker_path(path: Path) -> Path:
    """Where the digest of the last verified root at ``path`` is kept."""
    return path.with_name(path.name + MARKER_SUFFIX)


def _marker_text(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}\n"


def verified_before(path: Path, data: bytes) -> bool:
    """Whether ``data`` (the bytes read from ``path``) is the root verified there last."""
    try:
        return marker_path(path).read_text() == _marker_text(data)
    except (OSError, UnicodeDecodeError):
        return False


def remember_verified(path: Path, data: bytes) -> None:
    """Record that the root ``data`` at ``path`` passed its full verification; raises OSError."""
    from edge_agent.store import atomic_write_bytes

    atomic_write_bytes(marker_path(path), _marker_text(data).encode())


def _in_enrolled_data_dir(path: Path) -> bool:
    from edge_agent.enroll import Identity

    identity = Identity(path.parent)
    return identity.root == path and identity.record.exists()


def load_trusted_root(path: Path) -> TrustedRoot:
    """Read and check the trust anchor at ``path``; raises RootFileError saying why not."""
    from firmware_bundles.errors import BundleError
    from firmware_bundles.limits import DEFAULT_LIMITS
    from firmware_bundles.model import RootMetadata, decode_envelope, decode_signed
    from firmware_bundles.trust import TrustedRoot

    try:
        with open(path, "rb") as handle:
            data = handle.read(DEFAULT_LIMITS.max_metadata_bytes + 1)
    except OSError as exc:
        raise RootFileError(f"cannot read the trusted root {path}: {exc.strerror or exc}") from None
    try:
        if verified_before(path, data):
            # These exact bytes passed TrustedRoot.from_bytes here before: parse, don't verify.
            parsed = decode_envelope(data, limits=DEFAULT_LIMITS)
            root = decode_signed(bytes(parsed.signed), RootMetadata)
            return TrustedRoot(root, data, DEFAULT_LIMITS)
        trusted = TrustedRoot.from_bytes(data)
    except BundleError as exc:
        raise RootFileError(
            f"the trusted root {path} is not usable: {type(exc).__name__}: {exc}"
        ) from None
    if _in_enrolled_data_dir(path):
        with contextlib.suppress(OSError):  # a read-only data dir: verify again next time
            remember_verified(path, data)
    return trusted
