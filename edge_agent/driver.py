"""The agent process: feeds transport events and apply results to the core, runs its actions.

Rules:
- The core is touched under one lock, from the network thread (MQTT callbacks)
  and the apply worker; actions are executed in order under that lock, so a
  state is persisted before the report that announces it is published.
- Reconnects use jittered exponential backoff (``MqttSettings``: 0.2 s doubling
  to 30 s, reset once a connection is accepted) and a fresh session number,
  hence a fresh Last Will, on every attempt.
- SIGTERM/SIGINT: publish "offline" for the current session, disconnect, exit 0.
- One subscription request covers ``desired`` and ``bundle_data``; the core
  hears ``Subscribed`` (and a bundle transfer hears "link up") only once both
  are granted.
- The fetch step (``Fetch``/``CancelFetch``) runs in its own thread
  (``edge_agent.fetcher``), created the first time a desired document
  references bundles, so an agent that never sees a bundle never loads the
  verification stack. Its result comes back to the core as ``FetchDone``.
- An agent connected with its enrolled certificate renews it over MQTT when due
  (``edge_agent.renewal``: its dates are looked at once a minute while subscribed),
  then reconnects with the new one.
- ``--root`` is read once at start; an unreadable or invalid root stops the
  start (exit 2): a device must not run with a trust anchor it cannot check.
  Without ``--root`` the agent starts only when told ``--insecure-unsigned``
  (exit 2 otherwise), and then takes desired documents unverified.
"""

from __future__ import annotations

import logging
import queue
import signal
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import msgspec

import plumbing
from edge_agent.core import (
    AgentCore,
    Apply,
    ApplyDone,
    Booted,
    CancelFetch,
    Connected,
    Connecting,
    DesiredPayload,
    Disconnected,
    Event,
    Fetch,
    FetchDone,
    Ignored,
    PersistState,
    Publish,
    Rejected,
    SetWill,
    Stopping,
    Subscribed,
)
from edge_agent.enroll import Identity, tls_context
from edge_agent.inventory import collect as collect_inventory
from edge_agent.renewal import DEFAULT_RENEW_AT_FRACTION, Renewal
from edge_agent.runtime import Applier, ApplyError, WorkloadApplier
from edge_agent.settings import BundleSettings, MqttSettings
from edge_agent.store import StateStore, remove_stale_temporaries
from edge_agent.transport import (
    MqttTransport,
    TConnected,
    TConnectRefused,
    TDisconnected,
    TMessage,
    TransportError,
    TransportEvent,
    TSubscribed,
)
from plumbing.net import Backoff
from protocols import Channel, Desired, bundle_references, topic

if TYPE_CHECKING:
    from edge_agent.fetcher import Fetcher, FetchStats, MqttSource
    from firmware_bundles.trust import TrustedRoot

log = logging.getLogger("driftless.agent")
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"


class RootFileError(Exception):
    """The ``--root`` file cannot be read or is not a valid, self-signed root."""


def load_trusted_root(path: Path) -> TrustedRoot:
    """Read the device's trust anchor; raises RootFileError with a one-line reason."""
    from firmware_bundles.errors import BundleError
    from firmware_bundles.limits import DEFAULT_LIMITS
    from firmware_bundles.trust import TrustedRoot

    try:
        with open(path, "rb") as handle:
            data = handle.read(DEFAULT_LIMITS.max_metadata_bytes + 1)
    except OSError as exc:
        raise RootFileError(f"cannot read root {path}: {exc.strerror or exc}") from None
    try:
        return TrustedRoot.from_bytes(data)
    except BundleError as exc:
        raise RootFileError(f"root {path} is invalid: {type(exc).__name__}: {exc}") from None


