"""Simulated bundle transfers: the real fetch core over an in-memory hub, link drops, resumes.

Each test drives :class:`simulator.transfer.DeviceTransfers` against a chunk
server in memory that answers (or holds, or loses) every request, and reads
like what happens to a device: it drops its link mid-transfer, its job is
superseded, the hub's copy is tampered with, its disk is too small.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from edge_agent.core import Booted, Connected, Connecting, DesiredPayload, Subscribed
from edge_agent.settings import FetchConfig
from firmware_bundles import archive
from firmware_bundles.keys import SigningKey
from firmware_bundles.model import PayloadInfo, Targets
from protocols import (
    BundleRequest,
    ChunkErrorCode,
    Desired,
    decode,
    encode,
    encode_chunk,
    encode_chunk_error,
)
from protocols.signed import seal
from simulator.fleet import BundleCounters, FleetConfig, FleetCounters, VirtualDevice
from simulator.transfer import DeviceTransfers, DiskFull, SimDisk, TransferSettings
from tests.unit.test_bundles_support import NOW, Fleet, make_manifest

FLEET = Fleet()
CHUNK = 1000
DEVICE = "sim-00000"
DEADLINE_S = 5.0


def bundle_file(
    payload_size: int = 9_500, *, signers: list[SigningKey] | None = None, security: int = 3
) -> bytes:
    """A signed bundle file (header, manifest, payload) for ``FLEET``'s release key."""
    payload = bytes((i * 7 + payload_size) % 251 for i in range(payload_size))
    manifest = make_manifest(
        targets=Targets(architectures=["any"], min_agent_version="0.1.0"),
        payload=PayloadInfo(sha256=hashlib.sha256(payload).hexdigest(), size=payload_size),
        security_version=security,
    )
    envelope = FLEET.signed_manifest(manifest, signers)
    header = struct.pack(">17sII", archive.MAGIC, archive.FORMAT_VERSION, len(envelope))
    return header + envelope + payload


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def head_end(data: bytes) -> int:
    return 25 + int(struct.unpack(">I", data[21:25])[0])


BUNDLE = bundle_file()
SHA = sha(BUNDLE)


def settings(**overrides: object) -> TransferSettings:
    fields: dict[str, object] = {
        "trusted_root": FLEET.trusted(),
        "fetch": FetchConfig(
            chunk_bytes=CHUNK, window_chunks=3, request_timeout_s=5, request_timeout_max_s=5
        ),
        "frame_queue_max": 16,
        "wall_clock": lambda: float(NOW),
        **overrides,
    }
    return TransferSettings(**fields)  # type: ignore[arg-type]


@dataclass
class Hub:
    """A chunk server in memory: answers each request at once unless told to hold it."""

    files: dict[str, bytes]
    device: DeviceTransfers | None = None
    link: bool = True  # the device's connection; requests are lost while it is down
    answer_first: int | None = None  # answer this many requests, hold the rest
    requests: list[BundleRequest] = field(default_factory=list)
    held: list[BundleRequest] = field(default_factory=list)
    served_bytes: int = 0

    async def publish(self, _topic: str, payload: bytes) -> bool:
        if not self.link:
            return False
        request = decode(payload, BundleRequest)
        self.requests.append(request)
        if self.answer_first is not None and len(self.requests) > self.answer_first:
            self.held.append(request)
        else:
            self.answer(request)
        return True

    def answer(self, request: BundleRequest) -> None:
        assert self.device is not None
        data = self.files.get(request.bundle)
        if data is None:
            code, detail = ChunkErrorCode.UNKNOWN_BUNDLE, "not here"
        elif request.offset >= len(data):
            code, detail = ChunkErrorCode.BAD_RANGE, "past the end"
        else:
            piece = data[request.offset : request.offset + request.length]
            self.served_bytes += len(piece)
            self.device.on_frame(encode_chunk(request.bundle, request.offset, piece))
            return
        frame = encode_chunk_error(request.bundle, request.offset, request.length, code, detail)
        self.device.on_frame(frame)

    def release(self) -> None:
        """Answer everything held (the broker delivering what it kept) and hold no more."""
        held, self.held = self.held, []
        self.answer_first = None
        for request in held:
            self.answer(request)


