"""One MQTT session per broker connection: connect, subscribe, dispatch, acknowledge, publish.

Rules:
- An :class:`MqttSession` owns one connection (aiomqtt, MQTT 5) and never dies:
  every failure ends in a jittered exponential backoff (:class:`plumbing.net.Backoff`)
  and another attempt; only :meth:`MqttSession.stop` ends it. A connection that
  stayed up ``stable_after_s`` resets the backoff to its minimum.
- Handlers register by topic filter before the session starts (:meth:`route`).
  On every connect the session subscribes to every filter (QoS 1, one SUBSCRIBE)
  and treats a refused filter (SUBACK reason code >= 0x80) as a failed connection.
- At-least-once: acknowledgements are manual. The session takes every message
  already received (up to ``batch_max``) in one go, hands each handler its
  messages in arrival order, and sends each PUBACK only once that handler
  returned, so a handler that writes the database returns after its commit. A
  handler that raises ends the connection; its messages are not acknowledged,
  and the broker delivers them again (with MQTT 5's Receive Maximum bounding how
  many wait in the hub's memory meanwhile).
- Per connection, in this order: subscribe; the ``on_connect`` hooks, awaited one
  after the other before any message is dispatched; then dispatch and the
  ``while_connected`` tasks run together until one of them ends or raises, which
  ends the connection (they are cancelled); after it, the ``on_disconnect`` hooks.
- :meth:`publish` works only while connected and raises :class:`SessionError`
  when the connection is gone; publishes are queued in paho in call order.
- aiomqtt and paho stay in this module (the manual acknowledgement reaches past
  aiomqtt's public API to paho, here only): handlers see :class:`Incoming` and
  :class:`SessionError`.
- Everything runs on the event loop that started the session; handlers and hooks
  do blocking work in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from plumbing.net import Backoff, BrokerAddress

log = logging.getLogger(__name__)


class SessionError(Exception):
    """The connection is gone (or never came up): what was being sent may not have been."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A message from the broker, as handlers see it."""

    topic: str
    payload: bytes


Handle = Callable[[Sequence[Incoming]], Awaitable[None]]
"""A handler: takes a batch of messages (arrival order) and returns once it is done with
them (committed, answered); only then are they acknowledged."""
Hook = Callable[[], Coroutine[Any, Any, None]]
Publish = Callable[..., Awaitable[None]]
"""``publish(topic, payload, *, qos=1, retain=False)`` of a session."""


class ConnectionCounters(Protocol):
    """The counters a session keeps in its owner's stats (touched on the event loop only)."""

    mqtt_connected: bool
    connects: int
    reconnects: int
    connect_failures: int

    def count_internal_error(self) -> None: ...


@dataclass(frozen=True)
class SessionOptions:
    """How one session connects; limits carry their unit in the name."""

    name: str  # for logs and task names: "link", "bundles"
    client_id: str
    clean_start: bool
    batch_max: int  # messages handed to handlers at once
    keepalive_s: int
    timeout_s: float
    max_inflight_publishes: int
    pending_calls_threshold: int  # aiomqtt warns past this many outstanding calls
    reconnect_min_s: float
    reconnect_max_s: float
    stable_after_s: float
    session_expiry_s: int | None = None  # set: a persistent session the broker keeps
    receive_max_messages: int | None = None  # MQTT 5 Receive Maximum
    tcp_nodelay: bool = False  # small frames leave at once (no Nagle delay)


def filter_pattern(topic_filter: str) -> str:
    """Pure: a regular expression for exactly the topic names ``topic_filter`` matches.

    MQTT 5 section 4.7: ``+`` is one level, a trailing ``#`` any number of levels
    (the parent level included), a wildcard in the first level never matches a topic
    starting with ``$``, and ``$share/<group>/`` is not part of the filter. Raises
    ValueError for a filter that is not one.
    """
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise ValueError(f"bad shared subscription {topic_filter!r}")
        topic_filter = parts[2]
    if not topic_filter:
        raise ValueError("empty topic filter")
    levels = topic_filter.split("/")
    pattern = ""
    for index, level in enumerate(levels):
        if level == "#":
            if index != len(levels) - 1:
                raise ValueError(f"'#' must be the last level: {topic_filter!r}")
            pattern += "(?:/.*)?" if index else ".*"
            break
        if "#" in level or ("+" in level and level != "+"):
            raise ValueError(f"a wildcard must be a whole level: {topic_filter!r}")
        pattern += ("/" if index else "") + ("[^/]*" if level == "+" else re.escape(level))
    if levels[0] in ("+", "#"):
        pattern = r"(?!\$)" + pattern
    return pattern


