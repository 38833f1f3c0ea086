"""Sans-I/O download of one bundle file: events in, actions out (architecture rules 8, 9).

:class:`BundleFetch` knows the file it wants (the SHA-256 of the whole bundle
file, as the desired config references it) and nothing about MQTT, HTTP or
disks: the driver feeds it the bytes already on disk, chunks as they arrive,
refusals, link changes and ticks, and runs the actions it returns (send a
request, write bytes at an offset) in order.

Rules:
- Strictly in order: bytes are accepted only at ``received``, the end of what
  is already contiguous from offset 0. A chunk anywhere else is refused
  (:class:`Dropped`): below ``received`` it is a duplicate; above it, or
  longer than asked, it is a wrong chunk and every request still in flight is
  sent again (once, until the next accepted chunk), so the refused range is
  re-requested. A *short* chunk means the source's file ends there: truncated.
- Requests tile the file in order: the 25-byte header first, then the signed
  manifest (its length comes from the header), and **only after** the
  manifest's signatures, expiry, rollback and target checks passed against
  the device's trusted root (:class:`HeadVerified`) the payload, at most
  ``window_chunks`` requests of ``chunk_bytes`` in flight. So a bundle signed
  by the wrong key is refused before a byte of its payload is asked for.
- Everything accepted is hashed as it arrives: the whole file (must equal the
  reference) and the payload through :class:`PayloadVerifier` (must match the
  signed manifest, and a byte past the declared size fails at once). Nothing
  is :class:`Done` before both matched at exactly the declared size.
- Resume: the driver feeds the partial file's bytes (:class:`LocalBytes`)
  before :class:`Start`; they are hashed and checked exactly like received
  bytes, and the first request starts where they end.
- A request unanswered for ``request_timeout_s`` (doubling up to
  ``request_timeout_max_s``) is sent again with everything behind it; while
  the link is down nothing is sent and nothing times out. An ``unavailable``
  refusal is retried the same way. Transfers never fail for lack of an
  answer: a newer desired document cancels them (the caller's job).
- Terminal outcomes: :class:`Done`, or :class:`Failed` carrying a
  :class:`firmware_bundles.errors.BundleError` (the bytes are bad or not for
  this device: drop them) or a :class:`SourceRefused` (the source will not
  serve this bundle). After either, every event returns ``[]``.
- Time is an input: ``now`` on events (monotonic seconds, for timeouts) and
  ``Expectations.now`` (unix seconds, for expiry). Imports no I/O module.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from edge_agent.settings import FetchConfig
from firmware_bundles.archive import FORMAT_VERSION, HEADER_BYTES, MAGIC, PayloadVerifier
from firmware_bundles.errors import (
    BundleError,
    FormatError,
    HashMismatchError,
    SizeMismatchError,
)
from firmware_bundles.limits import DEFAULT_LIMITS, Limits
from firmware_bundles.model import Manifest, matches_architecture
from firmware_bundles.trust import TrustedRoot, check_rollback, verify_manifest
from protocols.bundles import ChunkErrorCode, is_sha256

_HEADER = struct.Struct(">17sII")  # the bundle file header, as firmware_bundles.archive writes it

# ---------------------------------------------------------------- errors


class UnsuitableBundleError(BundleError):
    """A valid bundle that this device must not install (architecture, agent version, size)."""


class SourceRefused(Exception):
    """The source (hub) said it will not serve this bundle: unknown, or a request too long."""

    def __init__(self, code: ChunkErrorCode, detail: str) -> None:
        super().__init__(f"{code.label}: {detail}")
        self.code = code
        self.detail = detail


# ---------------------------------------------------------------- configuration
# FetchConfig (chunk size, window, timeouts) lives in edge_agent.settings.


@dataclass(frozen=True)
class Expectations:
    """What the device accepts: its trusted root, clock, architecture, versions and limits."""

    trusted_root: TrustedRoot
    now: float
    """Unix seconds when the transfer started, for the expiry checks."""
    clock_skew_s: int
    architecture: str
    agent_version: str
    installed_security_versions: Mapping[str, int] = field(default_factory=dict)
    max_bundle_bytes: int = 4 * 1024**3
    limits: Limits = DEFAULT_LIMITS


_VERSION_CORE = re.compile(r"^[0-9]+(\.[0-9]+)*")


def version_tuple(version: str) -> tuple[int, ...]:
    """Pure: the leading dotted numbers of a version (``"1.2.3-rc1"`` -> ``(1, 2, 3)``).

    Raises ValueError when the version does not start with a number.
    """
    match = _VERSION_CORE.match(version)
    if match is None:
        raise ValueError(f"version {version!r} does not start with a number")
    return tuple(int(part) for part in match.group(0).split("."))


def version_at_least(have: str, need: str) -> bool:
    """Pure: whether version ``have`` is ``need`` or later (missing parts count as 0)."""
    a, b = version_tuple(have), version_tuple(need)
    width = max(len(a), len(b))
    return a + (0,) * (width - len(a)) >= b + (0,) * (width - len(b))


def check_manifest(manifest: Manifest, expect: Expectations) -> None:
    """Pure: raise if a verified manifest must not be installed on this device.

    RollbackError for a security version below the highest installed under its
    name; UnsuitableBundleError for another architecture or a newer agent
    version than this one.
    """
    check_rollback(manifest, expect.installed_security_versions)
    if not matches_architecture(manifest.targets, expect.architecture):
        raise UnsuitableBundleError(
            f"bundle {manifest.name} {manifest.version} targets "
            f"{', '.join(manifest.targets.architectures)}, not {expect.architecture}"
        )
    need = manifest.targets.min_agent_version
    try:
        ok = version_at_least(expect.agent_version, need)
    except ValueError as exc:
        raise UnsuitableBundleError(
            f"bundle {manifest.name} {manifest.version}: cannot compare agent versions: {exc}"
        ) from None
    if not ok:
        raise UnsuitableBundleError(
            f"bundle {manifest.name} {manifest.version} needs agent {need} or later, "
            f"this is {expect.agent_version}"
        )


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class LocalBytes:
    """Bytes of the partial file already on disk, in order from where the last ones ended."""

    data: bytes


@dataclass(frozen=True)
class Start:
    now: float
    link_up: bool = True


@dataclass(frozen=True)
class Received:
    offset: int
    data: bytes
    now: float


@dataclass(frozen=True)
class Refused:
    """An error frame (or its HTTP equivalent) answering the request at ``offset``."""

    offset: int
    code: ChunkErrorCode
    detail: str
    now: float


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class LinkDown:
    pass


@dataclass(frozen=True)
class LinkUp:
    now: float


FetchEvent = LocalBytes | Start | Received | Refused | Tick | LinkDown | LinkUp

# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class Request:
    """Ask the source for ``length`` bytes at ``offset``."""

    offset: int
    length: int


@dataclass(frozen=True)
class Write:
    """Write ``data`` at ``offset`` of the partial file (always its current end)."""

    offset: int
    data: bytes


@dataclass(frozen=True)
class HeadVerified:
    """The signed manifest passed every check; ``total_bytes`` is the whole file's size."""

    manifest: Manifest
    total_bytes: int


