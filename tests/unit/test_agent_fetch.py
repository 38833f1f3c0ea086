"""The sans-I/O download core, pushed through an in-memory link (no broker, no disk, no clock)."""

from __future__ import annotations

import ast
import hashlib
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.bundle_transfer import (
    BundleFetch,
    Done,
    Dropped,
    Expectations,
    Failed,
    FetchAction,
    FetchEvent,
    HeadVerified,
    LinkDown,
    LinkUp,
    LocalBytes,
    Received,
    Refused,
    Request,
    SourceRefused,
    Start,
    Tick,
    UnsuitableBundleError,
    Write,
    version_at_least,
)
from edge_agent.settings import FetchConfig
from firmware_bundles import archive
from firmware_bundles.errors import (
    ExpiredMetadataError,
    FormatError,
    HashMismatchError,
    RollbackError,
    SizeMismatchError,
    ThresholdNotMetError,
)
from firmware_bundles.keys import SigningKey
from firmware_bundles.model import PayloadInfo, Targets
from protocols import ChunkErrorCode
from tests.unit.test_bundles_support import DAY, NOW, Fleet, make_manifest

CHUNK = 2000  # a manifest (with two signatures) fits one chunk
FLEET = Fleet()


def bundle_bytes(
    payload_size: int = 7_500,
    *,
    signers: list[SigningKey] | None = None,
    **manifest: object,
) -> bytes:
    payload = random.Random(payload_size).randbytes(payload_size)
    fields: dict[str, object] = {
        "targets": Targets(architectures=["any"], min_agent_version="0.1.0"),
        "payload": PayloadInfo(sha256=hashlib.sha256(payload).hexdigest(), size=payload_size),
        **manifest,
    }
    envelope = FLEET.signed_manifest(make_manifest(**fields), signers)
    header = struct.pack(">17sII", archive.MAGIC, archive.FORMAT_VERSION, len(envelope))
    return header + envelope + payload


BUNDLE = bundle_bytes()
HEAD_END = 25 + struct.unpack(">I", BUNDLE[21:25])[0]


def expectations(**overrides: object) -> Expectations:
    fields: dict[str, object] = {
        "trusted_root": FLEET.trusted(),
        "now": NOW,
        "clock_skew_s": 0,
        "architecture": "x86_64",
        "agent_version": "0.1.0",
        "installed_security_versions": {},
        "max_bundle_bytes": 10**9,
        **overrides,
    }
    return Expectations(**fields)  # type: ignore[arg-type]


def new_core(data: bytes = BUNDLE, *, sha: str | None = None, window: int = 3) -> BundleFetch:
    return BundleFetch(
        sha or hashlib.sha256(data).hexdigest(),
        expectations(),
        FetchConfig(chunk_bytes=CHUNK, window_chunks=window, request_timeout_s=5),
    )


@dataclass
class Link:
    """The hub's side in memory: answers requests in order from ``source``, with faults."""

    core: BundleFetch
    source: bytes
    now: float = 0.0
    file: bytearray = field(default_factory=bytearray)
    requests: list[Request] = field(default_factory=list)
    pending: list[Request] = field(default_factory=list)
    log: list[FetchAction] = field(default_factory=list)
    answer: Callable[[Link, Request], list[FetchEvent]] | None = None

    def feed(self, event: FetchEvent) -> list[FetchAction]:
        actions = self.core.handle(event)
        for action in actions:
            self.log.append(action)
            if isinstance(action, Request):
                self.requests.append(action)
                self.pending.append(action)
            elif isinstance(action, Write):
                assert action.offset == len(self.file), "writes are always at the end"
                self.file += action.data
        assert self.core.in_flight <= self.core.config.window_chunks
        return actions

    def serve(self, limit: int = 10_000) -> FetchAction:
        """Answer requests until the core finishes; returns Done or Failed."""
        for _ in range(limit):
            if self.core.finished:
                break
            if not self.pending:
                self.now += 100
                self.feed(Tick(self.now))
                continue
            request = self.pending.pop(0)
            events = (self.answer or exact)(self, request)
            for event in events:
                self.feed(event)
        final = self.log[-1]
        assert isinstance(final, Done | Failed), final
        return final


