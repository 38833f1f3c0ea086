"""The agent process: feeds transport events and apply results to the core, runs its actions.

Rules:
- The core is touched under one lock, from the network thread (MQTT callbacks)
  and the apply worker; actions are executed in order under that lock, so a
  state is persisted before the report that announces it is published.
- Reconnects use jittered exponential backoff and a fresh session number, hence
  a fresh Last Will, on every attempt.
- SIGTERM/SIGINT: publish "offline" for the current session, disconnect, exit 0.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import driftless
from driftless.net import Backoff
from edge_agent.core import (
    AgentCore,
    Apply,
    ApplyDone,
    Booted,
    Connected,
    Connecting,
    DesiredPayload,
    Disconnected,
    Event,
    Ignored,
    PersistState,
    Publish,
    Rejected,
    SetWill,
    Stopping,
    Subscribed,
)
from edge_agent.runtime import Applier, ApplyError, ConfigFileApplier
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
from protocols import Channel, Desired, topic

log = logging.getLogger("driftless.agent")


class AgentDriver:
    """One device's agent: core + store + applier + MQTT transport."""

    def __init__(
        self,
        *,
        device_id: str,
        broker_url: str,
        data_dir: Path,
        applier: Applier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.device_id = device_id
        self.store = StateStore(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(data_dir)  # a crash mid-write leaves them; we own the dir
        self.applier = applier or ConfigFileApplier(data_dir)
        self.clock = clock
        self.core = AgentCore(device_id, self.store.load(), driftless.__version__)
        self.transport = MqttTransport(device_id, broker_url, self._on_transport)
        self.desired_topic = topic(device_id, Channel.DESIRED)
        self.rejected: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._connected = False
        self._applies: queue.Queue[Desired | None] = queue.Queue()
        self._executors: dict[type, Callable[[object], None]] = {
            PersistState: self._persist,  # type: ignore[dict-item]
            SetWill: self._set_will,  # type: ignore[dict-item]
            Publish: self._publish,  # type: ignore[dict-item]
            Apply: self._apply,  # type: ignore[dict-item]
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
                self.feed(Connected(now, present))
                self.transport.subscribe(self.desired_topic)
            case TSubscribed(granted=granted):
                if granted:
                    self.feed(Subscribed(now))
                else:
                    log.error(
                        "subscription refused",
                        extra={"device": self.device_id, "topic": self.desired_topic},
                    )
            case TMessage(topic=name, payload=payload):
                if name == self.desired_topic:
                    self.feed(DesiredPayload(payload, now))
            case TConnectRefused(reason=reason):
                log.error("connection refused", extra={"device": self.device_id, "reason": reason})
            case TDisconnected(reason=reason):
                if self._connected and not self._stop.is_set():
                    log.warning("disconnected", extra={"device": self.device_id, "reason": reason})
                self._connected = False
                self.feed(Disconnected(now))

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
        backoff = Backoff()
        while not self._stop.is_set():
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
            while not self._stop.is_set() and self.transport.loop(0.5):
                if self._connected:
                    backoff.reset()
            if self._stop.is_set():
                return
            self._stop.wait(backoff.next_delay_s())

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
        network.join(timeout=5)
        self._applies.put(None)
        worker.join(timeout=30)
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


def run_agent(*, device_id: str, broker_url: str, data_dir: Path) -> int:
    """Entry point for ``driftless agent run``."""
    driver = AgentDriver(device_id=device_id, broker_url=broker_url, data_dir=data_dir)

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        driver.stop()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return driver.run()
