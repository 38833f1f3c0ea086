"""The fleet's root of trust as the hub holds it: the ``root.json`` the operator configured.

Rules:
- No path configured: :meth:`FleetRoot.current` raises :class:`NoFleetRoot`
  ("no fleet root configured"); the hub never accepts a bundle it cannot verify.
- The file is the provisioned trust anchor, as on a device: it must parse and
  be signed by its own root threshold (:meth:`TrustedRoot.from_bytes`).
  :meth:`current` also refuses a root that has expired at ``now``: that is the
  hub's configuration to fix, not the uploaded bundle's fault.
- The file is read again whenever it changes (inode, size, modification time),
  so pointing ``trust_root_path`` at ``DIR/root.json`` of the operator's key
  directory makes ``driftless keys add`` take effect without a restart. A file
  that has become unreadable or invalid is refused, never replaced by the last
  good copy: an operator who broke it must hear about it.
- Reads are at most ``Limits.max_metadata_bytes`` + 1 bytes; thread-safe.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from firmware_bundles.errors import BundleError, ExpiredMetadataError
from firmware_bundles.limits import DEFAULT_LIMITS, Limits
from firmware_bundles.trust import TrustedRoot
from hub.bundles.errors import NoFleetRoot

_StatKey = tuple[int, int, int, int]


class FleetRoot:
    """Loads and caches the fleet's trusted root from one file."""

    def __init__(self, path: Path | None, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self._path = path
        self._limits = limits
        self._lock = threading.Lock()
        self._cached: tuple[_StatKey, TrustedRoot] | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    def current(self, *, now: float, clock_skew_s: int) -> TrustedRoot:
        """The trusted root, unexpired at ``now``; raises NoFleetRoot (does file I/O).

        An expired fleet root is the hub's configuration problem, not the
        bundle's: the operator must publish a new root version.
        """
        trusted = self.load()
        try:
            trusted.check_not_expired(now, clock_skew_s)
        except ExpiredMetadataError as exc:
            raise NoFleetRoot(
                f"fleet root {self._path} cannot be used: {exc}; publish a new root version"
            ) from None
        return trusted

    def load(self) -> TrustedRoot:
        """The trusted root as the file says now, expired or not; raises NoFleetRoot."""
        if self._path is None:
            raise NoFleetRoot(
                "no fleet root configured: start the hub with --trust-root ROOT_JSON "
                "(trust_root_path), the root.json written by 'driftless keys init-root'"
            )
        with self._lock:
            try:
                with open(self._path, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
                    if self._cached is not None and self._cached[0] == key:
                        return self._cached[1]
                    data = handle.read(self._limits.max_metadata_bytes + 1)
            except OSError as exc:
                raise NoFleetRoot(
                    f"fleet root {self._path} is unreadable: {exc.strerror or exc}"
                ) from None
            try:
                trusted = TrustedRoot.from_bytes(data, limits=self._limits)
            except BundleError as exc:
                self._cached = None
                raise NoFleetRoot(
                    f"fleet root {self._path} is invalid: {type(exc).__name__}: {exc}"
                ) from None
            self._cached = (key, trusted)
            return trusted