def exact(link: Link, request: Request) -> list[FetchEvent]:
    data = link.source[request.offset : request.offset + request.length]
    return [Received(request.offset, data, link.now)]


def started(data: bytes = BUNDLE, **kw: object) -> Link:
    link = Link(new_core(data, **kw), data)  # type: ignore[arg-type]
    link.feed(Start(0.0))
    return link


def failure(link: Link) -> BaseException:
    final = link.serve()
    assert isinstance(final, Failed), final
    return final.error


# ---------------------------------------------------------------- purity


def test_fetch_core_imports_no_io() -> None:
    source = (Path(__file__).parents[2] / "edge_agent" / "bundle_transfer.py").read_text()
    banned = {"paho", "aiomqtt", "asyncio", "socket", "subprocess", "threading", "os", "time"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        assert not banned.intersection(names), names


# ---------------------------------------------------------------- the happy path


def test_header_then_manifest_then_payload_in_a_window() -> None:
    link = started()
    assert link.requests == [Request(0, 25)]  # only the header at first
    final = link.serve()
    assert isinstance(final, Done) and final.total_bytes == len(BUNDLE)
    assert bytes(link.file) == BUNDLE
    assert link.requests[1] == Request(25, HEAD_END - 25)  # then the manifest, up to HEAD_END
    verified = next(i for i, a in enumerate(link.log) if isinstance(a, HeadVerified))
    before = [a for a in link.log[:verified] if isinstance(a, Request)]
    assert max(r.offset + r.length for r in before) == HEAD_END  # no payload byte asked before
    tiles = sorted((r.offset, r.length) for r in link.requests)
    assert [o for o, _ in tiles] == sorted({o for o, _ in tiles})  # each range asked once
    assert sum(length for _, length in tiles) == len(BUNDLE)


def test_resume_asks_only_for_what_is_missing() -> None:
    have = HEAD_END + 2_345
    link = Link(new_core(), BUNDLE)
    link.feed(LocalBytes(BUNDLE[:1000]))
    link.feed(LocalBytes(BUNDLE[1000:have]))
    assert link.core.manifest is not None  # the head was verified from disk
    link.file += BUNDLE[:have]
    link.feed(Start(0.0))
    assert link.requests[0].offset == have
    assert isinstance(link.serve(), Done)
    assert min(r.offset for r in link.requests) == have
    assert link.core.resumed_bytes == have
    assert bytes(link.file) == BUNDLE


def test_a_complete_partial_file_needs_no_request() -> None:
    link = Link(new_core(), BUNDLE)
    actions = link.feed(LocalBytes(BUNDLE))
    assert isinstance(actions[-1], Done)
    assert link.feed(Start(0.0)) == [] and link.requests == []


# ---------------------------------------------------------------- chunks that do not fit


def test_a_chunk_at_the_wrong_offset_is_refused_and_rerequested() -> None:
    link = started(window=4)
    fooled: list[int] = []

    def answer(link: Link, request: Request) -> list[FetchEvent]:
        if request.offset > HEAD_END and not fooled:  # skip one: answer the next one first
            fooled.append(request.offset)
            nxt = link.pending[0]
            return [Received(nxt.offset, BUNDLE[nxt.offset : nxt.offset + nxt.length], link.now)]
        return exact(link, request)

    link.answer = answer
    assert isinstance(link.serve(), Done)
    assert bytes(link.file) == BUNDLE
    dropped = [a for a in link.log if isinstance(a, Dropped)]
    assert dropped[0].why == "wrong_offset"
    assert sum(r.offset == fooled[0] for r in link.requests) == 2  # asked for again


def test_a_duplicate_is_dropped_without_asking_again() -> None:
    link = started()
    link.pending.clear()
    link.feed(Received(0, BUNDLE[:25], 0.0))
    asked = len(link.requests)
    assert link.feed(Received(0, BUNDLE[:25], 0.0)) == [Dropped(0, 25, "duplicate")]
    assert len(link.requests) == asked


def test_a_chunk_longer_than_asked_is_refused() -> None:
    link = started()
    link.pending.clear()
    actions = link.feed(Received(0, BUNDLE[:26], 0.0))
    assert actions == [Dropped(0, 26, "too_long"), Request(0, 25)]
    assert link.file == b""


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        pytest.param(
            lambda link, r: [Received(r.offset, link.source[r.offset : r.offset + r.length], 0)],
            SizeMismatchError,
            "truncated",
            id="truncated-transfer-short-chunk",
        ),
        pytest.param(
            lambda link, r: (
                [Refused(r.offset, ChunkErrorCode.BAD_RANGE, "past the end", 0)]
                if r.offset >= len(link.source)
                else exact(link, r)
            ),
            SizeMismatchError,
            "truncated",
            id="truncated-transfer-bad-range",
        ),
    ],
)
def test_a_truncated_source_fails(answer: object, error: type, match: str) -> None:
    link = Link(new_core(window=1), BUNDLE[: len(BUNDLE) - 1500], answer=answer)  # type: ignore[arg-type]
    link.core.sha256 = hashlib.sha256(BUNDLE).hexdigest()
    link.feed(Start(0.0))
    err = failure(link)
    assert isinstance(err, error) and match in str(err)
    assert link.core.handle(Tick(10**6)) == []  # terminal


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        pytest.param(ChunkErrorCode.UNKNOWN_BUNDLE, SourceRefused, id="unknown-bundle"),
        pytest.param(ChunkErrorCode.TOO_LONG, SourceRefused, id="too-long"),
    ],
)
def test_refusals_end_the_transfer(code: ChunkErrorCode, outcome: type) -> None:
    link = started()
    actions = link.feed(Refused(0, code, "no", 0.0))
    assert len(actions) == 1 and isinstance(actions[0], Failed)
    assert isinstance(actions[0].error, outcome)


