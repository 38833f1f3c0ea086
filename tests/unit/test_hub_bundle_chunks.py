"""The chunk server's pure request rule and its file reads (no broker)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from hub.bundles.chunks import Answer, RequestRejected, answer, parse_request
from hub.bundles.files import BundleFiles
from protocols import (
    BundleRequest,
    Channel,
    ChunkData,
    ChunkError,
    ChunkErrorCode,
    Reason,
    decode_frame,
    encode,
    topic,
)
from tests.unit.hub_bundles_support import bundle_hub

SHA = "ab" * 32


def request(device: str = "d1", **fields: object) -> BundleRequest:
    values: dict[str, object] = {"bundle": SHA, "offset": 0, "length": 16, **fields}
    return BundleRequest(device_id=device, **values)  # type: ignore[arg-type]


@pytest.fixture
def stored(tmp_path: Path) -> tuple[BundleFiles, str, bytes]:
    files = BundleFiles(tmp_path / "bundles")
    files.prepare(now=0, stale_after_s=1)
    data = os.urandom(100_000)
    sha = hashlib.sha256(data).hexdigest()
    files.path(sha).write_bytes(data)
    return files, sha, data


def test_a_valid_request_is_parsed() -> None:
    got = parse_request(topic("d1", Channel.BUNDLE_REQ), encode(request()))
    assert got == request()


@pytest.mark.parametrize(
    ("name", "payload", "reason"),
    [
        pytest.param(
            topic("d1", Channel.BUNDLE_REQ),
            encode(request("d2")),
            Reason.DEVICE_MISMATCH,
            id="body-names-another-device",
        ),
        pytest.param(
            topic("d1", Channel.REPORTED), encode(request()), Reason.BAD_TOPIC, id="other-channel"
        ),
        pytest.param("driftless/v1/devices/d1/x/bundle_req", b"{}", Reason.BAD_TOPIC, id="deep"),
        pytest.param(
            "driftless/v1/devices/-x/bundle_req", b"{}", Reason.BAD_DEVICE_ID, id="bad-id"
        ),
        pytest.param(topic("d1", Channel.BUNDLE_REQ), b"{nope", Reason.MALFORMED, id="not-json"),
    ],
)
def test_requests_that_break_the_contract_are_rejected(
    name: str, payload: bytes, reason: Reason
) -> None:
    with pytest.raises(RequestRejected) as err:
        parse_request(name, payload)
    assert err.value.reason is reason


def test_answer_reads_exactly_the_range(stored: tuple[BundleFiles, str, bytes]) -> None:
    files, sha, data = stored
    result = answer(files, request(bundle=sha, offset=1000, length=5000), max_chunk_bytes=65536)
    frame = decode_frame(result.frame)
    assert frame == ChunkData(bundle=sha, offset=1000, data=data[1000:6000])
    assert (result.data_bytes, result.error) == (5000, None)


def test_answer_at_the_end_of_the_file_is_short(stored: tuple[BundleFiles, str, bytes]) -> None:
    files, sha, data = stored
    result = answer(files, request(bundle=sha, offset=99_990, length=100), max_chunk_bytes=65536)
    frame = decode_frame(result.frame)
    assert isinstance(frame, ChunkData) and frame.data == data[99_990:]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        pytest.param({"bundle": "cd" * 32}, ChunkErrorCode.UNKNOWN_BUNDLE, id="unknown-bundle"),
        pytest.param({"offset": 100_000}, ChunkErrorCode.BAD_RANGE, id="offset-at-end"),
        pytest.param({"offset": 2**62}, ChunkErrorCode.BAD_RANGE, id="offset-far-past-end"),
        pytest.param({"length": 65537}, ChunkErrorCode.TOO_LONG, id="too-long"),
    ],
)
def test_refusals_are_error_frames(
    stored: tuple[BundleFiles, str, bytes], fields: dict[str, object], code: ChunkErrorCode
) -> None:
    files, sha, _ = stored
    result = answer(files, request(**{"bundle": sha, **fields}), max_chunk_bytes=65536)
    frame = decode_frame(result.frame)
    assert isinstance(frame, ChunkError)
    assert frame.code is code and result.error is code and result.data_bytes == 0


def test_hub_stats_carry_the_chunk_servers_counters(tmp_path: Path) -> None:
    with bundle_hub(tmp_path) as (hub, client):
        stats = client.get("hub/stats").json()
        assert stats["bundles"]["requests"] == 0
        assert stats["bundles"]["mqtt_connected"] is False
        assert hub.app.state.context.link.chunk_session.client_id == "driftless-hub-bundles"


def test_nowait_reads_only_from_the_page_cache(stored: tuple[BundleFiles, str, bytes]) -> None:
    files, sha, data = stored
    wanted = request(bundle=sha, offset=4096, length=8192)
    cached = answer(files, wanted, max_chunk_bytes=65536, nowait=True)
    assert cached is not None and decode_frame(cached.frame) == ChunkData(
        bundle=sha, offset=4096, data=data[4096:12288]
    )

    def evicted_then_nowait() -> Answer | None:
        fd = os.open(files.path(sha), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache
        finally:
            os.close(fd)
        return answer(files, wanted, max_chunk_bytes=65536, nowait=True)

    # DONTNEED is advice: on a busy machine the kernel may keep (or read back) a page
    # now and then, so it gets a few tries; a nowait read must miss at least once.
    assert any(evicted_then_nowait() is None for _ in range(20))  # it would have waited
    blocking = answer(files, wanted, max_chunk_bytes=65536)  # what the worker thread does
    assert blocking is not None and decode_frame(blocking.frame) == decode_frame(cached.frame)
