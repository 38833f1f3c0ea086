"""The one codec (JSON via msgspec) and the payload size limit.

Rules:
- :func:`decode` checks the size *before* parsing and raises only ProtocolError.
- Decoding is strict: wrong types, missing fields, out-of-range numbers and a
  wrong ``kind`` or ``v`` are all rejected with a reason.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from protocols.bundles import BundleRequest
from protocols.errors import ProtocolError, Reason
from protocols.messages import (
    PROTOCOL_VERSION,
    Birth,
    CertIssued,
    CertRequest,
    Desired,
    Message,
    Reported,
    Status,
)

MAX_PAYLOAD_BYTES = 256 * 1024

M = TypeVar("M", Desired, Birth, Status, Reported, BundleRequest, CertRequest, CertIssued)

MESSAGE_TYPES: tuple[type[Message | BundleRequest], ...] = (
    Desired,
    Birth,
    Status,
    Reported,
    BundleRequest,
    CertRequest,
    CertIssued,
)
"""Every JSON message type; each one's ``kind`` (its tag) is the name of its channel."""

_encoder = msgspec.json.Encoder()
_decoders: dict[type, msgspec.json.Decoder[object]] = {
    cls: msgspec.json.Decoder(cls) for cls in MESSAGE_TYPES
}


class _Header(msgspec.Struct):
    v: object = None
    kind: object = None


_header_decoder = msgspec.json.Decoder(_Header)


def encode(message: Message | BundleRequest) -> bytes:
    """Pure: serialise a message; raises ProtocolError(OVERSIZED) past the limit."""
    data = _encoder.encode(message)
    if len(data) > MAX_PAYLOAD_BYTES:
        raise ProtocolError(
            Reason.OVERSIZED, f"{len(data)} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit"
        )
    return data


def decode(data: bytes, kind: type[M], *, max_bytes: int = MAX_PAYLOAD_BYTES) -> M:
    """Pure: parse ``data`` as a message of type ``kind``; raises ProtocolError.

    The envelope (``v``, ``kind``) is checked first, so a peer speaking another
    version or sending the wrong message type is told exactly that.
    """
    if len(data) > max_bytes:
        raise ProtocolError(
            Reason.OVERSIZED, f"{len(data)} bytes exceeds the {max_bytes}-byte limit"
        )
    try:
        header = _header_decoder.decode(data)
    except msgspec.ValidationError:
        raise ProtocolError(Reason.MALFORMED, "payload must be a JSON object") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(Reason.MALFORMED, f"not valid JSON: {exc}") from None
    if header.v != PROTOCOL_VERSION:
        got = "missing" if header.v is None else repr(header.v)
        raise ProtocolError(
            Reason.UNSUPPORTED_VERSION, f"protocol version {got} is not {PROTOCOL_VERSION}"
        )
    expected = kind.__struct_config__.tag
    if header.kind != expected:
        raise ProtocolError(
            Reason.WRONG_KIND, f"kind {header.kind!r} where {expected!r} was expected"
        )
    try:
        return _decoders[kind].decode(data)  # type: ignore[return-value]
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(Reason.INVALID_FIELDS, str(exc)) from None