@dataclass
class Rig:
    hub: Hub
    device: DeviceTransfers
    counters: BundleCounters
    results: list[tuple[int, bool, str | None]]
    changed: asyncio.Event

    async def until(self, predicate: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not predicate():
                self.changed.clear()
                try:
                    async with asyncio.timeout(0.01):
                        await self.changed.wait()
                except TimeoutError:
                    pass
        assert predicate(), what

    async def result(self) -> tuple[int, bool, str | None]:
        await self.until(lambda: bool(self.results), "a FetchDone")
        return self.results[-1]

    async def settled(self) -> None:
        """Every queued frame handled: the transfer waits for the hub."""
        for _ in range(50):
            await asyncio.sleep(0)


def rig(files: dict[str, bytes] | None = None, **overrides: object) -> Rig:
    hub = Hub(files if files is not None else {SHA: BUNDLE})
    counters = BundleCounters()
    results: list[tuple[int, bool, str | None]] = []
    changed = asyncio.Event()

    async def finished(generation: int, ok: bool, error: str | None) -> None:
        results.append((generation, ok, error))
        changed.set()

    device = DeviceTransfers(
        DEVICE,
        settings(**overrides),
        counters=counters,
        changed=changed.set,
        publish=hub.publish,
        finished=finished,
        link_up=True,
    )
    hub.device = device
    return Rig(hub, device, counters, results, changed)


def assert_tiles(requests: list[BundleRequest], size: int) -> None:
    """Every byte of the file was asked for exactly once."""
    spans = sorted((r.offset, r.offset + r.length) for r in requests)
    assert spans[0][0] == 0 and spans[-1][1] == size
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end == start, spans


# ---------------------------------------------------------------- the whole transfer


async def test_a_bundle_arrives_whole_each_byte_asked_for_once() -> None:
    r = rig()
    r.device.start(1, (SHA,))
    assert await r.result() == (1, True, None)
    assert r.hub.served_bytes == len(BUNDLE) == r.counters.bytes_accepted
    assert_tiles(r.hub.requests, len(BUNDLE))
    assert r.counters.fetched == 1 and r.counters.requests == len(r.hub.requests)
    assert r.counters.duplicate_bytes == 0 and r.counters.resumes == 0
    assert SHA in r.device.disk.verified and not r.device.disk.partials
    assert r.device.disk.verified[SHA].size == len(BUNDLE)


async def test_the_payload_is_asked_for_only_after_the_manifest_verified() -> None:
    r = rig()
    r.device.start(1, (SHA,))
    await r.result()
    first_payload = next(i for i, q in enumerate(r.hub.requests) if q.offset >= head_end(BUNDLE))
    head = r.hub.requests[:first_payload]
    assert head[0].offset == 0 and head[0].length == 25  # the header alone first
    assert max(q.offset + q.length for q in head) == head_end(BUNDLE)


async def test_a_bundle_already_on_the_disk_is_not_fetched_again() -> None:
    r = rig()
    r.device.start(1, (SHA,))
    await r.result()
    asked = len(r.hub.requests)
    r.device.start(2, (SHA,))
    await r.until(lambda: len(r.results) == 2, "the second job")
    assert r.results[-1] == (2, True, None)
    assert len(r.hub.requests) == asked and r.counters.already_held == 1


# ---------------------------------------------------------------- resuming


async def test_a_dropped_link_resumes_without_asking_again_for_what_arrived() -> None:
    r = rig()
    r.hub.answer_first = 6  # the header, the manifest and a few payload chunks
    r.device.start(1, (SHA,))
    await r.until(lambda: len(r.hub.held) == 3, "a full window held")
    await r.settled()
    held_at_drop = r.counters.bytes_accepted
    assert 0 < held_at_drop < len(BUNDLE)
    r.hub.link = False
    r.device.link_down()
    r.hub.held.clear()  # lost with the connection
    r.hub.answer_first = None
    asked_before = len(r.hub.requests)
    await r.settled()
    assert len(r.hub.requests) == asked_before  # nothing is sent while the link is down
    r.hub.link = True
    r.device.link_up()
    assert await r.result() == (1, True, None)
    after = r.hub.requests[asked_before:]
    assert min(q.offset for q in after) == held_at_drop  # only what was missing
    assert r.hub.served_bytes == len(BUNDLE)
    c = r.counters
    assert (c.link_drops, c.resumes, c.fetched_after_resume) == (1, 1, 1)
    assert c.resumed_bytes == held_at_drop and c.duplicate_bytes == 0


async def test_frames_kept_by_the_broker_are_used_before_the_link_counts_as_up() -> None:
    r = rig()
    r.hub.answer_first = 6
    r.device.start(1, (SHA,))
    await r.until(lambda: len(r.hub.held) == 3, "a full window held")
    await r.settled()
    r.device.link_down()
    asked_before = len(r.hub.requests)
    r.hub.release()  # answered while the device was away, delivered on reconnect ...
    r.device.link_up()  # ... before the SUBACK
    assert await r.result() == (1, True, None)
    assert r.hub.served_bytes == len(BUNDLE)  # no request in flight was sent again
    assert_tiles(r.hub.requests, len(BUNDLE))
    assert len(r.hub.requests) > asked_before
    assert r.counters.dropped == {} and r.counters.duplicate_bytes == 0


async def test_a_superseded_job_keeps_its_bytes_and_a_later_job_resumes_from_them() -> None:
    r = rig()
    r.hub.answer_first = 6
    r.device.start(1, (SHA,))
    await r.until(lambda: len(r.hub.held) == 3, "a full window held")
    await r.settled()
    held = r.counters.bytes_accepted
    r.device.cancel(1)
    await r.settled()
    assert not r.device.busy and SHA in r.device.disk.partials
    asked_before = len(r.hub.requests)
    r.hub.held.clear()
    r.hub.answer_first = None
    r.device.start(2, (SHA,))
    assert await r.result() == (2, True, None)
    assert [g for g, _, _ in r.results] == [2]  # the cancelled job never reports
    assert min(q.offset for q in r.hub.requests[asked_before:]) == held
    c = r.counters
    assert (c.jobs, c.jobs_cancelled, c.jobs_ok, c.resumes) == (2, 1, 1, 1)
    assert c.resumed_bytes == held


async def test_an_unanswered_request_is_sent_again_after_its_timeout() -> None:
    fast = FetchConfig(
        chunk_bytes=CHUNK, window_chunks=3, request_timeout_s=0.05, request_timeout_max_s=0.1
    )
    r = rig(fetch=fast)
    r.hub.answer_first = 4
    r.device.start(1, (SHA,))
    await r.until(lambda: len(r.hub.held) >= 3, "requests held")
    r.hub.held.clear()  # the hub lost them
    r.hub.answer_first = None
    assert await r.result() == (1, True, None)
    assert r.hub.served_bytes == len(BUNDLE)


async def test_a_transfer_that_takes_too_long_fails_and_keeps_its_partial() -> None:
    r = rig(max_transfer_s=0.2)
    r.hub.answer_first = 6
    r.device.start(1, (SHA,))
    generation, ok, error = await r.result()
    assert (generation, ok) == (1, False)
    assert error is not None and "not complete after" in error
    assert SHA in r.device.disk.partials  # the next job resumes from there


# ---------------------------------------------------------------- refusals


def flipped(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("served", "error"),
    [
        pytest.param(flipped(BUNDLE, len(BUNDLE) - 10), "HashMismatchError", id="payload-byte"),
        pytest.param(
            flipped(BUNDLE, BUNDLE.index(b"thermostat")), "ThresholdNotMetError", id="manifest-byte"
        ),
    ],
)
async def test_a_tampered_copy_on_the_hub_is_refused_and_nothing_stays(
    served: bytes, error: str
) -> None:
    r = rig({SHA: served})
    r.device.start(1, (SHA,))
    generation, ok, message = await r.result()
    assert (generation, ok) == (1, False)
    assert message is not None
    assert error in message, message
    assert not r.device.disk.verified and not r.device.disk.partials
    assert r.counters.fetched == 0 and r.counters.jobs_failed == 1
    assert sum(r.counters.errors.values()) == 1


async def test_a_bundle_signed_by_an_unknown_key_is_refused_before_its_payload() -> None:
    rogue = bundle_file(signers=[SigningKey.generate()])
    r = rig({sha(rogue): rogue})
    r.device.start(1, (sha(rogue),))
    _, ok, message = await r.result()
    assert not ok and message is not None and "Threshold" in message
    assert max(q.offset + q.length for q in r.hub.requests) <= head_end(rogue)


async def test_an_unknown_bundle_fails_the_generation_with_the_hubs_reason() -> None:
    r = rig({})
    r.device.start(1, (SHA,))
    _, ok, message = await r.result()
    assert not ok and message is not None and "unknown_bundle" in message
    assert r.counters.errors == {"SourceRefused:unknown_bundle": 1}


async def test_a_lower_security_version_than_one_applied_is_refused() -> None:
    newer, older = bundle_file(security=5), bundle_file(9_000, security=4)
    r = rig({sha(newer): newer, sha(older): older})
    r.device.start(1, (sha(newer),))
    await r.result()
    r.device.applied(frozenset({sha(newer)}))
    r.device.start(2, (sha(older),))
    await r.until(lambda: len(r.results) == 2, "the second job")
    _, ok, message = r.results[-1]
    assert not ok and message is not None and "RollbackError" in message


async def test_a_bundle_larger_than_the_disk_is_refused_before_its_payload() -> None:
    r = rig(disk_max_bytes=len(BUNDLE) // 2)
    r.device.start(1, (SHA,))
    _, ok, message = await r.result()
    assert not ok and message is not None and "simulated disk" in message
    assert max(q.offset + q.length for q in r.hub.requests) <= head_end(BUNDLE)
    assert not r.device.disk.partials and r.counters.errors == {"DiskFull": 1}


async def test_a_malformed_frame_is_counted_and_never_reaches_the_core() -> None:
    r = rig()
    r.device.on_frame(b"not a frame at all, but long enough to be read as a header......")
    assert r.counters.frames_rejected == {"malformed": 1} and r.counters.frames == 0


# ---------------------------------------------------------------- the disk


def test_the_disk_evicts_unreferenced_bundles_oldest_first() -> None:
    disk = SimDisk(max_bytes=1000)
    manifest = make_manifest()
    disk.commit("a" * 64, manifest, 400, at=1.0)
    disk.commit("b" * 64, manifest, 400, at=2.0)
    assert disk.make_room(300, keep={"b" * 64}) == ["a" * 64]
    assert list(disk.verified) == ["b" * 64] and disk.usage() == 400
    with pytest.raises(DiskFull, match="cannot hold 700 more bytes"):
        disk.make_room(700, keep={"b" * 64})


# ---------------------------------------------------------------- on a virtual device


class DeviceHarness:
    """A VirtualDevice with no connection, given (or not) the fleet's trusted root."""

    def __init__(self, *, with_root: bool) -> None:
        self.counters = FleetCounters()
        self.changed = asyncio.Event()
        config = FleetConfig(broker_url="mqtt://127.0.0.1:1", device_ids=(DEVICE,))
        self.device = VirtualDevice(
            DEVICE,
            config=config,
            settings=config.link_settings(),
            counters=self.counters,
            connect_gate=asyncio.Semaphore(1),
            changed=self.changed.set,
            clock=lambda: float(NOW),
            transfer_settings=settings() if with_root else None,
        )

    async def until(self, predicate: Callable[[FleetCounters], bool]) -> None:
        async with asyncio.timeout(DEADLINE_S):
            while not predicate(self.counters):
                self.changed.clear()
                await self.changed.wait()

    async def ready(self) -> None:
        for event in (Booted(1.0), Connecting(1.0), Connected(1.0, False), Subscribed(1.0)):
            await self.device.feed(event)

    async def desired(self, generation: int, config: dict[str, object]) -> None:
        doc = Desired(device_id=DEVICE, generation=generation, config=config, issued_at=1.0)
        payload = encode(doc)
        if self.device.core.trusted_root is not None:  # a device with a root wants it signed
            payload = seal(payload, FLEET.hub_keys)
        await self.device.feed(DesiredPayload(payload, 2.0))


WORKLOAD: dict[str, object] = {"workloads": [{"name": "thermo", "bundle": SHA}]}


async def test_a_device_without_a_root_fails_the_generation_saying_how_to_give_one() -> None:
    h = DeviceHarness(with_root=False)
    await h.ready()
    await h.desired(1, WORKLOAD)
    await h.until(lambda c: c.bundles.jobs_failed == 1 and c.reports_deferred == 1)
    state = h.device.saved_state
    assert state.failed_generation == 1 and state.applied_generation == 0
    assert state.last_error is not None and "--root" in state.last_error
    assert h.device.transfers is None  # nothing of the verification path was set up
    assert h.counters.applied == {}


async def test_a_newer_document_cancels_the_fetch_and_is_applied() -> None:
    h = DeviceHarness(with_root=True)
    await h.ready()
    await h.desired(1, WORKLOAD)  # offline: the transfer waits for its link
    assert h.device.transfers is not None and h.device.transfers.busy
    await h.desired(2, {"plain": True})
    await h.until(lambda c: c.applied == {2: 1})
    assert h.counters.bundles.jobs_cancelled == 1 and h.counters.bundles.jobs == 1
    assert not h.device.transfers.busy
    await h.device.stop()
