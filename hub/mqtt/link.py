"""The hub's link to one broker: its sessions and everything registered on them.

Rules:
- One :class:`BrokerLink` per broker (today one; docs/architecture.md: nothing
  assumes a single broker). It holds two :class:`~hub.mqtt.session.MqttSession`:
  - the **link session** (client id ``mqtt_client_id``): a persistent session
    (``clean_start=False`` plus a Session Expiry Interval), so QoS 1 messages from
    devices queue at the broker while the hub restarts, with MQTT 5's Receive
    Maximum bounding what sits unacknowledged in the hub's memory. Registered on
    it, in this order (the subscriptions ``docs/protocol.md`` lists,
    :func:`link_subscriptions`): ingest of births, reports and status
    (:mod:`hub.devices.ingest`), certificate renewal when the hub holds the fleet
    CA (:mod:`hub.enrollment.renewal`), the broker cut-off over TLS
    (:mod:`hub.controllers.cutoff`), placement, liveness (devices silent past their
    missed heartbeats, :mod:`hub.controllers.liveness`), and delivery of desired documents with its
    reconnect sweep and change-feed poller (:mod:`hub.devices.delivery`).
  - the **chunk session** (client id ``<mqtt_client_id>-bundles``), a second
    instance of the same class, for the chunk server alone
    (:mod:`hub.bundles.chunks`). It has reasons to be separate: bulk chunk
    traffic (up to ``bundle_chunk_max_bytes`` a frame, many in flight) must not
    queue in front of ingest's PUBACKs and desired publishes on one socket and
    in one paho client, nor share the link's Receive Maximum; it wants a clean
    session (an unanswered request is asked again; nothing to keep across
    restarts) and TCP_NODELAY for small frames; and it connects under its own
    certificate name, which the broker's ACL knows.
- :meth:`BrokerLink.desired_changed` is the :class:`~hub.devices.desired.DeliverySignal`
  the desired-state service calls after a commit (thread-safe). With what the
  change feed finds, it goes through one fan-out on the event loop: delivery
  publishes the devices' newest documents, and every controller is woken (a
  decommission is a desired change, and the cut-off controller acts on it).
- :meth:`start` and :meth:`stop` belong to the event loop that runs the link; the
  API works while the broker is unreachable (both sessions keep retrying).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterable, Sequence

from sqlalchemy import Engine

from hub.broker_config import CLIENT_ID_SUFFIX
from hub.bundles.chunks import ChunkServer
from hub.bundles.files import BundleFiles
from hub.context import Clock
from hub.controllers.cutoff.driver import CutoffController
from hub.controllers.cutoff.plan import DYNSEC_RESPONSE_TOPIC
from hub.controllers.jobs.driver import JobsController
from hub.controllers.liveness.driver import LivenessController
from hub.controllers.loop import Controller
from hub.controllers.placement.driver import PlacementController
from hub.controllers.rollout.driver import RolloutController
from hub.controllers.schedules.driver import ScheduleController
from hub.devices.delivery import Delivery
from hub.devices.ingest import IngestHandler, ingest_subscriptions
from hub.enrollment.renewal import RenewalHandler
from hub.identity import CertificateAuthority
from hub.metrics import HubMetrics
from hub.mqtt.session import MqttSession, SessionOptions
from hub.settings import HubSettings
from hub.signing import DocumentSigner
from hub.stats import ChunkServerStats, LinkStats
from plumbing.net import BrokerAddress
from protocols import Channel
from protocols.topics import shared_subscription


def link_subscriptions(settings: HubSettings, *, renews: bool) -> list[str]:
    """Pure: the filters the link session subscribes to (QoS 1) on every connect.

    ``renews``: the hub holds the fleet CA and answers certificate renewals. The
    list is the one ``docs/protocol.md`` ("Topics") gives; a test compares them, and
    another that a built link subscribes to exactly these.
    """
    filters = ingest_subscriptions(settings)
    if renews:
        filters.append(shared_subscription(settings.mqtt_shared_group, Channel.CERT_REQ))
    if settings.cuts_off_sessions:
        filters.append(DYNSEC_RESPONSE_TOPIC)
    return filters


def link_options(settings: HubSettings) -> SessionOptions:
    """Pure: how the link session connects (persistent, Receive Maximum)."""
    s = settings
    return SessionOptions(
        name="link",
        client_id=s.mqtt_client_id,
        clean_start=False,
        batch_max=s.ingest_batch_max,
        keepalive_s=s.mqtt_keepalive_s,
        timeout_s=s.mqtt_timeout_s,
        max_inflight_publishes=s.mqtt_max_inflight_publishes,
        # aiomqtt warns past this many outstanding calls; we allow that many on purpose.
        pending_calls_threshold=s.mqtt_max_inflight_publishes + 10,
        reconnect_min_s=s.mqtt_reconnect_min_s,
        reconnect_max_s=s.mqtt_reconnect_max_s,
        stable_after_s=s.mqtt_stable_after_s,
        session_expiry_s=s.mqtt_session_expiry_s,
        receive_max_messages=s.mqtt_receive_max_messages,
    )


def chunk_options(settings: HubSettings) -> SessionOptions:
    """Pure: how the chunk server's session connects (clean, TCP_NODELAY)."""
    s = settings
    return SessionOptions(
        name="bundles",
        client_id=s.mqtt_client_id + CLIENT_ID_SUFFIX,
        clean_start=True,
        batch_max=s.bundle_serve_queue_max,  # requests are only queued when taken
        keepalive_s=s.mqtt_keepalive_s,
        timeout_s=s.mqtt_timeout_s,
        max_inflight_publishes=s.mqtt_max_inflight_publishes,
        pending_calls_threshold=s.bundle_serve_concurrency + s.mqtt_max_inflight_publishes,
        reconnect_min_s=s.mqtt_reconnect_min_s,
        reconnect_max_s=s.mqtt_reconnect_max_s,
        stable_after_s=s.mqtt_stable_after_s,
        # Nagle's algorithm would hold small frames for the peer's delayed ACK.
        tcp_nodelay=True,
    )


