"""The device's bundles on disk: a content-addressed cache, installed versions, installs.

Layout under the agent's data directory::

    bundles/<sha256>.bundle            verified bundle files, named by their SHA-256
    bundles/partial/<sha256>.part      downloads in progress (the temporary area)
    bundles/security-versions.json     highest security version installed, per bundle name
    workloads/<name>/<version>/        an unpacked bundle (a new directory per version)
    workloads/<name>/.<version>.payload   the payload SHA-256 that directory came from
    workloads/<name>/current           symlink -> <version>, switched atomically

Rules:
- A file gets its cache name only after the whole file hashed to that name and
  :func:`firmware_bundles.archive.verify` accepted it (:meth:`BundleCache.commit`:
  fsync, rename, fsync of the directory). Until then it lives in ``partial/``,
  which is also where a refused download is deleted from: nothing of a bad
  bundle ever exists outside ``partial/``.
- The cache has a byte budget for files and partial downloads together.
  :meth:`BundleCache.make_room` evicts whatever no current desired state
  references (the document being fetched and the one applied), oldest first,
  and refuses when that is not enough.
- Security versions only grow: :meth:`SecurityVersions.raise_to` keeps the
  maximum and writes the file atomically *before* a pointer switches to the
  new version, so no crash lets an older security version in afterwards.
- Light to import; the verification stack (cryptography) loads only when a
  bundle is installed.
- Installs never touch a running version: the payload is unpacked into a new
  ``<version>`` directory (``archive.unpack``: safe extraction into a
  temporary directory renamed into place only when the payload re-hashed
  correctly), then ``current`` is replaced by a rename of a new symlink.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from edge_agent.plan import WorkloadSpec
from edge_agent.store import atomic_write_bytes
from firmware_bundles.atomic import fsync_dir
from protocols.bundles import is_sha256

if TYPE_CHECKING:
    from firmware_bundles.model import Manifest

log = logging.getLogger("driftless.agent.bundles")

BUNDLE_SUFFIX = ".bundle"
PARTIAL_SUFFIX = ".part"
CURRENT = "current"


class CacheFull(Exception):
    """The budget cannot hold a bundle even after evicting everything unreferenced."""


class BundleCache:
    """``<data>/bundles``: verified files by SHA-256, and partial downloads."""

    def __init__(self, data_dir: Path, *, max_bytes: int) -> None:
        self.directory = Path(data_dir) / "bundles"
        self.partial_dir = self.directory / "partial"
        self.max_bytes = max_bytes

    def prepare(self) -> None:
        self.partial_dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 in lowercase hex: {sha256[:80]!r}")
        return self.directory / f"{sha256}{BUNDLE_SUFFIX}"

    def partial_path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 in lowercase hex: {sha256[:80]!r}")
        return self.partial_dir / f"{sha256}{PARTIAL_SUFFIX}"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def commit(self, sha256: str) -> Path:
        """Give a complete, verified partial file its cache name, durably."""
        partial = self.partial_path(sha256)
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        target = self.path(sha256)
        os.replace(partial, target)
        fsync_dir(self.directory)
        fsync_dir(self.partial_dir)
        return target

    def discard_partial(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial_path(sha256))

    def entries(self) -> list[tuple[str, Path, int, float]]:
        """Every cached and partial file: (sha256, path, bytes, mtime)."""
        found: list[tuple[str, Path, int, float]] = []
        for directory, suffix in (
            (self.directory, BUNDLE_SUFFIX),
            (self.partial_dir, PARTIAL_SUFFIX),
        ):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(directory):
                    sha = entry.name.removesuffix(suffix)
                    if entry.name.endswith(suffix) and is_sha256(sha) and entry.is_file():
                        info = entry.stat()
                        found.append((sha, Path(entry.path), info.st_size, info.st_mtime))
        return found

    def usage_bytes(self) -> int:
        return sum(size for _, _, size, _ in self.entries())

    def make_room(self, need_bytes: int, keep: Iterable[str]) -> list[str]:
        """Evict unreferenced files (oldest first) until ``need_bytes`` more fit the budget.

        ``keep`` are the bundles a current desired state references; their files
        and partials are never evicted. Returns the evicted paths' names; raises
        CacheFull when even that is not enough.
        """
        kept = set(keep)
        entries = self.entries()
        usage = sum(size for _, _, size, _ in entries)
        evicted: list[str] = []
        for sha, path, size, _ in sorted(entries, key=lambda e: e[3]):
            if usage + need_bytes <= self.max_bytes:
                break
            if sha in kept:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            usage -= size
            evicted.append(path.name)
            log.info("bundle evicted from the cache", extra={"file": path.name, "bytes": size})
        if usage + need_bytes > self.max_bytes:
            raise CacheFull(
                f"bundle cache budget of {self.max_bytes} bytes cannot hold {need_bytes} more "
                f"bytes ({usage} bytes held by bundles current desired state references)"
            )
        return evicted

    def evict_unreferenced(self, keep: Iterable[str]) -> list[str]:
        """Remove every cached or partial file not in ``keep``."""
        kept = set(keep)
        evicted = []
        for sha, path, _, _ in self.entries():
            if sha not in kept:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                evicted.append(path.name)
        return evicted


class _SecurityFile(msgspec.Struct):
    names: dict[str, int] = {}


class SecurityVersions:
    """``bundles/security-versions.json``: the highest security version installed per name."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "bundles" / "security-versions.json"

    def load(self) -> dict[str, int]:
        """The recorded maxima; a missing file is an empty record.

        An unreadable file raises ValueError: forgetting it would re-open the
        door to rollbacks, so the operator must look at it.
        """
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return dict(msgspec.json.decode(data, type=_SecurityFile).names)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"{self.path} is unreadable ({exc}); refusing to guess") from None

    def raise_to(self, versions: Mapping[str, int]) -> dict[str, int]:
        """Record ``versions`` where they are higher; returns the new record."""
        current = self.load()
        merged = dict(current)
        for name, version in versions.items():
            merged[name] = max(version, merged.get(name, version))
        if merged != current:
            atomic_write_bytes(self.path, msgspec.json.encode(_SecurityFile(names=merged)))
        return merged


