"""One virtual device's MQTT 5 session over aiomqtt: the only simulator module that imports it.

Rules:
- One :class:`DeviceLink` is one connection attempt. The Last Will is fixed in
  CONNECT and the agent core sets a fresh Will for every session, so a
  reconnect builds a new link rather than reusing an old one.
- Sessions are persistent: ``clean_start=False`` with a SessionExpiryInterval,
  so the broker keeps the subscription and queues QoS 1 deliveries while the
  device is away, as on a real device (``edge_agent.transport``).
- Every transport failure surfaces as :class:`LinkError` (retry later); no
  aiomqtt or paho type crosses this module's boundary. A publish or subscribe
  waiting for its acknowledgement fails as soon as the connection is lost
  (aiomqtt alone would wait for its timeout), so a device whose link drops
  mid-publish reconnects at once instead of ten seconds later.
- Nothing here touches protocol state: it moves bytes and reports CONNACK's
  session-present flag, SUBACK's verdict and incoming messages in order.
- A message the client received is delivered even if the connection dropped
  right after: paho acknowledged it on receipt, so the broker will not send it
  again, and a device's paho client would have handed it to the agent before
  reporting the disconnect. :meth:`DeviceLink.receive` raises LinkError only
  once nothing received is left.
- ``mqtts://`` is mutual TLS with the device's own ``ssl.SSLContext``
  (``simulator.enroll.DeviceIdentities.tls_context``: its certificate, trusting
  only the fleet CA), handed to each :class:`DeviceLink`; a TLS link without one
  is refused before any connection is attempted.
- A ``slow`` link (``LinkSettings.slow``) is modelled here, in user space, with a
  :class:`simulator.profiles.Shaper` per direction: an outgoing message is handed
  to aiomqtt only when it would have reached the broker, and its PUBACK, a
  SUBACK or CONNACK, counts as an incoming message; an incoming message is
  stamped when aiomqtt queues it and handed to the device when it would have
  arrived. The socket itself is not throttled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from plumbing.net import parse_broker_url
from simulator.profiles import (
    ACK_WIRE_BYTES,
    CONNECT_WIRE_BYTES,
    Shaper,
    SlowSpec,
    publish_wire_bytes,
)

T = TypeVar("T")


class LinkError(Exception):
    """The broker could not be reached, refused us, or the connection dropped; retry later."""


@dataclass(frozen=True)
class LinkSettings:
    """Where to connect and how long anything may take (units in the names)."""

    host: str
    port: int
    keepalive_s: int = 60
    session_expiry_s: int = 3600
    op_timeout_s: float = 10.0
    slow: SlowSpec | None = None  # None: the link runs at loopback speed
    tls: bool = False  # mqtts://: every link needs its device's TLS context

    @classmethod
    def from_url(cls, broker_url: str, **limits: Any) -> LinkSettings:
        """``mqtt://`` or ``mqtts://host:port`` -> settings; raises ValueError for a bad URL."""
        address = parse_broker_url(broker_url)
        return cls(host=address.host, port=address.port, tls=address.tls, **limits)


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retain: bool


class _StampedQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's incoming queue, remembering when each message arrived (monotonic clock)."""

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._stamps: collections.deque[float] = collections.deque()
        self.last_arrival = 0.0  # of the message most recently taken out

    def _put(self, item: aiomqtt.Message) -> None:
        self._stamps.append(time.monotonic())
        super()._put(item)

    def _get(self) -> aiomqtt.Message:
        self.last_arrival = self._stamps.popleft()
        return super()._get()


async def _pass(shaper: Shaper | None, size: int, *, sent_at: float | None = None) -> None:
    """Wait until a message of ``size`` bytes handed to ``shaper`` would have arrived."""
    if shaper is None:
        return
    now = time.monotonic()
    delay = shaper.deliver_at(now if sent_at is None else sent_at, size) - now
    if delay > 0:
        await asyncio.sleep(delay)


