"""The bundle file: one file holding the signed manifest and the payload.

Layout (all integers big-endian; the normative text is ``docs/bundles.md``)::

    offset 0   17 bytes  magic  b"DRIFTLESS-BUNDLE\\n"
    offset 17   4 bytes  format version (uint32) = 1
    offset 21   4 bytes  manifest length N (uint32), at most Limits.max_metadata_bytes
    offset 25   N bytes  the signed manifest envelope (canonical JSON)
    offset 25+N          the payload: a tar.gz, exactly manifest.payload.size bytes, to EOF

Rules:
- :func:`verify` checks the manifest's signatures (release threshold of the
  trusted root) and expiry *first*, then streams the payload in
  ``Limits.chunk_bytes`` chunks through a :class:`PayloadVerifier`: constant
  memory, and a byte past the declared size fails at once.
- :func:`build` packs a source directory deterministically (sorted entries,
  zeroed owners and times, modes 0644/0755, gzip without name or time), hashing
  while it writes, so the same tree always gives the same payload hash.
- Every file this module writes appears atomically: it is written to a
  temporary file in the same directory, fsynced, then ``os.replace``-d over the
  target, and the directory is fsynced. :func:`sign` re-checks the payload
  against the manifest while it copies, so no one signs bytes they did not get.
- :func:`inspect` reads without verifying and says so; never act on it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import stat
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

import msgspec

from firmware_bundles import canonical
from firmware_bundles.atomic import atomic_output
from firmware_bundles.errors import (
    BundleError,
    FormatError,
    HashMismatchError,
    SizeMismatchError,
    SourceError,
)
from firmware_bundles.extract import ByteReader, ExtractStats, extract
from firmware_bundles.keys import SigningKey, add_signatures
from firmware_bundles.limits import DEFAULT_LIMITS, Limits
from firmware_bundles.model import (
    Kind,
    Manifest,
    PayloadInfo,
    RunSpec,
    Targets,
    decode_envelope,
    decode_signed,
    encode_envelope,
)
from firmware_bundles.trust import TrustedRoot, verify_manifest

MAGIC = b"DRIFTLESS-BUNDLE\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct(">17sII")
HEADER_BYTES = _HEADER.size


class PayloadVerifier:
    """Checks a payload streamed in pieces against the manifest's size and SHA-256.

    Sans-I/O: ``feed`` each piece as it arrives (from a file, an MQTT chunk, an
    HTTP range), then ``finish``. ``feed`` raises SizeMismatchError as soon as
    a byte lies past the declared size, before hashing it; ``finish`` raises
    SizeMismatchError if bytes are missing and HashMismatchError if the hash
    differs. Nothing fed may be trusted until ``finish`` returns.
    """

    __slots__ = ("_expected", "_failure", "_finished", "_hash", "received")

    def __init__(self, expected: PayloadInfo) -> None:
        self._expected = expected
        self._hash = hashlib.sha256()
        self._finished = False
        self._failure: BundleError | None = None
        self.received = 0

    @property
    def remaining(self) -> int:
        """How many bytes are still expected."""
        return self._expected.size - self.received

    def feed(self, data: bytes) -> None:
        if self._finished:
            raise RuntimeError("PayloadVerifier.feed after finish")
        if len(data) > self.remaining:
            raise SizeMismatchError(
                f"payload runs past its declared size of {self._expected.size} bytes"
            )
        self._hash.update(data)
        self.received += len(data)

    def finish(self) -> None:
        """Raise if the payload is incomplete or differs; again on every later call."""
        if not self._finished:
            self._finished = True
            digest = self._hash.hexdigest()
            if self.received != self._expected.size:
                self._failure = SizeMismatchError(
                    f"payload truncated: {self.received} of {self._expected.size} bytes"
                )
            elif digest != self._expected.sha256:
                self._failure = HashMismatchError(
                    f"payload SHA-256 {digest[:16]}… differs from the manifest's "
                    f"{self._expected.sha256[:16]}…"
                )
        if self._failure is not None:
            raise self._failure


class _VerifyingReader:
    """A read-only stream that feeds a PayloadVerifier and finishes it at EOF."""

    def __init__(self, raw: BinaryIO, expected: PayloadInfo) -> None:
        self._raw = raw
        self._verifier = PayloadVerifier(expected)

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        if data:
            self._verifier.feed(data)
        else:
            self._verifier.finish()
        return data


@dataclass(frozen=True, slots=True)
class BundleInfo:
    """What a bundle file says about itself, NOT verified: display only."""

    format_version: int
    manifest_bytes: int
    payload_offset: int
    payload_bytes: int
    keyids: list[str]
    manifest: Manifest


def _read_exactly(handle: BinaryIO, size: int, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise FormatError(f"bundle truncated in the {what}: {len(data)} of {size} bytes")
    return data


def _read_head(handle: BinaryIO, limits: Limits) -> tuple[int, bytes]:
    """The format version and the manifest envelope bytes; raises FormatError."""
    magic, version, length = _HEADER.unpack(_read_exactly(handle, HEADER_BYTES, "header"))
    if magic != MAGIC:
        raise FormatError("not a Driftless bundle (bad magic)")
    if version != FORMAT_VERSION:
        raise FormatError(f"bundle format version {version} is not {FORMAT_VERSION}")
    if length > limits.max_metadata_bytes:
        raise FormatError(
            f"manifest of {length} bytes exceeds the {limits.max_metadata_bytes}-byte limit"
        )
    return version, _read_exactly(handle, length, "manifest")


def _head(envelope: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, len(envelope)) + envelope


class _Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...
    def flush(self) -> None: ...


class _HashingWriter:
    """Writes through to ``raw`` while hashing and counting; refuses past ``limit``."""

    def __init__(self, raw: IO[bytes], limit: int) -> None:
        self._raw = raw
        self._limit = limit
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self._limit:
            raise SourceError(f"payload exceeds the {self._limit}-byte limit")
        self.hash.update(data)
        self._raw.write(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()


def _check_link_target(rel: str, target: str) -> None:
    parts = target.split("/")
    if not target or target.startswith("/") or ".." in parts:
        raise SourceError(
            f"symlink {rel} -> {target} must be relative without '..' "
            "(the extractor refuses anything else)"
        )


def _walk(src: Path, rel: str = "") -> Iterator[tuple[str, os.stat_result, Path]]:
    """Every entry beneath ``src`` in sorted order, as (relative posix name, lstat, path)."""
    with os.scandir(src / rel if rel else src) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        name = f"{rel}/{entry.name}" if rel else entry.name
        info = entry.stat(follow_symlinks=False)
        yield name, info, Path(entry.path)
        if stat.S_ISDIR(info.st_mode):
            yield from _walk(src, name)


def _pack(src: Path, sink: _Writer, limits: Limits) -> None:
    """Write a deterministic tar.gz of ``src`` to ``sink``; raises SourceError."""
    with (
        gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=sink, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar,
    ):
        for name, info, path in _walk(src):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise SourceError(f"file name {name!r} is not valid UTF-8") from None
            if len(name.encode("utf-8")) > limits.max_path_bytes:
                raise SourceError(f"path {name} is longer than {limits.max_path_bytes} bytes")
            entry = tarfile.TarInfo(name)
            entry.uid = entry.gid = 0
            entry.uname = entry.gname = ""
            entry.mtime = 0
            if stat.S_ISDIR(info.st_mode):
                entry.type = tarfile.DIRTYPE
                entry.mode = 0o755
                tar.addfile(entry)
            elif stat.S_ISLNK(info.st_mode):
                target = os.readlink(path)
                _check_link_target(name, target)
                entry.type = tarfile.SYMTYPE
                entry.linkname = target
                entry.mode = 0o777
                tar.addfile(entry)
            elif stat.S_ISREG(info.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as handle:
                    entry.type = tarfile.REGTYPE
                    entry.size = os.fstat(handle.fileno()).st_size
                    entry.mode = 0o755 if info.st_mode & 0o111 else 0o644
                    tar.addfile(entry, handle)
            else:
                raise SourceError(f"{name} is a device, FIFO or socket; bundles hold none")


def build(
    src_dir: Path,
    *,
    name: str,
    version: str,
    security_version: int,
    kind: Kind,
    architectures: list[str],
    created: int,
    expires: int,
    out: Path,
    min_agent_version: str = "0",
    run: RunSpec | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Manifest:
    """Pack ``src_dir`` into an unsigned bundle at ``out``; returns its manifest.

    Streams in constant memory: the payload goes to a temporary file while it
    is hashed, then the header, manifest and payload are written to ``out``
    atomically. Raises ValueError for manifest fields that break the format,
    SourceError for a tree that cannot be packed, OSError for disk trouble.
    """
    src_dir = Path(src_dir)
    out = Path(out)
    if not src_dir.is_dir():
        raise SourceError(f"source {src_dir} is not a directory")
    if out.parent.resolve().is_relative_to(src_dir.resolve()):
        raise ValueError(f"output {out} must not be inside the source directory {src_dir}")
    draft = Manifest(
        name=name,
        version=version,
        security_version=security_version,
        kind=kind,
        targets=Targets(architectures=architectures, min_agent_version=min_agent_version),
        run=run,
        payload=PayloadInfo(sha256="0" * 64, size=0),
        created=created,
        expires=expires,
    )
    try:
        decode_signed(canonical.encode(draft), Manifest)
    except FormatError as exc:
        raise ValueError(f"invalid manifest: {exc}") from None
    fd, payload_name = tempfile.mkstemp(
        prefix=f".{out.name}.", suffix=".payload.tmp", dir=out.parent
    )
    try:
        with os.fdopen(fd, "w+b") as payload:
            writer = _HashingWriter(payload, limits.max_payload_bytes)
            _pack(src_dir, writer, limits)
            payload.flush()
            manifest = msgspec.structs.replace(
                draft, payload=PayloadInfo(sha256=writer.hash.hexdigest(), size=writer.size)
            )
            envelope = encode_envelope(canonical.encode(manifest), [])
            payload.seek(0)
            with atomic_output(out) as handle:
                handle.write(_head(envelope))
                while chunk := payload.read(limits.chunk_bytes):
                    handle.write(chunk)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(payload_name)
    return manifest


def sign(bundle_path: Path, key: SigningKey, *, limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Add ``key``'s signature to the bundle's manifest, rewriting the file atomically.

    The payload is checked against the manifest while it is copied; on a
    mismatch the bundle is left untouched. Raises FormatError,
    HashMismatchError, SizeMismatchError, OSError.
    """
    bundle_path = Path(bundle_path)
    with open(bundle_path, "rb") as source:
        _, envelope = _read_head(source, limits)
        manifest = decode_signed(bytes(decode_envelope(envelope, limits=limits).signed), Manifest)
        signed_envelope = add_signatures(envelope, [key], limits=limits)
        with atomic_output(bundle_path) as handle:
            handle.write(_head(signed_envelope))
            verifier = PayloadVerifier(manifest.payload)
            while chunk := source.read(limits.chunk_bytes):
                verifier.feed(chunk)
                handle.write(chunk)
            verifier.finish()
    return manifest


