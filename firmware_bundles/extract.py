"""Safe extraction of a bundle payload (a tar.gz stream) into a new directory.

Rules (a payload that breaks one raises :class:`UnsafeArchiveError` or
:class:`ArchiveLimitError`, and the target is left exactly as it was):

- Everything is written into a fresh temporary directory beside the target;
  only when the whole stream has been read and checked is it renamed into
  place (one ``rename``), then the parent directory is fsynced. On any error
  the temporary directory is removed, so nothing lands outside it.
- The target must not exist yet (installs go into new, versioned directories).
- Entry names are relative: no absolute paths, no ``..`` component, no NUL,
  valid UTF-8, at most ``Limits.max_path_bytes``; a leading ``./`` is allowed.
  Each name appears once. No entry lies beneath a symlink or a file.
- Allowed types: regular files, directories, symbolic links. Refused: hard
  links, character and block devices, FIFOs, sparse files, anything else.
- A symlink's target must be relative with no ``..`` component, so it can only
  point down from its own directory, which is never itself reached through a
  link: no symlink, however chained, resolves outside the target.
- Files are created with ``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0644 or
  0755 (set-id and sticky bits and group/other write are dropped); directories
  are 0755; owners and times from the archive are ignored.
- Decompression bombs are measured while streaming, not taken from headers:
  the decompressed tar stream, the file content written and the entry count
  each have a limit, and extended headers (pax, GNU long names) are refused
  before they are read into memory when larger than ``max_tar_header_bytes``.
- The source stream is read to its end before the rename, so a stream that
  verifies a hash at its end (see ``archive.open_payload``) can still veto
  the install; when unpacking fails, the stream is still read to its end, so
  a corrupt payload is reported as the stream's HashMismatchError or
  SizeMismatchError rather than as a broken archive.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol, cast

from firmware_bundles.atomic import fsync_dir
from firmware_bundles.errors import ArchiveLimitError, FormatError, UnsafeArchiveError
from firmware_bundles.limits import DEFAULT_LIMITS, Limits

_EXTENDED_HEADER_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


@dataclass(frozen=True, slots=True)
class ExtractStats:
    """What one extraction created."""

    files: int
    directories: int
    symlinks: int
    bytes_written: int


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses an extended header before tarfile reads it into memory."""

    max_header_bytes = DEFAULT_LIMITS.max_tar_header_bytes

    def _proc_member(self, tarfile: tarfile.TarFile) -> Any:
        if self.type in _EXTENDED_HEADER_TYPES and self.size > self.max_header_bytes:
            raise ArchiveLimitError(
                f"extended tar header of {self.size} bytes exceeds the "
                f"{self.max_header_bytes}-byte limit"
            )
        return super()._proc_member(tarfile)  # type: ignore[misc]


class ByteReader(Protocol):
    """Anything with ``read(size) -> bytes`` that returns ``b""`` at its end."""

    def read(self, size: int = -1, /) -> bytes: ...


