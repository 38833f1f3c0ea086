"""Bundle transfer over MQTT: the request message, the binary chunk frames, the reference rule.

Rules:
- A device asks for one byte range of one bundle file per :class:`BundleRequest`
  (JSON, on its ``bundle_req`` channel); the hub answers each request with
  exactly one frame on the device's ``bundle_data`` channel: a data frame
  carrying ``min(length, size - offset)`` bytes at ``offset``, or an error frame
  saying why it will not.
- A bundle is named by the SHA-256 of the **whole bundle file** (lowercase hex),
  the key of the hub's store; frames carry the same 32 bytes raw.
- Frames are binary with a fixed 50-byte header (:data:`FRAME_HEADER`, all
  integers big-endian); :func:`decode_frame` checks the magic, the version, the
  kind, the size limit and that ``length`` matches the bytes that follow, and
  raises only :class:`ProtocolError`.
- A data frame carries at most :data:`MAX_CHUNK_BYTES` bytes, so a frame fits
  Mosquitto's ``max_packet_size`` of 1 MiB with room for the topic and headers.
- The reference rule (which bundles a desired config names) lives here because
  hub and agent must agree on it: only ``config["workloads"][i]["bundle"]``
  strings are references, compared in lowercase.
- Pure: no I/O.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec

from protocols.errors import ProtocolError, Reason
from protocols.messages import NonNegative, _Base

# ---------------------------------------------------------------- limits and defaults

MAX_CHUNK_BYTES: Final = 512 * 1024
"""Most bytes one data frame may carry (and one request may ask for without a refusal)."""
DEFAULT_CHUNK_BYTES: Final = 64 * 1024
"""The reference agent's request size."""
DEFAULT_WINDOW_CHUNKS: Final = 8
"""The reference agent's requests in flight at once."""
MAX_ERROR_DETAIL_BYTES: Final = 512
"""Longest UTF-8 reason text an error frame carries."""

# ---------------------------------------------------------------- references

WORKLOADS_KEY: Final = "workloads"
BUNDLE_KEY: Final = "bundle"
SHA256_PATTERN: Final = r"^[0-9a-f]{64}$"
_SHA256 = re.compile(SHA256_PATTERN)

Sha256Hex = Annotated[str, msgspec.Meta(pattern=SHA256_PATTERN)]
ChunkLength = Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)]


def is_sha256(value: str) -> bool:
    """Pure: whether ``value`` is 64 lowercase hex digits."""
    return _SHA256.fullmatch(value) is not None


def bundle_references(config: Mapping[str, Any]) -> frozenset[str]:
    """Pure: the bundle SHA-256s (lowercased) that a desired ``config`` references.

    Anything not shaped ``{"workloads": [{"bundle": "<hex>"}, ...]}`` references
    nothing; a reference that is not valid hex is still returned (lowercased),
    so the device can refuse it with a clear error instead of ignoring it.
    """
    workloads = config.get(WORKLOADS_KEY)
    if not isinstance(workloads, list):
        return frozenset()
    found: set[str] = set()
    for workload in workloads:
        if isinstance(workload, dict):
            bundle = workload.get(BUNDLE_KEY)
            if isinstance(bundle, str):
                found.add(bundle.lower())
    return frozenset(found)


# ---------------------------------------------------------------- the request (JSON)


class BundleRequest(_Base, kw_only=True, frozen=True, tag="bundle_req"):
    """Device -> hub: send me ``length`` bytes of bundle file ``bundle`` from ``offset``."""

    bundle: Sha256Hex
    offset: NonNegative
    length: ChunkLength


# ---------------------------------------------------------------- the frames (binary)

FRAME_MAGIC: Final = b"DLBC"
FRAME_VERSION: Final = 1
FRAME_HEADER: Final = struct.Struct(">4sBB32sQI")
"""magic, version, kind, file SHA-256 (raw), offset (uint64), length (uint32): 50 bytes."""
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size


class FrameKind(enum.IntEnum):
    DATA = 0
    ERROR = 1


class ChunkErrorCode(enum.IntEnum):
    """Why the hub did not send the bytes; the name is the stable string for logs and stats."""

    UNKNOWN_BUNDLE = 1
    """No bundle file with this SHA-256 is stored: give up."""
    BAD_RANGE = 2
    """``offset`` is at or past the end of the file: give up (the file is shorter than asked)."""
    TOO_LONG = 3
    """``length`` is more than this hub serves in one frame: ask for less."""
    UNAVAILABLE = 4
    """The hub could not read the file right now (I/O trouble, overload): retry later."""

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class ChunkData:
    """A data frame: ``data`` is the file's bytes at ``offset``."""

    bundle: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ChunkError:
    """An error frame answering the request for ``length`` bytes at ``offset``."""

    bundle: str
    offset: int
    length: int
    code: ChunkErrorCode
    detail: str