class _Client(aiomqtt.Client):
    """aiomqtt with two additions (aiomqtt 2.x callback signatures).

    It keeps CONNACK's session-present flag, which aiomqtt drops; and it tells
    :class:`DeviceLink` when the connection is lost (``on_lost``), because
    aiomqtt's ``publish``/``subscribe`` keep waiting for an acknowledgement
    that can no longer come until their timeout.
    """

    session_present: bool = False
    lost: bool = False
    on_lost: Callable[[], None] | None = None

    def _on_connect(
        self,
        client: Any,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any = None,
    ) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_disconnect(
        self,
        client: Any,
        userdata: Any,
        flags: Any,
        reason_code: Any,
        properties: Any = None,
    ) -> None:
        super()._on_disconnect(client, userdata, flags, reason_code, properties)
        self.forget_failure()
        if not self.lost:
            self.lost = True
            if self.on_lost is not None:
                self.on_lost()

    def forget_failure(self) -> None:
        """Mark the disconnect's exception as seen: a lost link is reported as LinkError
        by :class:`DeviceLink`, and asyncio must not log it as never retrieved."""
        failure = self._disconnected
        if failure.done() and not failure.cancelled():
            failure.exception()

    def connect_without_bind(self, host: str, port: int) -> None:
        """Let the kernel choose the local port at connect time, not at bind time.

        paho opens its socket with ``socket.create_connection(..., source_address=
        (bind_address, bind_port))``, and ``("", 0)`` is a true value, so every socket is
        first bound to an ephemeral port on its own. A port taken by ``bind`` cannot be
        shared with other connections, and the search for one slows down as the range
        fills: with thousands of simulated devices on one host, and as many TIME_WAIT
        sockets after each storm, that ``bind`` took most of a reconnect's CPU
        (docs/benchmarks.md, "Reconnect storm ... where the time goes"). ``connect``
        alone picks the port per destination, reusing loopback TIME_WAIT ports.
        One device on its own host, as in production, never had the problem.
        """
        paho = self._client
        timeout_s = paho.connect_timeout

        def create_socket_connection() -> socket.socket:
            return socket.create_connection((host, port), timeout=timeout_s)

        # paho's own hook for this step (a method); the only paho internal replaced here
        setattr(paho, "_create_socket_connection", create_socket_connection)  # noqa: B010

    def sever(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a pulled cable would."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class DeviceLink:
    """A single MQTT 5 connection for one device id, with its Will fixed at construction."""

    def __init__(
        self,
        client_id: str,
        settings: LinkSettings,
        *,
        will_topic: str,
        will_payload: bytes,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        """``tls_context``: the device's own (mutual TLS); required when ``settings.tls``.

        Raises ValueError when a TLS link has no context, or a plain one has one.
        """
        if settings.tls != (tls_context is not None):
            raise ValueError(
                f"{client_id}: an mqtts:// link needs the device's TLS context, "
                "and only an mqtts:// link takes one"
            )
        self.client_id = client_id
        self.settings = settings
        self._tls_context = tls_context
        self._will = aiomqtt.Will(will_topic, will_payload, qos=1, retain=True)
        self._client: _Client | None = None
        self._open = False
        slow = settings.slow
        self._up = Shaper(slow) if slow is not None else None  # device -> broker
        self._down = Shaper(slow) if slow is not None else None  # broker -> device
        self._queue: _StampedQueue | None = None
        self._waiting: set[asyncio.Task[Any]] = set()  # requests awaiting an acknowledgement

    @property
    def is_open(self) -> bool:
        return self._open

    def _stamped_queue(self, maxsize: int = 0) -> _StampedQueue:
        """aiomqtt's ``queue_type`` hook: build its incoming queue and keep a handle on it."""
        self._queue = _StampedQueue(maxsize)
        return self._queue

    async def open(self) -> bool:
        """Connect and wait for CONNACK; return session-present. Raises LinkError."""
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        await _pass(self._up, CONNECT_WIRE_BYTES)
        client = _Client(
            self.settings.host,
            self.settings.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            will=self._will,
            clean_start=False,
            properties=props,
            keepalive=self.settings.keepalive_s,
            timeout=self.settings.op_timeout_s,
            queue_type=cast("type[asyncio.Queue[aiomqtt.Message]]", self._stamped_queue),
            tls_context=self._tls_context,
        )
        client.on_lost = self._lost
        client.connect_without_bind(self.settings.host, self.settings.port)
        self._client = client
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            client.sever()  # a CONNACK that never came must not leave the socket open
            raise LinkError(f"{self.client_id}: connect failed: {exc}") from exc
        self._open = True
        await _pass(self._down, ACK_WIRE_BYTES)
        return client.session_present

    def _lost(self) -> None:
        """The connection is gone: nothing waiting for an acknowledgement will get one."""
        for task in list(self._waiting):
            task.cancel()

    async def _acknowledged(
        self, client: _Client, call: Callable[[], Awaitable[T]], what: str
    ) -> T:
        """Await ``call()`` (an aiomqtt request that waits for its ack) unless the link is lost.

        The request runs in a task of its own, which :meth:`_lost` cancels when the
        connection drops: the caller gets LinkError at once instead of after aiomqtt's
        timeout, and is never cancelled itself (a cancellation of the caller by anyone
        else propagates as usual). A request that completed anyway returns normally.
        """
        if client.lost:
            raise LinkError(f"{self.client_id}: {what}: connection lost")
        task = asyncio.ensure_future(call())
        self._waiting.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and client.lost and (me is None or not me.cancelling()):
                raise LinkError(f"{self.client_id}: {what}: connection lost") from None
            raise
        except aiomqtt.MqttError as exc:
            raise LinkError(f"{self.client_id}: {what} failed: {exc}") from exc
        finally:
            self._waiting.discard(task)
            if not task.done():
                task.cancel()

    def _require(self) -> _Client:
        if self._client is None or not self._open:
            raise LinkError(f"{self.client_id}: not connected")
        return self._client

    async def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish and, for QoS 1, wait for the PUBACK. Raises LinkError."""
        await _pass(self._up, publish_wire_bytes(topic, len(payload), qos))
        client = self._require()
        await self._acknowledged(
            client,
            lambda: client.publish(topic, payload, qos=qos, retain=retain),
            f"publish to {topic}",
        )
        if qos:
            await _pass(self._down, ACK_WIRE_BYTES)

    async def subscribe(self, *topics: str, qos: int = 1) -> bool:
        """Subscribe to every topic in one SUBSCRIBE and wait for the SUBACK.

        True when every topic was granted. Raises LinkError.
        """
        size = sum(publish_wire_bytes(t, 1, 0) for t in topics)  # SUBSCRIBE: about that size
        await _pass(self._up, size)
        client = self._require()
        wanted: str | list[tuple[str, int]] = (
            topics[0] if len(topics) == 1 else [(t, qos) for t in topics]
        )
        codes = await self._acknowledged(
            client, lambda: client.subscribe(wanted, qos=qos), f"subscribe to {', '.join(topics)}"
        )
        await _pass(self._down, ACK_WIRE_BYTES)
        return all(not getattr(code, "is_failure", False) for code in codes)

    def pending(self) -> int:
        """How many received messages wait to be read (all of them arrived before now)."""
        return len(self._require().messages)

    async def receive(self) -> Incoming:
        """The next message in arrival order; raises LinkError once the connection is gone
        and every message received before that has been handed out."""
        messages = self._require().messages
        queue = self._queue
        if queue is not None and not queue.empty():  # received, whether or not still connected
            message = queue.get_nowait()
        else:
            try:
                message = await anext(messages)
            except aiomqtt.MqttError as exc:
                self._open = False
                raise LinkError(f"{self.client_id}: connection lost: {exc}") from exc
        payload = message.payload
        data = payload if isinstance(payload, bytes) else str(payload or "").encode()
        if self._down is not None and queue is not None:
            size = publish_wire_bytes(message.topic.value, len(data), message.qos)
            await _pass(self._down, size, sent_at=queue.last_arrival)
        return Incoming(message.topic.value, data, bool(message.retain))

    def sever(self) -> None:
        """Fault injection: break the TCP connection so the broker publishes the Will."""
        if self._client is not None and self._open:
            self._client.sever()

    async def close(self) -> None:
        """Orderly DISCONNECT (the broker discards the Will); idempotent, never raises."""
        client, self._client = self._client, None
        was_open, self._open = self._open, False
        if client is not None:
            client.forget_failure()
        if client is None or not was_open:
            return
        with contextlib.suppress(aiomqtt.MqttError, OSError, asyncio.TimeoutError):
            await asyncio.wait_for(client.__aexit__(None, None, None), self.settings.op_timeout_s)