class _CountingReader:
    """Counts decompressed bytes as they are read; refuses past ``limit``."""

    def __init__(self, raw: ByteReader, limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._limit - self.count + 1:
            size = self._limit - self.count + 1
        data = self._raw.read(size)
        self.count += len(data)
        if self.count > self._limit:
            raise ArchiveLimitError(
                f"payload expands past the {self._limit}-byte limit on the decompressed tar stream"
            )
        return data

    def tell(self) -> int:
        return self.count


def _safe_name(name: str, what: str, limits: Limits) -> PurePosixPath:
    """Pure: a relative, normalised archive path; raises UnsafeArchiveError."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchiveError(f"{what} {name!r} is not valid UTF-8") from None
    if len(encoded) > limits.max_path_bytes:
        raise UnsafeArchiveError(f"{what} is longer than {limits.max_path_bytes} bytes")
    if "\x00" in name:
        raise UnsafeArchiveError(f"{what} {name!r} contains NUL")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"{what} {name!r} is an absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"{what} {name!r} has a '..' component")
    return PurePosixPath(*parts)


def _mkdir(path: Path) -> None:
    """A new directory with mode 0755 whatever the umask (it was just made: no link to follow)."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o755)


class _Extractor:
    """Writes checked entries beneath ``root``, tracking what each name already is."""

    def __init__(self, root: Path, limits: Limits) -> None:
        self.root = root
        self.limits = limits
        self.kinds: dict[PurePosixPath, str] = {}  # "dir", "implicit-dir", "file", "symlink"
        self.entries = 0
        self.files = 0
        self.symlinks = 0
        self.bytes_written = 0

    def _ensure_parents(self, rel: PurePosixPath) -> None:
        for parent in reversed(rel.parents):
            if parent == PurePosixPath("."):
                continue
            kind = self.kinds.get(parent)
            if kind is None:
                _mkdir(self.root / parent)
                self.kinds[parent] = "implicit-dir"
            elif kind not in ("dir", "implicit-dir"):
                raise UnsafeArchiveError(f"entry {str(rel)!r} lies beneath {kind} {str(parent)!r}")

    def _claim(self, rel: PurePosixPath, kind: str) -> None:
        existing = self.kinds.get(rel)
        if existing == "implicit-dir" and kind == "dir":
            self.kinds[rel] = "dir"
            return
        if existing is not None:
            raise UnsafeArchiveError(f"entry {str(rel)!r} appears more than once")
        self._ensure_parents(rel)
        self.kinds[rel] = kind

    def add(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.entries += 1
        if self.entries > self.limits.max_extract_files:
            raise ArchiveLimitError(
                f"payload has more than {self.limits.max_extract_files} entries"
            )
        rel = _safe_name(member.name, "entry", self.limits)
        if rel == PurePosixPath("."):
            if not member.isdir():
                raise UnsafeArchiveError("an entry other than a directory names the root")
            return
        if member.islnk():
            raise UnsafeArchiveError(f"entry {member.name!r} is a hard link; links are refused")
        if member.ischr() or member.isblk() or member.isfifo():
            raise UnsafeArchiveError(f"entry {member.name!r} is a device file or FIFO")
        if member.issparse():
            raise UnsafeArchiveError(f"entry {member.name!r} is a sparse file")
        if member.isdir():
            self._claim(rel, "dir")
            if not (self.root / rel).is_dir():
                _mkdir(self.root / rel)
        elif member.issym():
            self._add_symlink(rel, member)
        elif member.isreg():
            self._add_file(archive, rel, member)
        else:
            raise UnsafeArchiveError(f"entry {member.name!r} has unsupported type {member.type!r}")

    def _add_symlink(self, rel: PurePosixPath, member: tarfile.TarInfo) -> None:
        target = member.linkname
        if not target:
            raise UnsafeArchiveError(f"symlink {member.name!r} has an empty target")
        if target.startswith("/"):
            raise UnsafeArchiveError(f"symlink {member.name!r} points to absolute path {target!r}")
        _safe_name(target, f"target of symlink {member.name!r}", self.limits)
        self._claim(rel, "symlink")
        os.symlink(target, self.root / rel)
        self.symlinks += 1

    def _add_file(
        self, archive: tarfile.TarFile, rel: PurePosixPath, member: tarfile.TarInfo
    ) -> None:
        if self.bytes_written + member.size > self.limits.max_extract_bytes:
            raise ArchiveLimitError(
                f"payload expands past the {self.limits.max_extract_bytes}-byte content limit"
            )
        self._claim(rel, "file")
        source = archive.extractfile(member)
        if source is None:  # pragma: no cover - isreg() members always have data
            raise UnsafeArchiveError(f"entry {member.name!r} has no data")
        mode = 0o755 if member.mode & 0o111 else 0o644
        fd = os.open(self.root / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)  # the umask must not decide what a workload may read
            while chunk := source.read(self.limits.chunk_bytes):
                self.bytes_written += len(chunk)
                if self.bytes_written > self.limits.max_extract_bytes:
                    raise ArchiveLimitError(
                        f"payload expands past the {self.limits.max_extract_bytes}-byte "
                        "content limit"
                    )
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        self.files += 1

    def fsync_directories(self) -> None:
        directories = [rel for rel, kind in self.kinds.items() if kind.endswith("dir")]
        for rel in [*directories, PurePosixPath(".")]:
            fsync_dir(self.root / rel)

    def stats(self) -> ExtractStats:
        directories = sum(1 for kind in self.kinds.values() if kind.endswith("dir"))
        return ExtractStats(
            files=self.files,
            directories=directories,
            symlinks=self.symlinks,
            bytes_written=self.bytes_written,
        )


def _drain(stream: ByteReader, limits: Limits) -> None:
    while stream.read(limits.chunk_bytes):
        pass


def _unpack_archive(stream: ByteReader, extractor: _Extractor, limits: Limits) -> None:
    bounded = type(
        "_Bounded", (_BoundedTarInfo,), {"max_header_bytes": limits.max_tar_header_bytes}
    )
    try:
        # Reading forward, GzipFile never seeks its source, so any ByteReader will do.
        with gzip.GzipFile(fileobj=cast(IO[bytes], stream), mode="rb") as decompressed:
            counting = _CountingReader(decompressed, limits.max_tar_stream_bytes)
            with tarfile.open(
                fileobj=cast(IO[bytes], counting),
                mode="r|",
                tarinfo=bounded,
                encoding="utf-8",
                errors="surrogateescape",
            ) as archive:
                while (member := archive.next()) is not None:
                    extractor.add(archive, member)
                    cast(Any, archive).members.clear()  # stream mode keeps every header
            while counting.read(limits.chunk_bytes):
                pass
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise FormatError(f"payload is not a valid tar.gz archive: {exc}") from None
    except RecursionError:
        raise UnsafeArchiveError("payload chains too many extended tar headers") from None


def _unpack(stream: ByteReader, root: Path, limits: Limits) -> ExtractStats:
    extractor = _Extractor(root, limits)
    try:
        _unpack_archive(stream, extractor, limits)
    except (FormatError, UnsafeArchiveError):
        # Bytes that fail to unpack may simply be corrupt. A verifying stream knows
        # for sure at its end (HashMismatchError, SizeMismatchError): prefer its word.
        _drain(stream, limits)
        raise
    _drain(stream, limits)
    extractor.fsync_directories()
    return extractor.stats()


def extract(stream: ByteReader, target: Path, *, limits: Limits = DEFAULT_LIMITS) -> ExtractStats:
    """Unpack the tar.gz ``stream`` into the new directory ``target``, all or nothing.

    Raises UnsafeArchiveError (ArchiveLimitError for bombs), FormatError for a
    stream that is not tar.gz, whatever ``stream`` raises (a verifying stream's
    HashMismatchError or SizeMismatchError), FileExistsError if ``target``
    exists, and OSError for disk trouble. On any error ``target`` does not exist
    and no temporary directory is left behind.
    """
    target = Path(target)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"extraction target {target} already exists")
    scratch = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".extract.tmp", dir=target.parent)
    )
    try:
        stats = _unpack(stream, scratch, limits)
        os.chmod(scratch, 0o755)
        os.rename(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    return stats