class _Routes:
    """Which handler a topic goes to: the first route whose filter matches (one regex)."""

    def __init__(self) -> None:
        self.filters: list[str] = []
        self.handles: list[Handle] = []
        self._route_of: dict[str, int] = {}
        self._regex: re.Pattern[str] | None = None

    def add(self, filters: Sequence[str], handle: Handle) -> None:
        index = len(self.handles)
        self.handles.append(handle)
        for topic_filter in filters:
            self._route_of[f"r{len(self.filters)}"] = index
            self.filters.append(topic_filter)
        alternatives = (f"(?P<r{i}>{filter_pattern(f)})" for i, f in enumerate(self.filters))
        self._regex = re.compile("|".join(alternatives))

    def route(self, topic_name: str) -> int:
        """The index of the handler for ``topic_name``; -1 when no filter matches."""
        match = self._regex.fullmatch(topic_name) if self._regex is not None else None
        if match is None or match.lastgroup is None:
            return -1
        return self._route_of[match.lastgroup]


def _given_queue(
    queue: asyncio.Queue[aiomqtt.Message],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's public ``queue_type`` hook, handing it a queue the session holds.

    aiomqtt builds its incoming queue by calling ``queue_type(maxsize=...)``; a
    callable returning ``queue`` lets the dispatcher drain what is already there in
    one go instead of paying ``messages.__anext__`` (a task and an ``asyncio.wait``)
    per message.
    """

    def make(maxsize: int = 0) -> asyncio.Queue[aiomqtt.Message]:
        return queue

    return cast(type[asyncio.Queue[aiomqtt.Message]], make)


def _enable_manual_ack(client: aiomqtt.Client) -> Callable[[int, int], Any]:
    """Switch the client to manual acknowledgements and return its ``ack(mid, qos)``.

    aiomqtt 2.x has no public API for this; paho (underneath) has. This is the only
    place the hub reaches past aiomqtt, and it must run before connecting, because a
    persistent session is delivered right after CONNACK.
    """
    paho_client = client._client
    paho_client.manual_ack_set(True)
    return paho_client.ack


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


def _refused(code: object) -> bool:
    return bool(getattr(code, "is_failure", False)) or (isinstance(code, int) and code >= 0x80)


class MqttSession:
    """One connection to one broker, shared by the handlers registered on it.

    :meth:`route`, :meth:`on_connect`, :meth:`while_connected` and
    :meth:`on_disconnect` are called before :meth:`start`; :meth:`start`,
    :meth:`stop` and :meth:`publish` belong to the event loop that runs the session.
    """

    def __init__(
        self,
        *,
        broker: BrokerAddress,
        options: SessionOptions,
        stats: ConnectionCounters,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.broker = broker
        self.options = options
        self.stats = stats
        self._tls_context = tls_context
        self._routes = _Routes()
        self._on_connect: list[Hook] = []
        self._tasks: list[tuple[str, Hook]] = []
        self._on_disconnect: list[Hook] = []
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    # -- registration (before start) -----------------------------------------------------

    def route(self, filters: Sequence[str], handle: Handle) -> None:
        """Subscribe to ``filters`` (QoS 1) and hand ``handle`` the messages they match."""
        self._check_not_started()
        self._routes.add(filters, handle)

    def on_connect(self, hook: Hook) -> None:
        """Await ``hook`` after every SUBACK, before any message is dispatched."""
        self._check_not_started()
        self._on_connect.append(hook)

    def while_connected(self, name: str, task: Hook) -> None:
        """Run ``task`` for as long as each connection lasts; if it ends, so does the connection."""
        self._check_not_started()
        self._tasks.append((name, task))

    def on_disconnect(self, hook: Hook) -> None:
        """Await ``hook`` after each connection ended (also when the session stops)."""
        self._check_not_started()
        self._on_disconnect.append(hook)

    def _check_not_started(self) -> None:
        if self._task is not None:
            raise RuntimeError("register handlers and hooks before the session starts")

    # -- what others may read or do ------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.options.client_id

    @property
    def subscriptions(self) -> list[str]:
        """Every filter subscribed to on connect, in registration order."""
        return list(self._routes.filters)

    @property
    def connected(self) -> bool:
        return self.stats.mqtt_connected

    async def publish(
        self, topic_name: str, payload: bytes | bytearray, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish on the current connection; returns when the broker acknowledged (QoS 1).

        Raises SessionError when there is no connection or it drops meanwhile. The
        PUBLISH is queued in paho before the first await, so publishes leave in the
        order they were started.
        """
        client = self._client
        if client is None:
            raise SessionError(f"not connected to {self.broker.url}")
        try:
            await client.publish(topic_name, payload, qos=qos, retain=retain)
        except aiomqtt.MqttError as exc:
            raise SessionError(str(exc)) from exc

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the connect loop on the running event loop."""
        if self._task is not None:
            raise RuntimeError(f"mqtt session {self.options.name} already started")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"mqtt-{self.options.name} {self.broker.url}"
        )
        self._task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "mqtt session stopped unexpectedly",
                exc_info=task.exception(),
                extra={"broker": self.broker.url, "connection": self.options.name},
            )

    async def stop(self) -> None:
        """Disconnect (gracefully if possible) and stop reconnecting."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- the connect loop ----------------------------------------------------------------

    def _new_client(self, queue: asyncio.Queue[aiomqtt.Message]) -> aiomqtt.Client:
        o = self.options
        properties: Properties | None = None
        if o.session_expiry_s is not None or o.receive_max_messages is not None:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            if o.session_expiry_s is not None:
                properties.SessionExpiryInterval = o.session_expiry_s
            if o.receive_max_messages is not None:
                properties.ReceiveMaximum = o.receive_max_messages
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=o.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=o.clean_start,
            properties=properties,
            keepalive=o.keepalive_s,
            timeout=o.timeout_s,
            max_inflight_messages=o.max_inflight_publishes,
            queue_type=_given_queue(queue),
            socket_options=(
                [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)] if o.tcp_nodelay else None
            ),
            tls_context=self._tls_context,
        )
        client.pending_calls_threshold = o.pending_calls_threshold
        return client

    async def _run(self) -> None:
        o = self.options
        backoff = Backoff(min_s=o.reconnect_min_s, max_s=o.reconnect_max_s, rng=random.Random())
        loop = asyncio.get_running_loop()
        extra = {"broker": self.broker.url, "connection": o.name, "client_id": o.client_id}
        while True:
            connected_at: float | None = None
            try:
                queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
                client = self._new_client(queue)
                ack = _enable_manual_ack(client)
                async with client:
                    connected_at = loop.time()
                    if self.stats.connects:
                        self.stats.reconnects += 1
                    self.stats.connects += 1
                    self.stats.mqtt_connected = True
                    log.info("mqtt connected", extra=extra)
                    self._client = client
                    try:
                        await self._serve(client, queue, ack)
                    finally:
                        self._client = None
            except (aiomqtt.MqttError, SessionError) as exc:
                if connected_at is None:
                    self.stats.connect_failures += 1
                    log.warning("mqtt connect failed", extra={**extra, "error": str(exc)})
                else:
                    log.warning("mqtt connection lost", extra={**extra, "error": str(exc)})
            except Exception:
                log.exception("mqtt session failed; reconnecting", extra=extra)
                self.stats.count_internal_error()
            finally:
                self.stats.mqtt_connected = False
                if connected_at is not None:
                    await self._disconnected(extra)
            if connected_at is not None and loop.time() - connected_at >= o.stable_after_s:
                backoff.reset()
            delay_s = backoff.next_delay_s()
            log.info("mqtt reconnect scheduled", extra={**extra, "delay_s": round(delay_s, 3)})
            await asyncio.sleep(delay_s)

    async def _disconnected(self, extra: dict[str, str]) -> None:
        for hook in self._on_disconnect:
            try:
                await hook()
            except Exception:
                log.exception("mqtt disconnect hook failed", extra=extra)
                self.stats.count_internal_error()

    async def _serve(
        self,
        client: aiomqtt.Client,
        queue: asyncio.Queue[aiomqtt.Message],
        ack: Callable[[int, int], Any],
    ) -> None:
        """Subscribe, run the connect hooks, then dispatch and the connection's tasks
        until one of them ends."""
        await self._subscribe(client)
        for hook in self._on_connect:
            await hook()
        name = self.options.name
        tasks = [
            asyncio.create_task(self._dispatch(client, queue, ack), name=f"mqtt-{name}-dispatch")
        ]
        tasks += [asyncio.create_task(task(), name=task_name) for task_name, task in self._tasks]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # re-raise the failure that ended the connection
        raise SessionError("a task of the connection ended")

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        filters = self._routes.filters
        if not filters:
            return
        qos1 = SubscribeOptions(qos=1)
        codes = await client.subscribe([(f, qos1) for f in filters])
        for topic_filter, code in zip(filters, codes, strict=True):
            if _refused(code):
                raise SessionError(f"broker refused subscription {topic_filter}: {code}")
        log.info(
            "mqtt subscribed", extra={"connection": self.options.name, "filters": list(filters)}
        )

    async def _dispatch(
        self,
        client: aiomqtt.Client,
        queue: asyncio.Queue[aiomqtt.Message],
        ack: Callable[[int, int], Any],
    ) -> None:
        """Wait for a message, take every message already queued with it (up to
        ``batch_max``), hand each handler its share, and acknowledge each share once
        its handler returned.

        While a handler works (in the database thread, say), paho keeps reading into
        ``queue`` (up to the Receive Maximum), so the next batch grows with the load.
        ``anext`` raises MqttError when the connection drops; messages still queued
        then are not acknowledged, and the broker delivers them again.
        """
        limit = self.options.batch_max
        routes = self._routes
        handles = routes.handles
        messages = client.messages
        while True:
            batch = [await anext(messages)]
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            shares: dict[int, list[aiomqtt.Message]] = {}
            for message in batch:
                shares.setdefault(routes.route(message.topic.value), []).append(message)
            for index in sorted(shares):
                share = shares[index]
                if index < 0:
                    log.warning(
                        "mqtt message on a topic no handler subscribed to; dropped",
                        extra={"connection": self.options.name, "topic": share[0].topic.value},
                    )
                else:
                    await handles[index](
                        [Incoming(m.topic.value, _payload_bytes(m.payload)) for m in share]
                    )
                for message in share:  # only now: at-least-once into what the handler did
                    if message.qos > 0:
                        ack(message.mid, message.qos)
