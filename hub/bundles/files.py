"""Bundle files on disk: ``<bundles_dir>/<sha256>.bundle``, content-addressed.

Rules:
- A stored file's name is the SHA-256 of its bytes; it is never rewritten in
  place, only created by rename and removed.
- An upload is written to ``<bundles_dir>/.upload-*.tmp`` (mode 0600, same
  filesystem) while it is counted and hashed; a byte past ``max_bytes`` raises
  :class:`BundleTooLarge` before it is written. Only :meth:`BundleFiles.place`
  (called by the store after verification) gives it its final name: fsync,
  ``os.replace``, fsync of the directory. :meth:`BundleUpload.discard` removes
  whatever was not placed, so a refused upload leaves nothing behind.
- Removal goes through a rename to ``.<sha256>.deleting.tmp`` first
  (:meth:`retire`), so the store can undo it if its transaction fails.
- Temporary files older than ``stale_after_s`` (a crash mid-upload) are swept
  by :meth:`prepare` at start-up; younger ones may belong to another hub
  process sharing the directory and are left alone.
- Everything here is blocking file I/O: async callers run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

from firmware_bundles.archive import HEADER_BYTES
from firmware_bundles.atomic import fsync_dir
from firmware_bundles.limits import DEFAULT_LIMITS
from hub.bundles.errors import BundleTooLarge
from hub.bundles.refs import is_sha256

BUNDLE_SUFFIX = ".bundle"
UPLOAD_PREFIX = ".upload-"
TEMP_SUFFIX = ".tmp"

MAX_BUNDLE_FILE_BYTES = (
    HEADER_BYTES + DEFAULT_LIMITS.max_metadata_bytes + DEFAULT_LIMITS.max_payload_bytes
)
"""The largest bundle file the format allows: header, largest manifest, largest payload."""


class BundleUpload:
    """One upload in progress: a temporary file that counts, hashes and limits what it gets."""

    def __init__(self, path: Path, handle: BinaryIO, max_bytes: int) -> None:
        self._path: Path | None = path
        self._handle: BinaryIO | None = handle
        self._max_bytes = max_bytes
        self._hash = hashlib.sha256()
        self.size = 0

    @property
    def path(self) -> Path:
        """The temporary file; raises RuntimeError once placed or discarded."""
        if self._path is None:
            raise RuntimeError("upload already placed or discarded")
        return self._path

    def write(self, data: bytes) -> None:
        """Append ``data``; raises BundleTooLarge (writing nothing of it) past ``max_bytes``."""
        if self._handle is None:
            raise RuntimeError("write after finish")
        if self.size + len(data) > self._max_bytes:
            raise BundleTooLarge(self._max_bytes)
        self._hash.update(data)
        self._handle.write(data)
        self.size += len(data)

    def finish(self) -> str:
        """Flush and fsync the file; returns the SHA-256 (hex) of everything written."""
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
        return self._hash.hexdigest()

    def move_to(self, target: Path) -> None:
        """Rename the finished file to ``target`` (replacing it); the caller fsyncs the dir."""
        if self._handle is not None:
            raise RuntimeError("move_to before finish")
        os.replace(self.path, target)
        self._path = None

    def discard(self) -> None:
        """Close and remove the temporary file unless it was placed; idempotent."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            self._path = None


class BundleFiles:
    """The store directory: stored bundles by SHA-256, and uploads in progress."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def prepare(self, *, now: float, stale_after_s: float) -> int:
        """Create the directory and remove temporary files older than ``stale_after_s``.

        Returns how many were removed.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o750)
        removed = 0
        for entry in self.directory.iterdir():
            if not (entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX)):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat().st_mtime >= stale_after_s:
                    entry.unlink()
                    removed += 1
        return removed

    def path(self, sha256: str) -> Path:
        """Where bundle ``sha256`` lives; raises ValueError unless it is 64 lowercase hex."""
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 in lowercase hex: {sha256[:80]!r}")
        return self.directory / f"{sha256}{BUNDLE_SUFFIX}"

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def begin_upload(self, *, max_bytes: int) -> BundleUpload:
        """A new temporary file for an upload of at most ``max_bytes``."""
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, suffix=TEMP_SUFFIX, dir=self.directory)
        return BundleUpload(Path(name), os.fdopen(fd, "wb"), max_bytes)

    def place(self, upload: BundleUpload, sha256: str) -> None:
        """Give a finished, verified upload its final name, durably."""
        upload.move_to(self.path(sha256))
        fsync_dir(self.directory)

    def retire(self, sha256: str) -> Path | None:
        """Move a stored file out of its name; returns where it went (None if it was missing)."""
        retired = self.directory / f".{sha256}.deleting{TEMP_SUFFIX}"
        try:
            os.replace(self.path(sha256), retired)
        except FileNotFoundError:
            return None
        return retired

    def restore(self, retired: Path, sha256: str) -> None:
        """Undo :meth:`retire`."""
        os.replace(retired, self.path(sha256))

    def remove_retired(self, retired: Path) -> None:
        """Delete a retired file for good, durably."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(retired)
        fsync_dir(self.directory)

    def remove(self, sha256: str) -> None:
        """Delete a stored file if present (undo of :meth:`place`)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(sha256))
        fsync_dir(self.directory)
