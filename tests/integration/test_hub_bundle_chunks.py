"""The hub's chunk server on a real Mosquitto, with an aiomqtt client playing the device."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiomqtt
import pytest

from hub.broker_config import hub_identities
from hub.bundles.chunks import ChunkServer
from hub.bundles.files import BundleFiles
from hub.mqtt.link import chunk_options
from hub.mqtt.session import MqttSession
from hub.settings import HubSettings
from hub.stats import ChunkServerStats
from protocols import (
    BundleRequest,
    Channel,
    ChunkData,
    ChunkError,
    ChunkErrorCode,
    Frame,
    decode_frame,
    encode,
    topic,
)
from tests.pki import TestBroker

pytestmark = pytest.mark.integration


class Device:
    """One device's view: publish requests, collect frames in arrival order."""

    def __init__(self, client: aiomqtt.Client, device_id: str) -> None:
        self.client = client
        self.device_id = device_id
        self.frames: asyncio.Queue[Frame] = asyncio.Queue()

    async def ask(self, bundle: str, offset: int, length: int, *, as_device: str = "") -> None:
        body = BundleRequest(
            device_id=as_device or self.device_id, bundle=bundle, offset=offset, length=length
        )
        await self.client.publish(topic(self.device_id, Channel.BUNDLE_REQ), encode(body), qos=1)

    async def frame(self, timeout_s: float = 10) -> Frame:
        return await asyncio.wait_for(self.frames.get(), timeout_s)


@pytest.fixture
async def served(
    broker: TestBroker, tmp_path: Path
) -> AsyncIterator[tuple[ChunkServer, Device, str, bytes]]:
    files = BundleFiles(tmp_path / "bundles")
    files.prepare(now=0, stale_after_s=1)
    data = os.urandom(1_000_000)
    sha = hashlib.sha256(data).hexdigest()
    files.path(sha).write_bytes(data)
    settings = HubSettings(
        broker_url=broker.url,
        db_url=f"sqlite:///{tmp_path / 'hub.db'}",
        mqtt_client_id="hub-test",
        bundle_chunk_max_bytes=65536,
        mqtt_reconnect_max_s=0.5,
    )
    hub_tls = broker.pki.client_context(hub_identities(settings.mqtt_client_id)[1])
    server = ChunkServer(settings=settings, files=files, stats=ChunkServerStats())
    session = MqttSession(
        broker=settings.broker(),
        options=chunk_options(settings),
        stats=server.stats,
        tls_context=hub_tls,
    )
    server.attach(session)
    session.start()
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier="dev-1",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=broker.pki.client_context("dev-1"),
    ) as client:
        device = Device(client, "dev-1")
        await client.subscribe(topic("dev-1", Channel.BUNDLE_DATA), qos=1)

        async def collect() -> None:
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                device.frames.put_nowait(decode_frame(message.payload))

        reader = asyncio.create_task(collect())
        try:
            await wait_for(lambda: session.connected, "chunk server connected")
            # The shared subscription is made right after CONNACK; one round trip proves it.
            await device.ask(sha, 0, 1)
            await device.frame()
            yield server, device, sha, data
        finally:
            reader.cancel()
            await session.stop()


async def wait_for(predicate: object, what: str, timeout_s: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_window_of_requests_is_answered_in_order_with_the_exact_bytes(
    served: tuple[ChunkServer, Device, str, bytes],
) -> None:
    server, device, sha, data = served
    offsets = list(range(0, len(data), 65536))
    for offset in offsets:
        await device.ask(sha, offset, 65536)
    received = b""
    for offset in offsets:
        frame = await device.frame()
        assert isinstance(frame, ChunkData) and frame.offset == offset
        received += frame.data
    assert received == data  # the last chunk is short: the file ends there
    assert server.stats.chunks_served == len(offsets) + 1
    assert server.stats.bytes_served == len(data) + 1


@pytest.mark.parametrize(
    ("ask", "code"),
    [
        pytest.param({"bundle": "cd" * 32}, ChunkErrorCode.UNKNOWN_BUNDLE, id="unknown-bundle"),
        pytest.param({"offset": 1_000_000}, ChunkErrorCode.BAD_RANGE, id="offset-past-the-end"),
        pytest.param({"length": 65537}, ChunkErrorCode.TOO_LONG, id="oversized-length"),
    ],
)
async def test_refused_requests_get_an_error_frame_and_are_counted(
    served: tuple[ChunkServer, Device, str, bytes], ask: dict[str, object], code: ChunkErrorCode
) -> None:
    server, device, sha, data = served
    fields: dict[str, object] = {"bundle": sha, "offset": 0, "length": 10, **ask}
    await device.ask(fields["bundle"], fields["offset"], fields["length"])  # type: ignore[arg-type]
    frame = await device.frame()
    assert isinstance(frame, ChunkError) and frame.code is code
    assert server.stats.errors_sent == {code.label: 1}
    await device.ask(sha, 5, 5)  # still serving
    frame = await device.frame()
    assert isinstance(frame, ChunkData) and frame.data == data[5:10]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"{not json", "malformed", id="malformed"),
        pytest.param(
            encode(BundleRequest(device_id="dev-2", bundle="ab" * 32, offset=0, length=1)),
            "device_mismatch",
            id="body-names-another-device",
        ),
        pytest.param(b'{"v":1,"kind":"bundle_req"}', "invalid_fields", id="missing-fields"),
    ],
)
async def test_requests_breaking_the_contract_are_rejected_unanswered_and_counted(
    served: tuple[ChunkServer, Device, str, bytes], payload: bytes, reason: str
) -> None:
    server, device, sha, data = served
    await device.client.publish(topic("dev-1", Channel.BUNDLE_REQ), payload, qos=1)
    await device.ask(sha, 100, 3)  # a marker after the bad one
    frame = await device.frame()
    assert isinstance(frame, ChunkData) and frame.data == data[100:103]  # nothing came before it
    assert server.stats.rejected == {reason: 1}
    assert server.stats.internal_errors == 0


async def test_the_server_reconnects_after_the_broker_restarts(
    served: tuple[ChunkServer, Device, str, bytes], broker: TestBroker, tmp_path: Path
) -> None:
    server, _, sha, data = served
    broker.kill()
    await wait_for(lambda: not server.stats.mqtt_connected, "chunk server saw the broker go")
    broker.start()
    await wait_for(lambda: server.stats.mqtt_connected, "chunk server reconnected", timeout_s=20)
    async with aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        identifier="dev-9",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=broker.pki.client_context("dev-9"),
    ) as client:
        await client.subscribe(topic("dev-9", Channel.BUNDLE_DATA), qos=1)
        body = BundleRequest(device_id="dev-9", bundle=sha, offset=7, length=3)
        for _ in range(50):  # the server's SUBSCRIBE may still be on its way
            await client.publish(topic("dev-9", Channel.BUNDLE_REQ), encode(body), qos=1)
            try:
                message = await asyncio.wait_for(anext(aiter(client.messages)), 0.2)
            except TimeoutError:
                continue
            assert isinstance(message.payload, bytes)
            frame = decode_frame(message.payload)
            assert isinstance(frame, ChunkData) and frame.data == data[7:10]
            break
        else:
            raise AssertionError("no answer after the broker restart")
    assert server.stats.connects == 2