@dataclass(frozen=True)
class Dropped:
    """A chunk that was refused (``why``: duplicate, wrong_offset, too_long, unrequested)."""

    offset: int
    length: int
    why: str


@dataclass(frozen=True)
class Done:
    manifest: Manifest
    total_bytes: int


@dataclass(frozen=True)
class Failed:
    error: BundleError | SourceRefused


FetchAction = Request | Write | HeadVerified | Dropped | Done | Failed


# ---------------------------------------------------------------- the core


@dataclass
class _Outstanding:
    offset: int
    length: int


class BundleFetch:
    """The transfer of one bundle file; call :meth:`handle` per event, run the actions in order."""

    def __init__(self, sha256: str, expect: Expectations, config: FetchConfig) -> None:
        if not is_sha256(sha256):
            raise ValueError(f"not a SHA-256 in lowercase hex: {sha256[:80]!r}")
        self.sha256 = sha256
        self.expect = expect
        self.config = config
        self.received = 0
        self.total_bytes: int | None = None
        self.manifest: Manifest | None = None
        self.resumed_bytes = 0
        self.finished = False
        self._head_end: int | None = None
        self._head = bytearray()
        self._payload: PayloadVerifier | None = None
        self._file_hash = hashlib.sha256()
        self._outstanding: list[_Outstanding] = []
        self._next_request = 0
        self._started = False
        self._link_up = False
        self._recovering = False
        self._timeout_s = config.request_timeout_s
        self._sent_at: float | None = None  # when the oldest request in flight was (re)sent

    # -- queries

    def next_deadline(self) -> float | None:
        """When the oldest request in flight times out (None: nothing to wait for)."""
        if self.finished or not self._link_up or not self._outstanding or self._sent_at is None:
            return None
        return self._sent_at + self._timeout_s

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)

    # -- events

    def handle(self, event: FetchEvent) -> list[FetchAction]:
        """Feed one event; returns the actions to run in order. Pure apart from this object."""
        if self.finished:
            return []
        try:
            return self._handle(event)
        except (BundleError, SourceRefused) as exc:
            self.finished = True
            self._outstanding.clear()
            return [Failed(exc)]

    def _handle(self, event: FetchEvent) -> list[FetchAction]:
        match event:
            case LocalBytes(data=data):
                if self._started:
                    raise RuntimeError("LocalBytes after Start")
                self.resumed_bytes += len(data)
                actions = self._absorb(data)
                self._next_request = self.received
                return actions
            case Start(now=now, link_up=link_up):
                self._started = True
                self._link_up = link_up
                self._next_request = self.received
                return self._fill(now)
            case Received(offset=offset, data=data, now=now):
                return self._received(offset, data, now)
            case Refused(offset=offset, code=code, detail=detail, now=now):
                return self._refused(offset, code, detail, now)
            case Tick(now=now):
                deadline = self.next_deadline()
                if deadline is None or now < deadline:
                    return []
                self._timeout_s = min(self._timeout_s * 2, self.config.request_timeout_max_s)
                return self._resend(now)
            case LinkDown():
                self._link_up = False
                return []
            case LinkUp(now=now):
                self._link_up = True
                if not self._started:
                    return []
                return self._resend(now) + self._fill(now)
        raise TypeError(f"unknown event {event!r}")

    # -- requests

    def _limit(self) -> int:
        """How far requests may reach now: the header, then the manifest, then the file."""
        if self.total_bytes is not None:
            return self.total_bytes
        if self._head_end is not None:
            return self._head_end
        return HEADER_BYTES

    def _fill(self, now: float) -> list[FetchAction]:
        if not self._started or not self._link_up:
            return []
        actions: list[FetchAction] = []
        limit = self._limit()
        while len(self._outstanding) < self.config.window_chunks and self._next_request < limit:
            length = min(self.config.chunk_bytes, limit - self._next_request)
            self._outstanding.append(_Outstanding(self._next_request, length))
            actions.append(Request(self._next_request, length))
            self._next_request += length
        if actions and (self._sent_at is None or len(self._outstanding) == len(actions)):
            self._sent_at = now
        return actions

    def _resend(self, now: float) -> list[FetchAction]:
        if not self._link_up:
            return []
        self._sent_at = now if self._outstanding else None
        return [Request(o.offset, o.length) for o in self._outstanding]

    # -- chunks

    def _received(self, offset: int, data: bytes, now: float) -> list[FetchAction]:
        if not self._started:
            return [Dropped(offset, len(data), "unrequested")]
        if offset < self.received:
            return [Dropped(offset, len(data), "duplicate")]
        head = self._outstanding[0] if self._outstanding else None
        if offset > self.received or head is None:
            why = "wrong_offset" if head is not None else "unrequested"
            return [Dropped(offset, len(data), why), *self._recover(now)]
        if len(data) > head.length:
            return [Dropped(offset, len(data), "too_long"), *self._recover(now)]
        if len(data) < head.length:
            raise self._truncated(offset + len(data))
        self._outstanding.pop(0)
        self._recovering = False
        self._timeout_s = self.config.request_timeout_s
        self._sent_at = now if self._outstanding else None
        actions: list[FetchAction] = [Write(offset, data), *self._absorb(data)]
        if not self.finished:
            actions += self._fill(now)
        return actions

    def _recover(self, now: float) -> list[FetchAction]:
        """After a wrong chunk: send every request in flight again, once per accepted chunk."""
        if self._recovering:
            return []
        self._recovering = True
        return self._resend(now)

    def _refused(
        self, offset: int, code: ChunkErrorCode, detail: str, now: float
    ) -> list[FetchAction]:
        if not any(o.offset == offset for o in self._outstanding):
            return [Dropped(offset, 0, "stale_refusal")]
        if code is ChunkErrorCode.BAD_RANGE:
            raise self._truncated(offset)
        if code is ChunkErrorCode.UNAVAILABLE:
            return []  # the timeout sends it again, with backoff
        raise SourceRefused(code, detail)

    def _truncated(self, end: int) -> SizeMismatchError:
        expected = self.total_bytes if self.total_bytes is not None else self._limit()
        return SizeMismatchError(
            f"transfer truncated: the source's copy of {self.sha256[:16]}… ends at byte "
            f"{end}, the bundle needs {expected}"
            + ("" if self.total_bytes is not None else " (header and manifest)")
        )

    # -- verification

    def _absorb(self, data: bytes) -> list[FetchAction]:
        """Hash and check ``data`` (the bytes at ``received``); verify the head when complete."""
        self._file_hash.update(data)
        self.received += len(data)
        actions: list[FetchAction] = []
        if self._payload is None:
            self._head += data
            actions += self._try_head()
        else:
            self._payload.feed(data)
        if self.total_bytes is not None and self.received >= self.total_bytes:
            actions.append(self._finish())
        return actions

    def _try_head(self) -> list[FetchAction]:
        limits = self.expect.limits
        if self._head_end is None:
            if len(self._head) < HEADER_BYTES:
                return []
            magic, version, length = _HEADER.unpack_from(self._head)
            if magic != MAGIC:
                raise FormatError("not a Driftless bundle (bad magic)")
            if version != FORMAT_VERSION:
                raise FormatError(f"bundle format version {version} is not {FORMAT_VERSION}")
            if length > limits.max_metadata_bytes:
                raise FormatError(
                    f"manifest of {length} bytes exceeds the {limits.max_metadata_bytes}-byte limit"
                )
            self._head_end = HEADER_BYTES + length
        if len(self._head) < self._head_end:
            return []
        envelope = bytes(self._head[HEADER_BYTES : self._head_end])
        rest = bytes(self._head[self._head_end :])
        self._head = bytearray()
        expect = self.expect
        manifest = verify_manifest(
            envelope, expect.trusted_root, expect.now, expect.clock_skew_s, limits=limits
        )
        check_manifest(manifest, expect)
        total = self._head_end + manifest.payload.size
        if total > expect.max_bundle_bytes:
            raise UnsuitableBundleError(
                f"bundle {manifest.name} {manifest.version} is {total} bytes, over this "
                f"device's limit of {expect.max_bundle_bytes}"
            )
        self.manifest = manifest
        self.total_bytes = total
        self._payload = PayloadVerifier(manifest.payload)
        if rest:
            self._payload.feed(rest)
        return [HeadVerified(manifest, total)]

    def _finish(self) -> Done:
        assert self._payload is not None and self.manifest is not None
        assert self.total_bytes is not None
        self._payload.finish()  # SizeMismatchError, HashMismatchError
        digest = self._file_hash.hexdigest()
        if digest != self.sha256:
            raise HashMismatchError(
                f"bundle file SHA-256 {digest[:16]}… differs from the reference {self.sha256[:16]}…"
            )
        self.finished = True
        return Done(self.manifest, self.total_bytes)