class AgentDriver:
    """One device's agent: core + store + applier + MQTT transport."""

    def __init__(
        self,
        *,
        device_id: str,
        broker_url: str,
        data_dir: Path,
        applier: Applier | None = None,
        bundles: BundleSettings | None = None,
        trusted_root: TrustedRoot | None = None,
        clock: Callable[[], float] = time.time,
        tls_factory: Callable[[], ssl.SSLContext] | None = None,
        cert_serial: Callable[[], str] | None = None,
        renewal: Renewal | None = None,
        mqtt: MqttSettings | None = None,
    ) -> None:
        """``tls_factory`` makes the TLS context: at start, and again after ``renewal``
        switched certificates (None: plain MQTT, or TLS trusting the system's CAs);
        ``cert_serial`` reads the serial of the certificate it presents, for births;
        ``mqtt``: keepalive, session expiry, connect timeout and backoff (defaults if None)."""
        self.device_id = device_id
        self.data_dir = data_dir
        self.store = StateStore(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(data_dir)  # a crash mid-write leaves them; we own the dir
        self.bundle_settings = bundles or BundleSettings()
        self.trusted_root = trusted_root
        self.clock = clock
        self.applier = applier or WorkloadApplier(
            data_dir,
            settings=self.bundle_settings,
            trusted_root=trusted_root,
            agent_version=plumbing.__version__,
            clock=clock,
        )
        self.core = AgentCore(
            device_id,
            self.store.load(),
            plumbing.__version__,
            trusted_root=trusted_root,
            clock_skew_s=self.bundle_settings.clock_skew_s,
        )
        self.broker_url = broker_url
        self.mqtt_settings = mqtt or MqttSettings()
        self.transport = MqttTransport(
            device_id,
            broker_url,
            self._on_transport,
            tls_context=tls_factory() if tls_factory is not None else None,
            settings=self.mqtt_settings,
        )
        self.desired_topic = topic(device_id, Channel.DESIRED)
        self.bundle_data_topic = topic(device_id, Channel.BUNDLE_DATA)
        self.cert_topic = topic(device_id, Channel.CERT)
        self.renewal = renewal
        self._tls_factory = tls_factory
        self._read_cert_serial = cert_serial
        self._cert_serial = cert_serial() if cert_serial is not None else None
        self._new_tls = False  # set after a renewal: reconnect with the new certificate
        self.rejected: dict[str, int] = {}
        self.fetcher: Fetcher | None = None
        self.fetch_stats: FetchStats | None = None
        self._mqtt_source: MqttSource | None = None
        self._fetch_thread: threading.Thread | None = None
        self._subscribed = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._connected = False
        self._applies: queue.Queue[Desired | None] = queue.Queue()
        self._executors: dict[type, Callable[[object], None]] = {
            PersistState: self._persist,  # type: ignore[dict-item]
            SetWill: self._set_will,  # type: ignore[dict-item]
            Publish: self._publish,  # type: ignore[dict-item]
            Apply: self._apply,  # type: ignore[dict-item]
            Fetch: self._fetch,  # type: ignore[dict-item]
            CancelFetch: self._cancel_fetch,  # type: ignore[dict-item]
            Rejected: self._rejected,  # type: ignore[dict-item]
            Ignored: self._ignored,  # type: ignore[dict-item]
        }

    # -- event plumbing

    def feed(self, event: Event) -> None:
        with self._lock:
            for action in self.core.handle(event):
                self._executors[type(action)](action)

    def _on_transport(self, event: TransportEvent) -> None:
        now = self.clock()
        match event:
            case TConnected(session_present=present):
                self._connected = True
                log.info(
                    "connected",
                    extra={
                        "device": self.device_id,
                        "session": self.core.state.session,
                        "session_present": present,
                    },
                )
                inventory = collect_inventory(self.data_dir, arch=self.bundle_settings.architecture)
                self.feed(Connected(now, present, inventory, self._cert_serial))
                self.transport.subscribe(self._topics())
            case TSubscribed(granted=granted):
                if granted:
                    self._subscribed = True
                    if self._mqtt_source is not None:
                        self._mqtt_source.link_up()
                    self.feed(Subscribed(now))
                    self._check_renewal()
                else:
                    log.error(
                        "subscription refused",
                        extra={"device": self.device_id, "topics": self._topics()},
                    )
            case TMessage(topic=name, payload=payload):
                if name == self.desired_topic:
                    self.feed(DesiredPayload(payload, now))
                elif name == self.bundle_data_topic and self._mqtt_source is not None:
                    self._mqtt_source.on_frame(payload)
                elif name == self.cert_topic and self.renewal is not None:
                    self._on_cert_answer(payload)
            case TConnectRefused(reason=reason):
                log.error("connection refused", extra={"device": self.device_id, "reason": reason})
            case TDisconnected(reason=reason):
                if self._connected and not self._stop.is_set():
                    log.warning("disconnected", extra={"device": self.device_id, "reason": reason})
                self._connected = False
                self._subscribed = False
                if self._mqtt_source is not None:
                    self._mqtt_source.link_down()
                self.feed(Disconnected(now))

    def _on_cert_answer(self, payload: bytes) -> None:
        assert self.renewal is not None
        try:
            switched = self.renewal.on_answer(payload)
        except Exception:  # a renewal problem must never take the agent down
            log.exception("renewal answer failed", extra={"device": self.device_id})
            return
        if switched and self._tls_factory is not None:
            self._new_tls = True
            self.transport.request_disconnect()  # the network loop reconnects with the new pair

    def _topics(self) -> list[str]:
        topics = [self.desired_topic, self.bundle_data_topic]
        return [*topics, self.cert_topic] if self.renewal is not None else topics

    def _check_renewal(self) -> None:
        """Ask for a new certificate when due (the network thread; cheap when not)."""
        if self.renewal is None:
            return
        try:
            self.renewal.maybe_request()
        except Exception:  # a renewal problem must never take the agent down
            log.exception("renewal check failed", extra={"device": self.device_id})

    # -- executors

    def _persist(self, action: PersistState) -> None:
        self.store.save(action.state)

    def _set_will(self, action: SetWill) -> None:
        self.transport.set_will(action.topic, action.payload)

    def _publish(self, action: Publish) -> None:
        self.transport.publish(action.topic, action.payload, qos=action.qos, retain=action.retain)

    def _apply(self, action: Apply) -> None:
        log.info(
            "applying", extra={"device": self.device_id, "generation": action.desired.generation}
        )
        self._applies.put(action.desired)

    def _fetch(self, action: Fetch) -> None:
        log.info(
            "fetching bundles",
            extra={
                "device": self.device_id,
                "generation": action.generation,
                "bundles": list(action.bundles),
            },
        )
        self._ensure_fetcher().submit(action.generation, action.bundles)

    def _cancel_fetch(self, action: CancelFetch) -> None:
        log.info(
            "fetch superseded", extra={"device": self.device_id, "generation": action.generation}
        )
        if self.fetcher is not None:
            self.fetcher.cancel(action.generation)

    def _ensure_fetcher(self) -> Fetcher:
        """The fetcher and its thread, made on first use (imports the verification stack)."""
        if self.fetcher is not None:
            return self.fetcher
        from edge_agent.bundles import BundleCache, SecurityVersions
        from edge_agent.fetcher import (
            ChunkSource,
            Fetcher,
            FetchStats,
            HttpSource,
            MqttSource,
        )

        settings = self.bundle_settings
        stats = FetchStats()
        stop = threading.Event()
        source: ChunkSource
        if settings.hub_url:
            source = HttpSource(settings.hub_url, timeout_s=settings.http_timeout_s, stop=stop)
        else:
            mqtt_source = MqttSource(
                self.device_id,
                lambda name, payload: self.transport.publish(name, payload, qos=1, retain=False),
                queue_max=settings.frame_queue_max,
                stats=stats,
            )
            if self._subscribed:
                mqtt_source.link_up()
            source = self._mqtt_source = mqtt_source
        fetcher = Fetcher(
            cache=BundleCache(self.data_dir, max_bytes=settings.cache_max_bytes),
            security=SecurityVersions(self.data_dir),
            settings=settings,
            trusted_root=self.trusted_root,
            agent_version=plumbing.__version__,
            source=source,
            on_done=self._fetch_done,
            applied_references=self._applied_references,
            stats=stats,
            stop_event=stop,
            clock=self.clock,
        )
        self.fetcher, self.fetch_stats = fetcher, stats
        self._fetch_thread = threading.Thread(target=fetcher.run, name="fetch", daemon=True)
        self._fetch_thread.start()
        return fetcher

    def _fetch_done(self, generation: int, ok: bool, error: str | None) -> None:
        self.feed(FetchDone(generation, ok, error, self.clock()))

    def _applied_references(self) -> frozenset[str]:
        """Bundles the applied configuration references (``config.json``); never evicted."""
        try:
            document = msgspec.json.decode((self.data_dir / "config.json").read_bytes())
        except (OSError, msgspec.DecodeError):
            return frozenset()
        config = document.get("config") if isinstance(document, dict) else None
        return bundle_references(config) if isinstance(config, dict) else frozenset()

    def _rejected(self, action: Rejected) -> None:
        self.rejected[action.reason] = self.rejected.get(action.reason, 0) + 1
        log.warning(
            "rejected message",
            extra={"device": self.device_id, "reason": action.reason, "detail": action.detail},
        )

    def _ignored(self, action: Ignored) -> None:
        log.debug(
            "ignored desired",
            extra={"device": self.device_id, "generation": action.generation, "why": action.why},
        )

    # -- threads

    def _apply_worker(self) -> None:
        while (desired := self._applies.get()) is not None:
            ok, error = True, None
            try:
                self.applier.apply(desired)
            except ApplyError as exc:
                ok, error = False, str(exc)
            except Exception as exc:  # an applier bug must not kill the agent
                log.exception(
                    "applier crashed",
                    extra={"device": self.device_id, "generation": desired.generation},
                )
                ok, error = False, f"internal error: {exc!r}"
            log.info(
                "applied" if ok else "apply failed",
                extra={"device": self.device_id, "generation": desired.generation, "error": error},
            )
            self.feed(ApplyDone(desired.generation, ok, error, self.clock()))

    def _network_loop(self) -> None:
        backoff = Backoff(
            min_s=self.mqtt_settings.reconnect_min_s, max_s=self.mqtt_settings.reconnect_max_s
        )
        while not self._stop.is_set():
            if self._new_tls and self._tls_factory is not None:
                self._new_tls = False
                if self._read_cert_serial is not None:
                    self._cert_serial = self._read_cert_serial()
                self.transport = MqttTransport(
                    self.device_id,
                    self.broker_url,
                    self._on_transport,
                    tls_context=self._tls_factory(),
                    settings=self.mqtt_settings,
                )
            self.feed(Connecting(self.clock()))
            try:
                self.transport.connect()
            except TransportError as exc:
                delay = backoff.next_delay_s()
                log.warning(
                    "broker unreachable",
                    extra={
                        "device": self.device_id,
                        "error": str(exc),
                        "retry_in_s": round(delay, 2),
                    },
                )
                self._stop.wait(delay)
                continue
            accepted = False
            while not self._stop.is_set() and self.transport.loop(0.5):
                if self._connected:
                    accepted = True
                    backoff.reset()
                if self._subscribed:
                    self._check_renewal()
            if self._stop.is_set():
                return
            delay = backoff.next_delay_s()
            if not accepted and not self._connected:
                # Closed before CONNACK: a refused certificate (revoked, expired, wrong CA)
                # ends here, as does a broker that drops us at once. Say so, every time.
                log.warning(
                    "connection closed before the broker accepted it",
                    extra={"device": self.device_id, "retry_in_s": round(delay, 2)},
                )
            self._stop.wait(delay)

    def run(self) -> int:
        self.feed(Booted(self.clock()))
        log.info(
            "agent starting",
            extra={
                "device": self.device_id,
                "boot_epoch": self.core.state.boot_epoch,
                "applied_generation": self.core.state.applied_generation,
            },
        )
        worker = threading.Thread(target=self._apply_worker, name="apply", daemon=True)
        network = threading.Thread(target=self._network_loop, name="mqtt", daemon=True)
        worker.start()
        network.start()
        self._stop.wait()
        if self.fetcher is not None:
            self.fetcher.stop()
        network.join(timeout=5)
        self._applies.put(None)
        worker.join(timeout=30)
        if self._fetch_thread is not None:
            self._fetch_thread.join(timeout=10)
        self._say_goodbye()
        return 0

    def stop(self) -> None:
        self._stop.set()

    def _say_goodbye(self) -> None:
        if not self._connected:
            return
        with self._lock:
            actions = self.core.handle(Stopping(self.clock()))
        for action in actions:
            if isinstance(action, Publish):
                self.transport.publish_and_wait(action.topic, action.payload, timeout_s=2.0)
        self.transport.disconnect()
        log.info("agent stopped", extra={"device": self.device_id})


def _certificate_serial(identity: Identity) -> str:
    from edge_agent.identity import certificate_serial  # cryptography: only with TLS

    return certificate_serial(identity.cert.read_bytes())


def run_agent(
    *,
    device_id: str,
    broker_url: str | None,
    data_dir: Path,
    bundles: BundleSettings | None = None,
    insecure_unsigned: bool = False,
    renew_at_fraction: float = DEFAULT_RENEW_AT_FRACTION,
    mqtt: MqttSettings | None = None,
) -> int:
    """Entry point for ``driftless agent run``; 2 when there is no usable trust anchor.

    An enrolled data directory (``driftless agent enroll``) supplies what is not
    given: the broker URL, the fleet root and, for ``mqtts://``, the certificate.
    """
    settings = bundles or BundleSettings()
    if not 0 <= renew_at_fraction < 1:
        log.error(
            "agent cannot start",
            extra={"device": device_id, "error": "renew_at_fraction must be within [0, 1)"},
        )
        return 2
    identity = Identity(data_dir)
    if broker_url is None:
        broker_url = identity.broker_url() or DEFAULT_BROKER_URL
    if settings.root_path is None and identity.root.exists():
        settings = replace(settings, root_path=identity.root)
    tls = None
    renewal = None
    if broker_url.startswith("mqtts://") and identity.enrolled():
        renewal = Renewal(
            identity,
            device_id,
            publish=lambda name, payload: driver.transport.publish(
                name, payload, qos=1, retain=False
            ),
            at_fraction=renew_at_fraction,
        )
        try:
            renewal.recover()
            tls = tls_context(identity)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("agent cannot start", extra={"device": device_id, "error": str(exc)})
            return 2
    trusted_root = None
    if settings.root_path is not None:
        try:
            trusted_root = load_trusted_root(settings.root_path)
        except RootFileError as exc:
            log.error("agent cannot start", extra={"device": device_id, "error": str(exc)})
            return 2
    elif not insecure_unsigned:
        log.error(
            "agent cannot start",
            extra={
                "device": device_id,
                "error": "no --root: give the fleet's root.json, or --insecure-unsigned "
                "to accept desired documents unverified (experiments only)",
            },
        )
        return 2
    else:
        log.warning(
            "no trusted root: desired documents are NOT verified (--insecure-unsigned)",
            extra={"device": device_id},
        )
    driver = AgentDriver(
        device_id=device_id,
        broker_url=broker_url,
        data_dir=data_dir,
        bundles=settings,
        trusted_root=trusted_root,
        tls_factory=(lambda: tls_context(identity)) if tls else None,
        cert_serial=(lambda: _certificate_serial(identity)) if tls else None,
        renewal=renewal,
        mqtt=mqtt,
    )
    log.info(
        "agent starting",
        extra={
            "device": device_id,
            "broker": broker_url,
            "certificate": str(identity.cert) if tls else None,
            "root": str(settings.root_path) if settings.root_path else None,
            "keepalive_s": driver.mqtt_settings.keepalive_s,
        },
    )

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        driver.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return driver.run()
