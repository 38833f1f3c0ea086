"""The bundle-transfer wire contract: requests, chunk frames, topics, the reference rule."""

from __future__ import annotations

import struct

import pytest

from protocols import (
    MAX_CHUNK_BYTES,
    BundleRequest,
    Channel,
    ChunkData,
    ChunkError,
    ChunkErrorCode,
    ProtocolError,
    Reason,
    bundle_references,
    decode,
    decode_frame,
    encode,
    encode_chunk,
    encode_chunk_error,
    parse_topic,
    topic,
)
from protocols.bundles import FRAME_HEADER_BYTES, FRAME_MAGIC, MAX_ERROR_DETAIL_BYTES

SHA = "ab" * 32


def test_channels_follow_the_one_level_topic_rule() -> None:
    assert topic("pump-1", Channel.BUNDLE_REQ) == "driftless/v1/devices/pump-1/bundle_req"
    assert topic("pump-1", Channel.BUNDLE_DATA) == "driftless/v1/devices/pump-1/bundle_data"
    assert parse_topic("driftless/v1/devices/pump-1/bundle_data") == ("pump-1", Channel.BUNDLE_DATA)
    with pytest.raises(ProtocolError) as err:
        parse_topic("driftless/v1/devices/pump-1/bundles/req")
    assert err.value.reason is Reason.BAD_TOPIC


def test_request_round_trips() -> None:
    request = BundleRequest(device_id="d1", bundle=SHA, offset=65536, length=65536)
    data = encode(request)
    assert b'"kind":"bundle_req"' in data and b'"v":1' in data
    assert decode(data, BundleRequest) == request


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(
            b'{"v":1,"kind":"bundle_req","device_id":"d1","bundle":"' + b"AB" * 32
            + b'","offset":0,"length":1}',
            Reason.INVALID_FIELDS,
            id="upper-case-hash",
        ),
        pytest.param(
            b'{"v":1,"kind":"bundle_req","device_id":"d1","bundle":"ab","offset":0,"length":1}',
            Reason.INVALID_FIELDS,
            id="short-hash",
        ),
        pytest.param(
            b'{"v":1,"kind":"bundle_req","device_id":"d1","bundle":"' + SHA.encode()
            + b'","offset":-1,"length":1}',
            Reason.INVALID_FIELDS,
            id="negative-offset",
        ),
        pytest.param(
            b'{"v":1,"kind":"bundle_req","device_id":"d1","bundle":"' + SHA.encode()
            + b'","offset":0,"length":0}',
            Reason.INVALID_FIELDS,
            id="zero-length",
        ),
        pytest.param(
            b'{"v":1,"kind":"bundle_req","device_id":"d1","bundle":"' + SHA.encode()
            + b'","offset":0,"length":4294967296}',
            Reason.INVALID_FIELDS,
            id="length-past-32-bits",
        ),
        pytest.param(
            b'{"v":1,"kind":"bundle_req","device_id":"d/1","bundle":"' + SHA.encode()
            + b'","offset":0,"length":1}',
            Reason.INVALID_FIELDS,
            id="bad-device-id",
        ),
        pytest.param(
            b'{"v":2,"kind":"bundle_req","device_id":"d1"}',
            Reason.UNSUPPORTED_VERSION,
            id="version-2",
        ),
        pytest.param(b'{"v":1,"kind":"birth"}', Reason.WRONG_KIND, id="wrong-kind"),
        pytest.param(b"\x00\x01", Reason.MALFORMED, id="binary"),
        pytest.param(b"{" + b" " * 300_000 + b"}", Reason.OVERSIZED, id="oversized"),
    ],
)  # fmt: skip
def test_bad_requests_are_refused_with_a_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(payload, BundleRequest)
    assert err.value.reason is reason


