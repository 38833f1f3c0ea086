"""The one codec (JSON via msgspec) and the payload size limit.

Rules:
- :func:`decode` checks the size *before* parsing and raises only ProtocolError.
- Decoding is strict: wrong types, missing fields, out-of-range numbers and a
  wrong ``kind`` or ``v`` are all rejected with a reason.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from protocols.errors import ProtocolError, Reason
from protocols.messages import PROTOCOL_VERSION, Birth, Desired, Message, Reported, Status

MAX_PAYLOAD_BYTES = 256 * 1024

M = TypeVar("M", Desired, Birth, Status, Reported)

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[object]] = {
    cls: msgspec.json.Decoder(cls) for cls in (Desired, Birth, Status, Reported)
}


class _Header(msgspec.Struct):
    v: object = None
    kind: object = None


_header_decoder = msgspec.json.Decoder(_Header)


def encode(message: Message) -> bytes:
    """Pure: serialise a message; raises ProtocolError(OVERSIZED) past the limit."""
    data = _encoder.encode(message)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            Reason.OVERSIZED, f"{len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        )
    return data


def decode(data: bytes, kind: type[M], *, max_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """Pure: parse ``data`` as a message of type ``kind``; raises ProtocolError."""
    if len(data) > max_bytes:
        raise ProtocolError(
            Reason.OVERSIZED, f"{len(data)} bytes exceeds the {max_bytes}-byte limit"
        )
    try:
        message = _decoders[kind].decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(data, kind, exc) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(Reason.MALFORMED, f"not valid JSON: {exc}") from None
    if message.v != PROTOCOL_VERSION:  # type: ignore[attr-defined]
        raise ProtocolError(
            Reason.UNSUPPORTED_VERSION,
            f"protocol version {message.v!r} is not {PROTOCOL_VERSION}",  # type: ignore[attr-defined]
        )
    return message  # type: ignore[return-value]


def _classify(data: bytes, kind: type, exc: msgspec.ValidationError) -> ProtocolError:
    """Say *why* a well-formed JSON document failed validation."""
    try:
        header = _header_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return ProtocolError(Reason.MALFORMED, "payload must be a JSON object")
    if header.v != PROTOCOL_VERSION:
        return ProtocolError(
            Reason.UNSUPPORTED_VERSION, f"protocol version {header.v!r} is not {PROTOCOL_VERSION}"
        )
    expected = kind.__struct_config__.tag  # type: ignore[attr-defined]
    if header.kind != expected:
        return ProtocolError(
            Reason.WRONG_KIND, f"kind {header.kind!r} where {expected!r} was expected"
        )
    return ProtocolError(Reason.INVALID_FIELDS, str(exc))