def test_unavailable_is_asked_again_after_the_timeout() -> None:
    link = started()
    assert link.feed(Refused(0, ChunkErrorCode.UNAVAILABLE, "busy", 0.0)) == []
    assert link.feed(Tick(4.9)) == []
    assert link.feed(Tick(5.0)) == [Request(0, 25)]
    assert link.feed(Tick(14.9)) == []  # the timeout doubled
    assert link.feed(Tick(15.0)) == [Request(0, 25)]


def test_a_refusal_for_a_request_not_in_flight_is_stale() -> None:
    link = started()
    assert link.feed(Refused(5000, ChunkErrorCode.UNKNOWN_BUNDLE, "x", 0.0)) == [
        Dropped(5000, 0, "stale_refusal")
    ]
    assert not link.core.finished


def test_nothing_is_sent_while_the_link_is_down() -> None:
    link = Link(new_core(), BUNDLE)
    assert link.feed(Start(0.0, link_up=False)) == []
    link.feed(LinkUp(1.0))
    assert link.requests == [Request(0, 25)]
    link.feed(LinkDown())
    assert link.feed(Tick(100.0)) == []  # no timeouts while down
    assert link.feed(LinkUp(101.0)) == [Request(0, 25)]  # in flight: sent again


# ---------------------------------------------------------------- bad bundles