class BrokerLink:
    """Everything the hub does on one broker (see the module rules).

    :meth:`desired_changed` is safe to call from any thread; :meth:`start` and
    :meth:`stop` belong to the event loop that runs the link.
    """

    def __init__(
        self,
        *,
        broker: BrokerAddress,
        engine: Engine,
        settings: HubSettings,
        clock: Clock,
        metrics: HubMetrics,
        bundle_files: BundleFiles,
        signer: DocumentSigner | None = None,
        ca: CertificateAuthority | None = None,
        tls_context: ssl.SSLContext | None = None,
        chunks_tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.broker = broker
        self.stats = LinkStats(broker=broker.url)
        self.session = MqttSession(
            broker=broker, options=link_options(settings), stats=self.stats, tls_context=tls_context
        )
        self.delivery = Delivery(
            engine=engine,
            settings=settings,
            stats=self.stats,
            metrics=metrics,
            clock=clock,
            signer=signer,
            on_feed=self._changed,
        )
        ingest = IngestHandler(
            engine=engine,
            settings=settings,
            stats=self.stats,
            metrics=metrics,
            clock=clock,
            republish=self.delivery.republish,
        )
        self.session.route(ingest.subscriptions(), ingest.handle)
        if ca is not None:  # devices renew their certificates over MQTT (cert_req)
            RenewalHandler(
                engine=engine, ca=ca, settings=settings, stats=self.stats, clock=clock
            ).attach(self.session)
        self._controllers: list[Controller] = []
        if settings.cuts_off_sessions:
            self._controllers.append(
                CutoffController(engine=engine, settings=settings, stats=self.stats, clock=clock)
            )
        self.placement = PlacementController(
            engine=engine, settings=settings, clock=clock, delivery=self
        )
        self._controllers.append(self.placement)
        self.rollouts = RolloutController(
            engine=engine, settings=settings, clock=clock, delivery=self
        )
        self._controllers.append(self.rollouts)
        self.jobs = JobsController(engine=engine, settings=settings, clock=clock, delivery=self)
        self._controllers.append(self.jobs)
        # Maintenance windows: each fire wakes the controllers (the rollout controller's
        # windows open); the scheduler's own wake is a cheap look at the table.
        self.schedules = ScheduleController(engine=engine, clock=clock, wake=self._wake_controllers)
        self._controllers.append(self.schedules)
        self.liveness = LivenessController(engine=engine, settings=settings, clock=clock)
        self._controllers.append(self.liveness)
        for controller in self._controllers:
            controller.attach(self.session)
        self.delivery.attach(self.session)

        self._chunk_stats = ChunkServerStats()
        self.chunk_server = ChunkServer(
            settings=settings, files=bundle_files, stats=self._chunk_stats
        )
        self.chunk_session = MqttSession(
            broker=broker,
            options=chunk_options(settings),
            stats=self._chunk_stats,
            tls_context=chunks_tls_context,
        )
        self.chunk_server.attach(self.chunk_session)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- what the API reads (hub.context.LinkStatus) -------------------------------------

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def chunk_stats(self) -> ChunkServerStats:
        return self._chunk_stats

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start both sessions on the running event loop."""
        if self._loop is not None:
            raise RuntimeError("link already started")
        self._loop = asyncio.get_running_loop()
        self.session.start()
        self.chunk_session.start()

    async def stop(self) -> None:
        """Disconnect both sessions (gracefully if possible) and stop reconnecting."""
        self._loop = None
        await self.chunk_session.stop()
        await self.session.stop()

    # -- the delivery signal -------------------------------------------------------------

    def desired_changed(self, device_ids: Iterable[str]) -> None:
        """Thread-safe: these devices' desired state changed (or they were deleted).

        Only a hint: the database already holds the truth. If the link is down the
        ids wait in delivery's set, and the on-connect sweep finds them anyway.
        """
        ids = tuple(device_ids)
        loop = self._loop
        if not ids or loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._changed, ids)

    def fleet_changed(self) -> None:
        """Thread-safe: devices were registered; wake the controllers (placement)."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self._wake_controllers)

    def _wake_controllers(self) -> None:
        for controller in self._controllers:
            controller.wake()

    def _changed(self, device_ids: Sequence[str]) -> None:
        """On the event loop: a committed desired change, heard in-process or in the feed."""
        self.delivery.changed(device_ids)
        for controller in self._controllers:
            controller.wake()