def test_data_frame_layout_is_the_documented_one() -> None:
    frame = encode_chunk(SHA, 1 << 40, b"hello")
    assert len(frame) == FRAME_HEADER_BYTES + 5 == 55
    assert frame[:4] == FRAME_MAGIC == b"DLBC"
    assert frame[4] == 1  # version
    assert frame[5] == 0  # kind: data
    assert frame[6:38] == bytes.fromhex(SHA)
    assert struct.unpack(">QI", frame[38:50]) == (1 << 40, 5)
    assert frame[50:] == b"hello"
    assert decode_frame(frame) == ChunkData(bundle=SHA, offset=1 << 40, data=b"hello")


def test_error_frame_round_trips_and_cuts_long_details() -> None:
    frame = encode_chunk_error(SHA, 7, 9, ChunkErrorCode.BAD_RANGE, "é" * 1000)
    decoded = decode_frame(frame)
    assert isinstance(decoded, ChunkError)
    assert (decoded.offset, decoded.length, decoded.code) == (7, 9, ChunkErrorCode.BAD_RANGE)
    assert decoded.code.label == "bad_range"
    assert len(decoded.detail.encode()) <= MAX_ERROR_DETAIL_BYTES
    assert frame[5] == 1 and frame[50] == 2


def test_largest_chunk_fits_and_one_more_byte_does_not() -> None:
    assert isinstance(decode_frame(encode_chunk(SHA, 0, bytes(MAX_CHUNK_BYTES))), ChunkData)
    with pytest.raises(ValueError, match="chunk limit"):
        encode_chunk(SHA, 0, bytes(MAX_CHUNK_BYTES + 1))
    # A frame fits Mosquitto's max_packet_size (1 MiB) with room for the topic and headers.
    assert FRAME_HEADER_BYTES + MAX_CHUNK_BYTES + 200 < 1024 * 1024


def _header(
    *, magic: bytes = FRAME_MAGIC, version: int = 1, kind: int = 0, length: int = 3
) -> bytes:
    return struct.pack(">4sBB32sQI", magic, version, kind, bytes.fromhex(SHA), 0, length)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"DLBC\x01", Reason.MALFORMED, id="shorter-than-header"),
        pytest.param(_header(magic=b"XXXX") + b"abc", Reason.MALFORMED, id="bad-magic"),
        pytest.param(_header(version=2) + b"abc", Reason.UNSUPPORTED_VERSION, id="version-2"),
        pytest.param(_header(kind=7) + b"abc", Reason.MALFORMED, id="unknown-kind"),
        pytest.param(_header(length=4) + b"abc", Reason.MALFORMED, id="length-says-more"),
        pytest.param(_header(length=2) + b"abc", Reason.MALFORMED, id="length-says-less"),
        pytest.param(_header(kind=1), Reason.MALFORMED, id="error-without-code"),
        pytest.param(_header(kind=1) + b"\x09", Reason.MALFORMED, id="unknown-error-code"),
        pytest.param(
            _header(length=MAX_CHUNK_BYTES + 1) + bytes(MAX_CHUNK_BYTES + 1),
            Reason.OVERSIZED,
            id="oversized",
        ),
    ],
)
def test_bad_frames_are_refused_with_a_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(ProtocolError) as err:
        decode_frame(payload)
    assert err.value.reason is reason


def test_a_device_may_accept_less_than_the_protocol_maximum() -> None:
    with pytest.raises(ProtocolError) as err:
        decode_frame(encode_chunk(SHA, 0, bytes(1025)), max_chunk_bytes=1024)
    assert err.value.reason is Reason.OVERSIZED


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param({"workloads": [{"name": "a", "bundle": SHA}]}, {SHA}, id="one"),
        pytest.param({"workloads": [{"bundle": SHA.upper()}]}, {SHA}, id="lowercased"),
        pytest.param({"workloads": [{"bundle": "nothex"}]}, {"nothex"}, id="kept-to-refuse"),
        pytest.param({"workloads": [{"bundle": 5}, "x"]}, set(), id="not-strings"),
        pytest.param({"other": {"workloads": [{"bundle": SHA}]}}, set(), id="nested"),
    ],
)
def test_reference_rule(config: dict[str, object], expected: set[str]) -> None:
    assert bundle_references(config) == expected