class InstallError(Exception):
    """A verified bundle that could not be installed into its workload directory."""


@dataclass(frozen=True)
class Prepared:
    """A workload version unpacked and ready for its pointer switch."""

    spec: WorkloadSpec
    manifest: Manifest
    directory: Path


class Workloads:
    """``<data>/workloads``: versioned directories and their ``current`` pointers."""

    def __init__(self, data_dir: Path) -> None:
        self.directory = Path(data_dir) / "workloads"

    def version_dir(self, name: str, version: str) -> Path:
        if version == CURRENT:
            raise InstallError(f"bundle version {version!r} collides with the pointer name")
        return self.directory / name / version

    def current(self, name: str) -> str | None:
        """The version ``current`` points to, if any."""
        try:
            return os.readlink(self.directory / name / CURRENT)
        except FileNotFoundError:
            return None

    def prepare(self, spec: WorkloadSpec, manifest: Manifest, bundle_path: Path) -> Prepared:
        """Unpack ``bundle_path`` into ``<name>/<version>/`` unless that version is there.

        ``manifest`` must come from verifying this file's signed manifest. An
        existing directory is reused only if it came from the same payload.
        Raises InstallError, the ``BundleError`` of the extraction, OSError.
        """
        target = self.version_dir(spec.name, manifest.version)
        marker = target.parent / f".{manifest.version}.payload"
        if target.is_dir():
            try:
                recorded = marker.read_text().strip()
            except FileNotFoundError:
                recorded = None  # a crash between the unpack and the marker
            if recorded is not None and recorded != manifest.payload.sha256:
                raise InstallError(
                    f"{spec.name} version {manifest.version} is already installed from another "
                    f"payload ({recorded[:16]}…); a new payload needs a new version"
                )
        else:
            from firmware_bundles import archive  # the verification stack, only when installing

            target.parent.mkdir(parents=True, exist_ok=True)
            archive.unpack(bundle_path, manifest, target)
        atomic_write_bytes(marker, manifest.payload.sha256.encode() + b"\n")
        return Prepared(spec, manifest, target)

    def switch(self, prepared: Prepared) -> None:
        """Point ``<name>/current`` at the prepared version: a new symlink renamed over it."""
        self.point(prepared.spec.name, prepared.directory.name)

    def point(self, name: str, version: str | None) -> None:
        """Point ``<name>/current`` at ``version`` atomically (None: remove the pointer)."""
        parent = self.directory / name
        link = parent / CURRENT
        if self.current(name) == version:
            return
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
            fsync_dir(parent)
            return
        tmp = parent / f".{CURRENT}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(version, tmp)
        os.replace(tmp, link)
        fsync_dir(parent)
