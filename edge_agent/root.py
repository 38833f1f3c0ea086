"""The device's trust anchor: the fleet's ``root.json``, read once at start.

Rule: a root that cannot be read, or is not a valid self-signed root, stops
the start with a one-line reason (:class:`RootFileError`): a device must not
run with a trust anchor it cannot check. Used by the agent and by the
simulator's fleets alike; loads the verification stack only when called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from firmware_bundles.trust import TrustedRoot


class RootFileError(ValueError):
    """The root file cannot be read or is not a valid, self-signed root."""


def load_trusted_root(path: Path) -> TrustedRoot:
    """Read and check the trust anchor at ``path``; raises RootFileError saying why not."""
    from firmware_bundles.errors import BundleError
    from firmware_bundles.limits import DEFAULT_LIMITS
    from firmware_bundles.trust import TrustedRoot

    try:
        with open(path, "rb") as handle:
            data = handle.read(DEFAULT_LIMITS.max_metadata_bytes + 1)
    except OSError as exc:
        raise RootFileError(f"cannot read the trusted root {path}: {exc.strerror or exc}") from None
    try:
        return TrustedRoot.from_bytes(data)
    except BundleError as exc:
        raise RootFileError(
            f"the trusted root {path} is not usable: {type(exc).__name__}: {exc}"
        ) from None
