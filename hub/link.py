"""The hub's MQTT link: one :class:`BrokerLink` per broker connection (aiomqtt, MQTT 5).

Rules:
- The link never dies: every connection failure ends in a jittered exponential
  backoff and another attempt; only cancellation (app shutdown) stops it.
- Persistent session (``clean_start=False`` plus a Session Expiry Interval), so
  QoS 1 messages from devices queue at the broker while the hub restarts.
- At-least-once into the database: the hub acknowledges (PUBACK) a message only
  after the transaction that applied it committed. A crash in between makes the
  broker redeliver it, and the ingest rules make redelivery harmless. With MQTT 5's
  Receive Maximum this also bounds how many messages sit in the hub's memory.
- Subscriptions, renewed on every connect, all QoS 1:
  ``$share/hub/.../+/birth`` and ``$share/hub/.../+/reported`` are *shared*, so
  several hub replicas split that load. ``driftless/v1/devices/+/status`` is *not*
  shared: status is retained, and retained messages are never delivered to shared
  subscriptions (MQTT 5 section 4.8.2), so a hub that (re)subscribes would never
  learn which devices are offline. Every replica therefore gets every status; that
  is harmless because status updates are guarded by the device session (a stale
  one changes nothing) and idempotent.
- Desired state is read from the database at publish time (ARCHITECTURE invariant
  1); the link keeps only a *set* of device ids to publish, so changes made in
  quick succession coalesce and the newest generation always wins (invariant 2).
  Documents go out QoS 1 and retained, sealed by the hub's signer when it has
  one (encoded and signed in the reader's worker thread, off the event loop).
  After every (re)connect the link sweeps: it republishes every out-of-sync
  device, which covers a hub killed between the DB commit and the publish and
  changes made while the broker was unreachable.
  A birth announcing an older generation than the desired one triggers a
  republish too (invariant 3: the broker may have lost its retained store).
- A device id queued for publishing that has no desired document any more
  (deleted device) gets an empty retained payload: the broker drops its copy.
- Nothing a device sends can stop the loop: bad messages are rejected, counted
  and logged; an unexpected error in a batch is logged with its traceback and the
  batch is retried one message at a time so one poisoned message cannot block others.
- With ``desired_poll_s`` set, the link also follows the database's change feed
  (``device.desired_seq``, one value per committing transaction, and deletions
  in ``device_deletion``) so changes made through API-only hub processes
  (``hub serve --no-link``) are published, and deleted devices' retained
  documents cleared, too;
  a change is skipped only if the publisher already read that generation (or a
  newer one) from the database, so nothing is lost to the race and a change
  heard in-process is not published twice.
- With the fleet CA, the link also answers certificate renewals
  (``$share/hub/.../+/cert_req``, :mod:`hub.enrollment.renewal`): each request is
  answered on the device's ``cert`` topic and acknowledged after the answer went out.
- Over TLS (``HubSettings.cuts_off_sessions``), the link also asks the broker to
  close decommissioned devices' open connections (:mod:`hub.enrollment.cutoff`):
  after every connect and whenever it is told of a change, it sends the command
  for every device whose cut-off the database says is unconfirmed (again only
  after a growing pause), and records each confirmation from the broker's answer.
- Metrics (:mod:`hub.metrics`) cost per batch, not per message: each ingest batch
  observes its size and its duration once. Each document published for a change
  heard of (in-process or from the change feed) observes its delivery lag, from the
  change's ``desired_updated_at`` to the PUBACK; republishes (the sweep, a birth
  behind) observe nothing, as they deliver no new change.
- aiomqtt's ``publish()`` does not surface PUBACK reason codes (FIELD-NOTES), so a
  publish the broker refused (e.g. by ACL) looks like success here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy import Engine

import protocols
from hub.bundles.chunks import ChunkServer
from hub.context import Clock
from hub.db import new_session
from hub.devices import store
from hub.devices.rules import DeviceMessage, Reject, Rejected, Stale, classify
from hub.enrollment import cutoff
from hub.enrollment.renewal import renew
from hub.identity import CertificateAuthority
from hub.metrics import HubMetrics, Renewal
from hub.settings import HubSettings
from hub.signing import DocumentSigner
from hub.stats import ChunkServerStats, LinkStats
from plumbing.net import Backoff, BrokerAddress
from protocols import Channel
from protocols.topics import TOPIC_ROOT, shared_subscription, subscription

log = logging.getLogger(__name__)

_STALE_KEYS = {s.value for s in Stale}
_REJECT_DETAILS = {
    Reject.UNKNOWN_DEVICE.value: "device is not registered",
    Reject.DECOMMISSIONED.value: "device is decommissioned",
    Reject.REVOKED_CERTIFICATE.value: "birth from a session of a revoked certificate",
}
_CUTOFF_MAX_WAIT_S = 300.0
_CUTOFF_BATCH = 100


class LinkClosed(aiomqtt.MqttError):
    """A task of the connection ended although it should run until disconnect."""


def _enable_manual_ack(client: aiomqtt.Client) -> Callable[[int, int], Any]:
    """Switch the client to manual acknowledgements and return its ``ack(mid, qos)``.

    aiomqtt 2.x has no public API for this; paho (underneath) has. This is the only
    place the hub reaches past aiomqtt, and it must run before connecting, because a
    persistent session is delivered right after CONNACK.
    """
    paho_client = client._client
    paho_client.manual_ack_set(True)
    return paho_client.ack


_KNOWN_CHANNELS = frozenset(c.value for c in Channel)
_CERT_REQ_SUFFIX = "/" + Channel.CERT_REQ.value
_TOPIC_PREFIX = TOPIC_ROOT + "/"
# A deletion in the change feed outranks any generation read: the retained copy goes.
_DELETED = 2**62


def _channel_label(topic_name: str) -> str:
    """Pure: the channel part of a topic for the ``received`` counters (``other`` if none)."""
    tail = topic_name.rsplit("/", 1)[-1]
    return tail if topic_name.startswith(_TOPIC_PREFIX) and tail in _KNOWN_CHANNELS else "other"


def _given_queue(
    queue: asyncio.Queue[aiomqtt.Message],
) -> type[asyncio.Queue[aiomqtt.Message]]:
    """aiomqtt's public ``queue_type`` hook, handing it a queue the link holds.

    aiomqtt builds its incoming queue by calling ``queue_type(maxsize=...)``; a
    callable returning ``queue`` lets the ingest loop drain what is already
    there in one go instead of paying ``messages.__anext__`` (a task and an
    ``asyncio.wait``) per message.
    """

    def make(maxsize: int = 0) -> asyncio.Queue[aiomqtt.Message]:
        return queue

    return cast(type[asyncio.Queue[aiomqtt.Message]], make)


def link_subscriptions(settings: HubSettings, *, renews: bool) -> list[str]:
    """Pure: the filters the link subscribes to (QoS 1) on every connect.

    ``renews``: the hub holds the fleet CA and answers certificate renewals. The
    list is the one ``docs/protocol.md`` ("Topics") gives; a test compares them.
    """
    group = settings.mqtt_shared_group
    filters = [
        shared_subscription(group, Channel.BIRTH),
        shared_subscription(group, Channel.REPORTED),
        # Not shared: retained status never reaches shared subscriptions (MQTT 5
        # §4.8.2); status is session-guarded, so every replica applying it is harmless.
        subscription(Channel.STATUS),
    ]
    if renews:
        filters.append(shared_subscription(group, Channel.CERT_REQ))
    if settings.cuts_off_sessions:
        filters.append(cutoff.DYNSEC_RESPONSE_TOPIC)
    return filters


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    return b"" if payload is None else str(payload).encode()


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A desired document ready to publish: encoded and, with a signer, sealed."""

    generation: int
    payload: bytes
    changed_at: float  # the row's desired_updated_at (unix seconds)