Frame = ChunkData | ChunkError


def _check_range(bundle: str, offset: int, length: int) -> bytes:
    if not is_sha256(bundle):
        raise ValueError(f"bundle must be a SHA-256 in lowercase hex, got {bundle[:80]!r}")
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset {offset} does not fit 64 bits")
    if not 0 <= length < 2**32:
        raise ValueError(f"length {length} does not fit 32 bits")
    return bytes.fromhex(bundle)


def encode_chunk_header(bundle: str, offset: int, length: int) -> bytes:
    """Pure: the 50-byte header of a data frame whose ``length`` bytes follow it.

    For writers that read the bytes straight into the frame's buffer. Raises
    ValueError past :data:`MAX_CHUNK_BYTES` or for a bad field.
    """
    if length > MAX_CHUNK_BYTES:
        raise ValueError(f"{length} bytes exceed the {MAX_CHUNK_BYTES}-byte chunk limit")
    raw = _check_range(bundle, offset, length)
    return FRAME_HEADER.pack(FRAME_MAGIC, FRAME_VERSION, FrameKind.DATA, raw, offset, length)


def encode_chunk(bundle: str, offset: int, data: bytes) -> bytes:
    """Pure: a data frame; raises ValueError past :data:`MAX_CHUNK_BYTES` or for a bad field."""
    return encode_chunk_header(bundle, offset, len(data)) + data


def encode_chunk_error(
    bundle: str, offset: int, length: int, code: ChunkErrorCode, detail: str
) -> bytes:
    """Pure: an error frame echoing the request; ``detail`` is cut to fit the limit."""
    raw = _check_range(bundle, offset, min(length, 2**32 - 1))
    text = detail.encode("utf-8")[:MAX_ERROR_DETAIL_BYTES].decode("utf-8", "ignore").encode()
    header = FRAME_HEADER.pack(
        FRAME_MAGIC, FRAME_VERSION, FrameKind.ERROR, raw, offset, min(length, 2**32 - 1)
    )
    return header + bytes([code]) + text


def decode_frame(payload: bytes, *, max_chunk_bytes: int = MAX_CHUNK_BYTES) -> Frame:
    """Pure: parse a ``bundle_data`` payload; raises ProtocolError with a reason.

    ``oversized`` past the header plus ``max_chunk_bytes``; ``unsupported_version``
    for another frame version; ``malformed`` for a bad magic, kind, length or
    error code.
    """
    limit = FRAME_HEADER_BYTES + max(max_chunk_bytes, 1 + MAX_ERROR_DETAIL_BYTES)
    if len(payload) > limit:
        raise ProtocolError(Reason.OVERSIZED, f"{len(payload)}-byte frame exceeds {limit} bytes")
    if len(payload) < FRAME_HEADER_BYTES:
        raise ProtocolError(
            Reason.MALFORMED, f"{len(payload)}-byte frame is shorter than its header"
        )
    magic, version, kind, raw, offset, length = FRAME_HEADER.unpack_from(payload)
    if magic != FRAME_MAGIC:
        raise ProtocolError(Reason.MALFORMED, "not a bundle chunk frame (bad magic)")
    if version != FRAME_VERSION:
        raise ProtocolError(
            Reason.UNSUPPORTED_VERSION, f"frame version {version} is not {FRAME_VERSION}"
        )
    body = payload[FRAME_HEADER_BYTES:]
    bundle = raw.hex()
    if kind == FrameKind.DATA:
        if length != len(body):
            raise ProtocolError(
                Reason.MALFORMED, f"frame says {length} bytes but carries {len(body)}"
            )
        if length > max_chunk_bytes:
            raise ProtocolError(
                Reason.OVERSIZED, f"{length}-byte chunk exceeds the {max_chunk_bytes}-byte limit"
            )
        return ChunkData(bundle=bundle, offset=offset, data=bytes(body))
    if kind == FrameKind.ERROR:
        if not body:
            raise ProtocolError(Reason.MALFORMED, "error frame without an error code")
        if len(body) > 1 + MAX_ERROR_DETAIL_BYTES:
            raise ProtocolError(Reason.OVERSIZED, "error frame detail is too long")
        try:
            code = ChunkErrorCode(body[0])
        except ValueError:
            raise ProtocolError(Reason.MALFORMED, f"unknown error code {body[0]}") from None
        detail = bytes(body[1:]).decode("utf-8", "replace")
        return ChunkError(bundle=bundle, offset=offset, length=length, code=code, detail=detail)
    raise ProtocolError(Reason.MALFORMED, f"unknown frame kind {kind}")