def flipped(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("source", "reference", "error", "match"),
    [
        pytest.param(
            flipped(BUNDLE, len(BUNDLE) - 10), BUNDLE, HashMismatchError, "payload",
            id="flipped-payload-byte",
        ),
        pytest.param(
            flipped(BUNDLE, HEAD_END - 5), BUNDLE, ThresholdNotMetError, "",
            id="flipped-manifest-byte",
        ),
        pytest.param(BUNDLE, b"another file", HashMismatchError, "reference", id="wrong-file"),
        pytest.param(
            bundle_bytes(signers=[SigningKey.generate()]), None, ThresholdNotMetError, "release",
            id="unauthorised-key",
        ),
        pytest.param(
            bundle_bytes(created=NOW - 3 * DAY, expires=NOW - DAY), None,
            ExpiredMetadataError, "expired", id="expired-manifest",
        ),
        pytest.param(
            bundle_bytes(security_version=1), None, RollbackError, "lower than installed 2",
            id="lower-security-version",
        ),
        pytest.param(
            bundle_bytes(targets=Targets(architectures=["aarch64"])), None,
            UnsuitableBundleError, "x86_64", id="other-architecture",
        ),
        pytest.param(
            bundle_bytes(targets=Targets(architectures=["any"], min_agent_version="0.2")), None,
            UnsuitableBundleError, "needs agent 0.2", id="newer-agent-needed",
        ),
        pytest.param(
            b"NOT-A-BUNDLE-AT-ALL" + BUNDLE[19:], None, FormatError, "magic", id="bad-magic"
        ),
        pytest.param(
            BUNDLE[:21] + struct.pack(">I", 70_000) + BUNDLE[25:], None, FormatError,
            "exceeds", id="manifest-over-the-limit",
        ),
    ],
)  # fmt: skip
def test_bad_bundles_are_refused(
    source: bytes, reference: bytes | None, error: type, match: str
) -> None:
    sha = hashlib.sha256(reference or source).hexdigest()
    link = Link(new_core(source, sha=sha), source)
    link.core.expect = expectations(installed_security_versions={"thermostat": 2})
    link.feed(Start(0.0))
    err = failure(link)
    assert isinstance(err, error), err
    assert match in str(err)
    if error not in (HashMismatchError,):  # refused from the head: no payload byte asked for
        assert max(r.offset + r.length for r in link.requests) <= HEAD_END


def test_a_bundle_too_large_for_the_device_is_refused_before_its_payload() -> None:
    link = Link(new_core(), BUNDLE)
    link.core.expect = expectations(max_bundle_bytes=len(BUNDLE) - 1)
    link.feed(Start(0.0))
    err = failure(link)
    assert isinstance(err, UnsuitableBundleError) and "limit" in str(err)
    assert max(r.offset + r.length for r in link.requests) == HEAD_END


def test_bad_resumed_bytes_fail_like_received_ones() -> None:
    link = Link(new_core(), BUNDLE)
    actions = link.feed(LocalBytes(flipped(BUNDLE, 3)))
    assert isinstance(actions[-1], Failed) and isinstance(actions[-1].error, FormatError)


@pytest.mark.parametrize(
    ("have", "need", "ok"),
    [
        pytest.param("0.1.0", "0", True, id="default"),
        pytest.param("0.1.0", "0.1", True, id="shorter-equal"),
        pytest.param("0.1.0", "0.1.1", False, id="patch-newer"),
        pytest.param("1.10", "1.9.9", True, id="numeric-not-lexical"),
        pytest.param("0.2.0-dev", "0.2", True, id="pre-release-suffix"),
    ],
)
def test_agent_version_comparison(have: str, need: str, ok: bool) -> None:
    assert version_at_least(have, need) is ok


def test_a_manifest_longer_than_a_chunk_comes_in_pieces() -> None:
    core = BundleFetch(
        hashlib.sha256(BUNDLE).hexdigest(),
        expectations(),
        FetchConfig(chunk_bytes=100, window_chunks=2, request_timeout_s=5),
    )
    link = Link(core, BUNDLE)
    link.feed(Start(0.0))
    assert isinstance(link.serve(), Done)
    head = [r for r in link.requests if r.offset < HEAD_END]
    assert head[:3] == [Request(0, 25), Request(25, 100), Request(125, 100)]
    assert head[-1].offset + head[-1].length == HEAD_END
