"""The hub's chunk server: answers devices' bundle requests over MQTT from the bundle files.

Rules:
- Its own MQTT session (:class:`hub.mqtt.session.MqttSession`, a second instance
  beside the link's; :mod:`hub.mqtt.link` says why), client id
  ``<mqtt_client_id>-bundles``, a clean session (nothing to keep: a device whose
  request went unanswered asks again), subscribed QoS 1 to
  ``$share/<group>/driftless/v1/devices/+/bundle_req`` so hub replicas split the
  requests. A request is acknowledged once queued, not once answered. It never
  touches the database: bundle files are content-addressed (``BundleFiles.path``),
  written once after verification, and retired by rename before a deletion
  commits, so "the file exists" is the store's own answer to "is this bundle
  stored".
- Every request gets exactly one frame on the device's ``bundle_data``
  channel (QoS 1): the bytes ``[offset, offset + min(length, size - offset))``
  or an error frame (``unknown_bundle``, ``bad_range``, ``too_long``,
  ``unavailable``). A message that breaks the contract (bad topic, bad JSON,
  a body naming another device than its topic) gets no answer: it is
  rejected, counted by reason and logged, like every other channel.
- One device's requests are answered in the order they arrived (one queue and
  one task per device with work; publishes started in that order), because
  the device accepts only the chunk at the offset it expects next. Devices are
  served concurrently, at most ``bundle_serve_concurrency`` chunks read or
  awaiting their PUBACK at once.
- Constant memory: a chunk is read with one ``preadv`` of at most
  ``bundle_chunk_max_bytes`` straight into its frame. The read is tried on the
  event loop with ``RWF_NOWAIT`` (page cache only, never waits for the disk)
  and done in a worker thread otherwise. Queues are bounded
  (``bundle_serve_queue_max`` in all, ``bundle_serve_device_queue_max`` per
  device) and a request past a bound is dropped and counted (the device times
  out and asks again).
- Nothing a device sends stops the server; a lost connection (the session
  reconnects) drops the queued requests with it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from hub.bundles.files import BundleFiles
from hub.mqtt.session import Incoming, MqttSession, Publish, SessionError
from hub.settings import HubSettings
from hub.stats import ChunkServerStats
from protocols import (
    BundleRequest,
    Channel,
    ChunkErrorCode,
    ProtocolError,
    Reason,
    decode,
    encode_chunk,
    encode_chunk_error,
    parse_topic,
    topic,
)
from protocols.bundles import FRAME_HEADER_BYTES, encode_chunk_header
from protocols.topics import shared_subscription

log = logging.getLogger(__name__)

OVERLOADED = "overloaded"


class RequestRejected(Exception):
    """A request message that breaks the contract; ``reason`` is a ``protocols.Reason`` value."""

    def __init__(self, reason: Reason, detail: str, device_id: str | None = None) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device_id = device_id


def parse_request(topic_name: str, payload: bytes) -> BundleRequest:
    """Pure: the request in a ``bundle_req`` message; raises RequestRejected.

    The topic must be a device's ``bundle_req`` channel and the body must name
    that same device.
    """
    try:
        device_id, channel = parse_topic(topic_name)
    except ProtocolError as exc:
        raise RequestRejected(exc.reason, exc.detail) from None
    if channel is not Channel.BUNDLE_REQ:
        raise RequestRejected(
            Reason.BAD_TOPIC, f"{channel.value!r} is not the bundle_req channel", device_id
        )
    try:
        request = decode(payload, BundleRequest)
    except ProtocolError as exc:
        raise RequestRejected(exc.reason, exc.detail, device_id) from None
    if request.device_id != device_id:
        raise RequestRejected(
            Reason.DEVICE_MISMATCH,
            f"body names device {request.device_id!r} on the topic of {device_id!r}",
            device_id,
        )
    return request


@dataclass(frozen=True, slots=True)
class Answer:
    """The frame for one request, and what it was (for the counters)."""

    frame: bytes | bytearray
    data_bytes: int
    error: ChunkErrorCode | None = None


_NOWAIT_UNSUPPORTED = (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def answer(
    files: BundleFiles, request: BundleRequest, *, max_chunk_bytes: int, nowait: bool = False
) -> Answer | None:
    """Read the requested range and frame it; never raises for a bad request.

    Reads at most ``max_chunk_bytes`` straight into the frame's buffer (one
    ``preadv``); the file's size is taken from the open file, so a file retired
    in between is either read whole or reported unknown. With ``nowait`` the
    read uses ``RWF_NOWAIT``: it only takes bytes already in the page cache and
    returns None instead of waiting for the disk (the caller then reads in a
    worker thread), so the event loop never blocks on storage.
    """

    def refuse(code: ChunkErrorCode, detail: str) -> Answer:
        frame = encode_chunk_error(request.bundle, request.offset, request.length, code, detail)
        return Answer(frame, 0, code)

    if request.length > max_chunk_bytes:
        return refuse(
            ChunkErrorCode.TOO_LONG,
            f"length {request.length} exceeds this hub's {max_chunk_bytes}-byte chunk limit",
        )
    try:
        fd = os.open(files.path(request.bundle), os.O_RDONLY)
    except FileNotFoundError:
        return refuse(ChunkErrorCode.UNKNOWN_BUNDLE, f"bundle {request.bundle} is not stored")
    except OSError as exc:
        return refuse(ChunkErrorCode.UNAVAILABLE, f"cannot open the bundle: {exc.strerror}")
    try:
        size = os.fstat(fd).st_size
        if request.offset >= size:
            return refuse(
                ChunkErrorCode.BAD_RANGE,
                f"offset {request.offset} is not before the end of the {size}-byte file",
            )
        want = min(request.length, size - request.offset)
        frame = bytearray(FRAME_HEADER_BYTES + want)
        frame[:FRAME_HEADER_BYTES] = encode_chunk_header(request.bundle, request.offset, want)
        body = memoryview(frame)[FRAME_HEADER_BYTES:]
        if nowait:
            try:
                got = os.preadv(fd, [body], request.offset, os.RWF_NOWAIT)
            except OSError as exc:
                if isinstance(exc, BlockingIOError) or exc.errno in _NOWAIT_UNSUPPORTED:
                    return None
                raise
            return Answer(frame, want) if got == want else None
        got = os.preadv(fd, [body], request.offset)
        if got != want:  # the file shrank under us
            return Answer(encode_chunk(request.bundle, request.offset, bytes(body[:got])), got)
    except OSError as exc:
        return refuse(ChunkErrorCode.UNAVAILABLE, f"cannot read the bundle: {exc.strerror}")
    finally:
        os.close(fd)
    return Answer(frame, want)


class ChunkServer:
    """Serves bundle chunks to devices: the ``bundle_req`` handler of its own session.

    :meth:`attach` registers it on a session (before the session starts); everything
    else runs on that session's event loop.
    """

    def __init__(
        self, *, settings: HubSettings, files: BundleFiles, stats: ChunkServerStats
    ) -> None:
        self.stats = stats
        self._settings = settings
        self._files = files
        self._queues: dict[str, deque[BundleRequest]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None
        self._send: Publish | None = None

    def subscriptions(self) -> list[str]:
        """The one filter it serves: every device's ``bundle_req``, shared by hub replicas."""
        return [shared_subscription(self._settings.mqtt_shared_group, Channel.BUNDLE_REQ)]

    def attach(self, session: MqttSession) -> None:
        """Serve the requests ``session`` receives, answering on it."""
        self._send = session.publish
        session.route(self.subscriptions(), self._on_requests)
        session.on_connect(self._connected)
        session.on_disconnect(self._drop_all)

    async def _connected(self) -> None:
        self._slots = asyncio.Semaphore(self._settings.bundle_serve_concurrency)

    async def _on_requests(self, batch: Sequence[Incoming]) -> None:
        """Queue each request (answered by per-device workers); never waits for an answer."""
        for message in batch:
            self._accept(message.topic, message.payload)

    async def _drop_all(self) -> None:
        dropped = sum(len(q) for q in self._queues.values())
        if dropped:
            self.stats.dropped["disconnected"] += dropped
        self._queues.clear()
        self.stats.queued = 0
        workers, self._workers = self._workers, set()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    # -- requests

    def _accept(self, topic_name: str, payload: bytes) -> None:
        self.stats.requests += 1
        try:
            request = parse_request(topic_name, payload)
        except RequestRejected as exc:
            self.stats.rejected[exc.reason.value] += 1
            log.warning(
                "bundle request rejected",
                extra={
                    "topic": topic_name[:200],
                    "device": exc.device_id,
                    "reason": exc.reason.value,
                    "detail": exc.detail[:300],
                },
            )
            return
        s = self._settings
        queue = self._queues.get(request.device_id)
        if self.stats.queued >= s.bundle_serve_queue_max or (
            queue is not None and len(queue) >= s.bundle_serve_device_queue_max
        ):
            self.stats.dropped[OVERLOADED] += 1
            log.warning(
                "bundle request dropped: queue full",
                extra={"device": request.device_id, "queued": self.stats.queued},
            )
            return
        self.stats.queued += 1
        if queue is not None:
            queue.append(request)
            return
        self._queues[request.device_id] = deque([request])
        worker = asyncio.get_running_loop().create_task(
            self._device_worker(request.device_id),
            name=f"bundle-chunks:{request.device_id}",
        )
        self._workers.add(worker)
        worker.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        self._workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats.internal_errors += 1
            log.error("bundle chunk worker failed", exc_info=task.exception())

    async def _device_worker(self, device_id: str) -> None:
        """Answer one device's requests in arrival order until its queue is empty.

        A chunk is read while the previous one is still being published: the
        publish runs as its own task, started in order (paho queues the PUBLISH
        synchronously when the task first runs, and tasks first run in the order
        they were made), and holds its concurrency slot until the PUBACK.
        """
        assert self._slots is not None
        slots = self._slots
        queue = self._queues[device_id]
        try:
            while queue:
                request = queue.popleft()
                self.stats.queued -= 1
                await slots.acquire()
                try:
                    result = await self._answer(request)
                except BaseException:
                    slots.release()
                    raise
                self._count(request, result)  # before the PUBACK: the device may be faster
                publish = asyncio.get_running_loop().create_task(
                    self._publish(device_id, result.frame)
                )
                self._workers.add(publish)
                publish.add_done_callback(self._worker_done)
        finally:
            # Normally empty; after a failure the rest is dropped (the device asks again),
            # so no request is ever left in a queue without a worker.
            if self._queues.get(device_id) is queue:
                del self._queues[device_id]
                if queue:
                    self.stats.dropped["unsent"] += len(queue)
                    self.stats.queued -= len(queue)

    async def _answer(self, request: BundleRequest) -> Answer:
        """Bytes in the page cache are read on the loop; anything else in a worker thread."""
        max_chunk_bytes = self._settings.bundle_chunk_max_bytes
        cached = answer(self._files, request, max_chunk_bytes=max_chunk_bytes, nowait=True)
        if cached is not None:
            return cached
        result = await asyncio.to_thread(
            answer, self._files, request, max_chunk_bytes=max_chunk_bytes
        )
        assert result is not None
        return result

    async def _publish(self, device_id: str, frame: bytes | bytearray) -> None:
        assert self._slots is not None and self._send is not None
        try:
            await self._send(topic(device_id, Channel.BUNDLE_DATA), frame, qos=1)
        except SessionError as exc:
            self.stats.dropped["unsent"] += 1
            log.info("bundle chunk not published", extra={"device": device_id, "error": str(exc)})
        finally:
            self._slots.release()

    def _count(self, request: BundleRequest, result: Answer) -> None:
        if result.error is None:
            self.stats.chunks_served += 1
            self.stats.bytes_served += result.data_bytes
            return
        self.stats.errors_sent[result.error.label] += 1
        log.warning(
            "bundle request refused",
            extra={
                "device": request.device_id,
                "bundle": request.bundle,
                "offset": request.offset,
                "length": request.length,
                "error": result.error.label,
            },
        )