class BrokerLink:
    """The connection to one broker: ingest of device messages and delivery of desired state.

    Public methods are safe to call from any thread except :meth:`start` and
    :meth:`stop`, which belong to the event loop that runs the link.
    """

    def __init__(
        self,
        *,
        broker: BrokerAddress,
        engine: Engine,
        settings: HubSettings,
        clock: Clock,
        signer: DocumentSigner | None = None,
        metrics: HubMetrics,
        tls_context: ssl.SSLContext | None = None,
        ca: CertificateAuthority | None = None,
        chunk_server: ChunkServer,
    ) -> None:
        self.broker = broker
        self._clock = clock
        self.chunk_server = chunk_server
        self._metrics = metrics
        self._signer = signer
        self._tls_context = tls_context
        self._ca = ca  # set: devices renew their certificates over MQTT (cert_req)
        self.stats = LinkStats(broker=broker.url)
        self._engine = engine
        self._settings = settings
        self._pending: set[str] = set()
        # Pending because their desired state changed (not a sweep or a birth): their
        # next publish observes the delivery lag.
        self._changed: set[str] = set()
        # With the change feed on: the newest generation read for publishing, per device.
        # Set when the publisher reads the row (a worker thread), so a change the feed
        # sees is skipped only if the publisher read that generation or a newer one.
        self._read_generation: dict[str, int] = {}
        self._reading: set[str] = set()  # popped from pending, row not read yet
        self._deferred: dict[str, int] = {}  # feed changes seen for ids being read
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._cutoff_wake: asyncio.Event | None = None
        self._cutoff_asked: dict[str, float] = {}  # device -> loop time last asked
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.stats.mqtt_connected

    @property
    def chunk_stats(self) -> ChunkServerStats:
        return self.chunk_server.stats

    def start(self) -> None:
        """Start the connect loops (the link's and the chunk server's) on the running loop."""
        if self._task is not None:
            raise RuntimeError("link already started")
        self.chunk_server.start()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._cutoff_wake = asyncio.Event()
        self._task = self._loop.create_task(self._run(), name=f"mqtt-link {self.broker.url}")
        self._task.add_done_callback(self._on_task_done)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "mqtt link stopped unexpectedly",
                exc_info=task.exception(),
                extra={"broker": self.broker.url},
            )

    async def stop(self) -> None:
        """Disconnect (gracefully if possible) and stop reconnecting."""
        await self.chunk_server.stop()
        task, self._task = self._task, None
        self._loop = None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def desired_changed(self, device_ids: Iterable[str]) -> None:
        """Thread-safe: these devices' desired state changed (or they were deleted).

        Only a hint: the database already holds the truth. If the link is down the
        ids wait in the pending set, and the on-connect sweep finds them anyway.
        """
        ids = tuple(device_ids)
        loop = self._loop
        if not ids or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._mark_changed, ids)

    def _mark_changed(self, device_ids: Sequence[str]) -> None:
        self._changed.update(device_ids)
        self._mark_pending(device_ids)

    def _mark_pending(self, device_ids: Iterable[str]) -> None:
        self._pending.update(device_ids)
        self.stats.pending_desired = len(self._pending)
        if self._wake is not None and self._pending:
            self._wake.set()
        if self._cutoff_wake is not None:  # a decommission is a desired change too
            self._cutoff_wake.set()

    # -- connect loop --------------------------------------------------------------------

    def _new_client(self, queue: asyncio.Queue[aiomqtt.Message]) -> aiomqtt.Client:
        s = self._settings
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = s.mqtt_session_expiry_s
        properties.ReceiveMaximum = s.mqtt_receive_max_messages
        client = aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=s.mqtt_client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            clean_start=False,
            properties=properties,
            keepalive=s.mqtt_keepalive_s,
            timeout=s.mqtt_timeout_s,
            max_inflight_messages=s.mqtt_max_inflight_publishes,
            queue_type=_given_queue(queue),
            tls_context=self._tls_context,
        )
        # aiomqtt warns past this many outstanding calls; we allow that many on purpose.
        client.pending_calls_threshold = s.mqtt_max_inflight_publishes + 10
        return client

    async def _run(self) -> None:
        s = self._settings
        backoff = Backoff(
            min_s=s.mqtt_reconnect_min_s, max_s=s.mqtt_reconnect_max_s, rng=random.Random()
        )
        loop = asyncio.get_running_loop()
        extra = {"broker": self.broker.url}
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
                    await self._serve_connection(client, queue, ack)
            except aiomqtt.MqttError as exc:
                if connected_at is None:
                    self.stats.connect_failures += 1
                    log.warning("mqtt connect failed", extra={**extra, "error": str(exc)})
                else:
                    log.warning("mqtt connection lost", extra={**extra, "error": str(exc)})
            except Exception:
                log.exception("mqtt link failed; reconnecting", extra=extra)
                self.stats.errors["internal_error"] += 1
            finally:
                self.stats.mqtt_connected = False
            if connected_at is not None and loop.time() - connected_at >= s.mqtt_stable_after_s:
                backoff.reset()
            delay_s = backoff.next_delay_s()
            log.info("mqtt reconnect scheduled", extra={**extra, "delay_s": round(delay_s, 3)})
            await asyncio.sleep(delay_s)

    async def _serve_connection(
        self,
        client: aiomqtt.Client,
        queue: asyncio.Queue[aiomqtt.Message],
        ack: Callable[[int, int], Any],
    ) -> None:
        """Subscribe, sweep, then run ingest and publisher until one fails."""
        await self._subscribe(client)
        ids = await asyncio.to_thread(self._out_of_sync_ids)
        self.stats.sweeps += 1
        log.info("sweep: republishing out-of-sync devices", extra={"devices": len(ids)})
        self._mark_pending(ids)
        tasks = [
            asyncio.create_task(self._ingest_loop(client, queue, ack), name="mqtt-ingest"),
            asyncio.create_task(self._publish_loop(client), name="mqtt-publish"),
        ]
        if self._settings.desired_poll_s > 0:
            tasks.append(asyncio.create_task(self._poll_changes(), name="desired-feed"))
        if self._settings.cuts_off_sessions:
            tasks.append(asyncio.create_task(self._cutoff_loop(client), name="broker-cutoff"))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # re-raise the failure that ended the connection
        raise LinkClosed("a link task ended")

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        qos1 = SubscribeOptions(qos=1)
        filters = link_subscriptions(self._settings, renews=self._ca is not None)
        codes = await client.subscribe([(f, qos1) for f in filters])
        for topic_filter, code in zip(filters, codes, strict=True):
            if getattr(code, "is_failure", False) or (isinstance(code, int) and code >= 0x80):
                raise aiomqtt.MqttError(f"broker refused subscription {topic_filter}: {code}")
        log.info("mqtt subscribed", extra={"filters": filters})

    # -- ingest --------------------------------------------------------------------------

    async def _ingest_loop(
        self,
        client: aiomqtt.Client,
        queue: asyncio.Queue[aiomqtt.Message],
        ack: Callable[[int, int], Any],
    ) -> None:
        """Wait for a message, take every message already queued with it (up to
        ``ingest_batch_max``), apply them in one transaction, then acknowledge them.

        While a batch is in the database thread, paho keeps reading into ``queue``
        (up to the Receive Maximum), so the next batch grows with the load.
        ``anext`` raises MqttError when the connection drops; messages still
        queued then are not acknowledged, and the broker redelivers them.
        """
        limit = self._settings.ingest_batch_max
        messages = client.messages
        while True:
            batch = [await anext(messages)]
            while len(batch) < limit and not queue.empty():
                batch.append(queue.get_nowait())
            renewals = [m for m in batch if m.topic.value.endswith(_CERT_REQ_SUFFIX)]
            if renewals:
                batch = [m for m in batch if not m.topic.value.endswith(_CERT_REQ_SUFFIX)]
                for message in renewals:
                    await self._renew(client, message)
                    if message.qos > 0:
                        ack(message.mid, message.qos)
            answers = [m for m in batch if m.topic.value == cutoff.DYNSEC_RESPONSE_TOPIC]
            if answers:
                batch = [m for m in batch if m.topic.value != cutoff.DYNSEC_RESPONSE_TOPIC]
                for message in answers:
                    await self._on_cutoff_answer(_payload_bytes(message.payload))
                    if message.qos > 0:
                        ack(message.mid, message.qos)
            if batch:
                await self._ingest(batch)
            for message in batch:  # only after the commit: at-least-once into the DB
                if message.qos > 0:
                    ack(message.mid, message.qos)

    async def _ingest(self, batch: Sequence[aiomqtt.Message]) -> None:
        started = time.perf_counter()
        now = self._clock()
        decoded: list[tuple[str, DeviceMessage]] = []
        received = self.stats.received
        received["total"] += len(batch)
        for raw in batch:
            topic_name = raw.topic.value
            received[_channel_label(topic_name)] += 1
            try:
                decoded.append((topic_name, classify(topic_name, _payload_bytes(raw.payload))))
            except Rejected as exc:
                self._reject(topic_name, exc.device_id, exc.reason, exc.detail)
        if not decoded:
            return
        self.stats.ingest_batches += 1
        self.stats.ingest_batch_max_seen = max(self.stats.ingest_batch_max_seen, len(decoded))
        outcomes, republish = await self._apply(decoded, now)
        self._metrics.observe_ingest_batch(
            messages=len(decoded), duration_s=time.perf_counter() - started
        )
        debug = log.isEnabledFor(logging.DEBUG)
        for (topic_name, message), outcome in zip(decoded, outcomes, strict=True):
            if outcome == store.APPLIED:
                self.stats.applied += 1
                if debug:
                    log.debug(
                        "device message applied",
                        extra={"device": message.device_id, "topic": topic_name},
                    )
            elif outcome in _STALE_KEYS:
                self.stats.stale[outcome] += 1
                log.info(
                    "stale device message ignored",
                    extra={"device": message.device_id, "topic": topic_name, "reason": outcome},
                )
            elif outcome is not None and outcome in _REJECT_DETAILS:
                self._reject(topic_name, message.device_id, outcome, _REJECT_DETAILS[outcome])
        if republish:
            log.info("republishing desired after birth", extra={"devices": republish})
            self._mark_pending(republish)

    async def _apply(
        self, decoded: Sequence[tuple[str, DeviceMessage]], now: datetime
    ) -> tuple[list[str | None], list[str]]:
        """Apply in one transaction; on an unexpected error, retry one message at a time."""
        messages = [message for _, message in decoded]
        try:
            result = await asyncio.to_thread(self._apply_sync, messages, now)
        except Exception:
            log.exception(
                "ingest batch failed; retrying message by message",
                extra={"messages": len(messages)},
            )
        else:
            return list(result.outcomes), result.republish
        outcomes: list[str | None] = []
        republish: list[str] = []
        for topic_name, message in decoded:
            try:
                one = await asyncio.to_thread(self._apply_sync, [message], now)
            except Exception:
                self.stats.errors["internal_error"] += 1
                log.exception(
                    "ingest failed for a message; dropped",
                    extra={"device": message.device_id, "topic": topic_name},
                )
                outcomes.append(None)
            else:
                outcomes.append(one.outcomes[0])
                republish.extend(one.republish)
        return outcomes, republish

    def _apply_sync(self, messages: Sequence[DeviceMessage], now: datetime) -> store.ApplyResult:
        with new_session(self._engine) as session:
            return store.apply_messages(session, messages, now=now)

    def _out_of_sync_ids(self) -> list[str]:
        with new_session(self._engine) as session:
            return store.out_of_sync_ids(session)

    def _reject(self, topic_name: str, device_id: str | None, reason: str, detail: str) -> None:
        self.stats.rejected[reason] += 1
        log.warning(
            "device message rejected",
            extra={
                "topic": topic_name[:200],
                "device": device_id,
                "reason": reason,
                "detail": detail[:300],
            },
        )

    # -- the change feed (API-only processes) --------------------------------------------

    async def _poll_changes(self) -> None:
        """Publish changes other processes committed: poll ``desired_seq`` past a mark.

        Starts at the feed's current mark (the on-connect sweep covered what came
        before). A device already published at that generation or later is skipped,
        so a change this process also heard about in-process goes out once.
        """
        mark = await asyncio.to_thread(self._feed_mark)
        while True:
            await asyncio.sleep(self._settings.desired_poll_s)
            changes, mark = await asyncio.to_thread(self._feed_since, mark)
            fresh = []
            for device_id, changed in changes:
                generation = _DELETED if changed is None else changed
                if changed is None:  # a device registered again starts from generation 1
                    self._read_generation.pop(device_id, None)
                if device_id in self._pending:
                    continue  # the publisher will read the newest row anyway
                if device_id in self._reading:  # decided when that read is done
                    self._deferred[device_id] = max(generation, self._deferred.get(device_id, 0))
                elif self._read_generation.get(device_id, 0) < generation:
                    fresh.append(device_id)
            if fresh:
                self.stats.feed_changes += len(fresh)
                self._mark_changed(fresh)

    def _feed_mark(self) -> int:
        with new_session(self._engine) as session:
            return store.desired_seq_now(session)

    def _feed_since(self, mark: int) -> tuple[list[tuple[str, int | None]], int]:
        with new_session(self._engine) as session:
            return store.desired_changes_since(
                session, seq=mark, limit=self._settings.publish_batch_max * 20
            )

    # -- cutting off decommissioned devices ----------------------------------------------

    async def _cutoff_loop(self, client: aiomqtt.Client) -> None:
        """Ask the broker to close the connections of every decommissioned device whose
        cut-off is unconfirmed: at once on connect, then when woken (at most twice a
        second), asking again for one device only after a pause that doubles."""
        assert self._cutoff_wake is not None
        loop = asyncio.get_running_loop()
        self._cutoff_asked.clear()  # a new connection: ask again for everything pending
        pause_s = self._settings.broker_cutoff_retry_s
        while True:
            self._cutoff_wake.clear()
            pending = await asyncio.to_thread(self._pending_cutoffs)
            now = loop.time()
            due = [d for d in pending if now - self._cutoff_asked.get(d, -1e9) >= pause_s]
            if due:
                for device_id in due:
                    self._cutoff_asked[device_id] = now
                await client.publish(cutoff.DYNSEC_TOPIC, cutoff.commands(due), qos=1)
                self.stats.cutoffs_requested += len(due)
                log.info(
                    "asked the broker to cut off decommissioned devices", extra={"devices": due}
                )
            if pending and not due:
                pause_s = min(pause_s * 2, _CUTOFF_MAX_WAIT_S)
            elif not pending:
                pause_s = self._settings.broker_cutoff_retry_s
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cutoff_wake.wait(), pause_s if pending else None)
            await asyncio.sleep(0.5)  # a burst of changes costs one look, not one each

    def _pending_cutoffs(self) -> list[str]:
        with new_session(self._engine) as session:
            return store.pending_cut_offs(session, limit=_CUTOFF_BATCH)

    async def _on_cutoff_answer(self, payload: bytes) -> None:
        """Record what the broker confirmed; count and log what it refused."""
        try:
            answer = cutoff.read_answer(payload)
        except ValueError as exc:
            self.stats.rejected["bad_control_response"] += 1
            log.warning("broker control answer not understood", extra={"error": str(exc)})
            return
        for device_id, error in answer.failed.items():
            self.stats.cutoff_errors[error] += 1
            log.warning(
                "broker refused to cut off a device; will ask again",
                extra={"device": device_id, "error": error},
            )
        if not answer.cut_off:
            return
        now = self._clock()
        confirmed = await asyncio.to_thread(self._confirm_cutoffs, answer.cut_off, now)
        self.stats.cutoffs_confirmed += len(confirmed)
        for device_id in confirmed:
            self._cutoff_asked.pop(device_id, None)
            log.info(
                "broker closed the decommissioned device's connections", extra={"device": device_id}
            )

    def _confirm_cutoffs(self, device_ids: list[str], now: datetime) -> list[str]:
        with new_session(self._engine) as session:
            return store.confirm_cut_offs(session, device_ids=device_ids, now=now)

    # -- certificate renewal -------------------------------------------------------------

    async def _renew(self, client: aiomqtt.Client, raw: aiomqtt.Message) -> None:
        """Answer one ``cert_req`` (hub.enrollment.renewal); bad requests are rejected."""
        topic_name = raw.topic.value
        self.stats.received["total"] += 1
        self.stats.received[Channel.CERT_REQ.value] += 1
        try:
            device_id, _ = protocols.parse_topic(topic_name)
            request = protocols.decode(_payload_bytes(raw.payload), protocols.CertRequest)
            if request.device_id != device_id:
                raise protocols.ProtocolError(
                    protocols.Reason.DEVICE_MISMATCH,
                    f"body names {request.device_id!r} on {device_id!r}'s topic",
                )
        except protocols.ProtocolError as exc:
            self._reject(topic_name, None, exc.reason.value, exc.detail)
            return
        assert self._ca is not None
        answer = await asyncio.to_thread(self._renew_sync, request)
        outcome = Renewal.REFUSED if answer.error is not None else Renewal.GRANTED
        self.stats.renewals[outcome.value] += 1
        await client.publish(
            protocols.topic(device_id, Channel.CERT), protocols.encode(answer), qos=1
        )

    def _renew_sync(self, request: protocols.CertRequest) -> protocols.CertIssued:
        assert self._ca is not None
        s = self._settings
        with new_session(self._engine) as session:
            return renew(
                session,
                self._ca,
                request=request,
                now=self._clock(),
                validity_days=s.device_cert_validity_days,
                min_interval_s=s.cert_renew_min_interval_s,
            )

    # -- desired delivery ----------------------------------------------------------------

    async def _publish_loop(self, client: aiomqtt.Client) -> None:
        assert self._wake is not None
        limit = self._settings.publish_batch_max
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            ids = [self._pending.pop() for _ in range(min(limit, len(self._pending)))]
            self.stats.pending_desired = len(self._pending)
            self._reading.update(ids)
            try:
                documents = await asyncio.to_thread(self._documents, ids)
            except Exception:
                self.stats.errors["internal_error"] += 1
                log.exception("reading desired documents failed; will retry")
                self._mark_pending(ids)
                await asyncio.sleep(self._settings.mqtt_reconnect_max_s)
                continue
            finally:
                self._done_reading(ids)
            await self._publish_documents(client, documents)

    def _done_reading(self, ids: Sequence[str]) -> None:
        """Re-queue a device the feed saw change while its row was being read, if newer."""
        self._reading.difference_update(ids)
        for device_id in ids:
            generation = self._deferred.pop(device_id, None)
            if generation is not None and self._read_generation.get(device_id, 0) < generation:
                self._mark_pending([device_id])

    def _documents(self, device_ids: Sequence[str]) -> dict[str, _Outgoing | None]:
        """Worker thread: read the newest documents, encode and (with a signer) seal them."""
        with new_session(self._engine) as session:
            documents = store.desired_documents(session, device_ids=device_ids)
        out: dict[str, _Outgoing | None] = {}
        for device_id, document in documents.items():
            if document is None:
                self._read_generation.pop(device_id, None)
                out[device_id] = None
                continue
            if self._settings.desired_poll_s > 0:
                self._read_generation[device_id] = document.generation
            payload = protocols.encode(document)
            if self._signer is not None:
                payload = self._signer.seal(payload)
            out[device_id] = _Outgoing(document.generation, payload, document.issued_at)
        return out

    async def _publish_documents(
        self, client: aiomqtt.Client, documents: dict[str, _Outgoing | None]
    ) -> None:
        slots = asyncio.Semaphore(self._settings.mqtt_max_inflight_publishes)

        async def publish_one(device_id: str, document: _Outgoing | None) -> None:
            payload = b"" if document is None else document.payload
            async with slots:
                await client.publish(
                    protocols.topic(device_id, Channel.DESIRED), payload, qos=1, retain=True
                )
            if device_id in self._changed:
                self._changed.discard(device_id)
                if document is not None:
                    self._metrics.observe_delivery_lag(
                        self._clock().timestamp() - document.changed_at
                    )
            if document is None:
                self.stats.desired_cleared += 1
                log.info("retained desired cleared", extra={"device": device_id})
            else:
                self.stats.desired_published += 1
                log.debug(  # per device: a fleet-wide change would flood info logs
                    "desired published",
                    extra={"device": device_id, "generation": document.generation},
                )

        items = list(documents.items())
        results = await asyncio.gather(
            *(publish_one(device_id, document) for device_id, document in items),
            return_exceptions=True,
        )
        lost: list[str] = []
        first_mqtt_error: aiomqtt.MqttError | None = None
        for (device_id, _), result in zip(items, results, strict=True):
            if isinstance(result, aiomqtt.MqttError):
                lost.append(device_id)
                first_mqtt_error = first_mqtt_error or result
            elif isinstance(result, BaseException):
                self.stats.errors["internal_error"] += 1
                log.error(
                    "desired not published",
                    exc_info=result,
                    extra={"device": device_id},
                )
        if len(items) > len(lost):
            log.info("desired batch published", extra={"devices": len(items) - len(lost)})
        if lost:
            self.stats.publish_failures += len(lost)
            self._mark_pending(lost)  # retried after the reconnect (the sweep would too)
            raise first_mqtt_error or LinkClosed("publish failed")