def inspect(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> BundleInfo:
    """Read a bundle's header and manifest WITHOUT verifying anything; raises FormatError."""
    with open(path, "rb") as handle:
        version, envelope = _read_head(handle, limits)
        size = os.fstat(handle.fileno()).st_size
    parsed = decode_envelope(envelope, limits=limits)
    manifest = decode_signed(bytes(parsed.signed), Manifest)
    return BundleInfo(
        format_version=version,
        manifest_bytes=len(envelope),
        payload_offset=HEADER_BYTES + len(envelope),
        payload_bytes=size - HEADER_BYTES - len(envelope),
        keyids=[signature.keyid for signature in parsed.signatures],
        manifest=manifest,
    )


def read_signed_manifest(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The manifest envelope bytes of a bundle file (unverified); raises FormatError."""
    with open(path, "rb") as handle:
        return _read_head(handle, limits)[1]


def verify(
    path: Path,
    trusted_root: TrustedRoot,
    now: float,
    clock_skew_s: int | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> Manifest:
    """The bundle's manifest, once its signatures, expiry, payload size and hash all check out.

    Signatures first (nothing of the manifest is read before), then the payload
    streamed in constant memory. Raises ThresholdNotMetError,
    ExpiredMetadataError, FormatError, SizeMismatchError, HashMismatchError.
    """
    with open(path, "rb") as handle:
        _, envelope = _read_head(handle, limits)
        manifest = verify_manifest(envelope, trusted_root, now, clock_skew_s, limits=limits)
        verifier = PayloadVerifier(manifest.payload)
        while chunk := handle.read(limits.chunk_bytes):
            verifier.feed(chunk)
        verifier.finish()
    return manifest


@contextlib.contextmanager
def open_payload(
    path: Path, manifest: Manifest, *, limits: Limits = DEFAULT_LIMITS
) -> Iterator[ByteReader]:
    """The payload of a bundle as a stream that checks it against ``manifest``.

    ``manifest`` must come from :func:`verify` (or :func:`verify_manifest` on
    this file's manifest). The stream raises SizeMismatchError as soon as it
    runs past the declared size and, at EOF, SizeMismatchError or
    HashMismatchError if the payload is short or differs.
    """
    with open(path, "rb") as handle:
        _read_head(handle, limits)
        yield _VerifyingReader(handle, manifest.payload)


def unpack(
    path: Path, manifest: Manifest, target: Path, *, limits: Limits = DEFAULT_LIMITS
) -> ExtractStats:
    """Extract a verified bundle's payload into the new directory ``target``, all or nothing.

    The payload is hashed again while it is unpacked, and ``target`` appears
    only if the hash still matches, so a file changed after :func:`verify`
    installs nothing. Raises what :func:`firmware_bundles.extract.extract` raises.
    """
    with open_payload(path, manifest, limits=limits) as stream:
        return extract(stream, target, limits=limits)
