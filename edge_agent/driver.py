"""The agent process: feeds transport events, step results and timers to the core, runs its actions.

Rules:
- The core is touched under one lock, from the network thread (MQTT
  callbacks), the step thread and the fetch thread; actions are executed in
  order under that lock through one executor table
  (:class:`edge_agent.executors.ExecutorTable`), so a state is persisted
  before the report that announces it is published. An executor that
  finishes at once answers with the next event, fed after the batch.
- What the core decides about the connection (Will, birth, the one SUBSCRIBE
  after every connect, when bundle frames may flow, where an incoming message
  goes) it says in actions; this module only carries them out.
- Reconnects use jittered exponential backoff (``MqttSettings``: 0.2 s doubling
  to 30 s, reset once a connection is accepted) and a fresh session number,
  hence a fresh Last Will, on every attempt.
- SIGTERM/SIGINT: publish "offline" for the current session, disconnect, exit 0.
  Supervised workloads keep running; the next agent adopts them.
- The runtime supervises workloads by default
  (:class:`edge_agent.supervisor.runtime.SupervisingRuntime`): at start it
  adopts or restarts the applied generation's workloads (``resume``) before
  any connection, and its events (exits, health) are fed to the core like
  any other, so supervision and its reports go on with the broker away.
- Steps that take time (install, switch, commit, roll back, and the
  supervisor's start, stop and health watch) run one at a time in the step
  thread, which also fires the core's timers; each result comes back as
  ``StepDone`` or ``StepFailed``.
- The fetch step (``FetchBundles``/``CancelFetch``) runs in its own thread
  (``edge_agent.fetch_thread``), created the first time a desired document
  references bundles, so an agent that never sees a bundle never loads the
  verification stack.
- The outbox (reports made while the broker cannot be reached) is kept in
  ``outbox.json`` (``edge_agent.store.OutboxStore``), loaded at start, so it
  survives a restart.
- A report handed to a connection that is lost before the broker acknowledged
  it goes back to the outbox, ahead of what was made after, and the next
  connection uses a new client: paho would otherwise keep it in memory only and
  send it after the next connect's outbox and birth, out of order.
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
import os
import queue
import signal
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

import msgspec

import plumbing
from edge_agent.core import (
    AgentCore,
    Booted,
    CancelFetch,
    CancelTimer,
    Commit,
    Connected,
    Connecting,
    DeliverCertAnswer,
    DeliverFrame,
    Disconnected,
    Event,
    FetchBundles,
    Ignored,
    Install,
    JobUpdate,
    LocksChanged,
    MessageIn,
    NoOp,
    OverrideLocks,
    PersistState,
    Publish,
    PublishFailed,
    Rejected,
    RollBack,
    RunJobs,
    SaveOutbox,
    SetTimer,
    SetWill,
    StartWorkload,
    Step,
    StepDone,
    StepFailed,
    Stopping,
    StopWorkload,
    Subscribe,
    Subscribed,
    Switch,
    TimerFired,
    TransferLink,
    WaitForHealth,
)
from edge_agent.enroll import Identity, tls_context
from edge_agent.executors import ExecutorTable
from edge_agent.inventory import collect as collect_inventory
from edge_agent.job_runner import JobRunner, JobSettings
from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.plan import step_generation
from edge_agent.renewal import DEFAULT_RENEW_AT_FRACTION, Renewal
from edge_agent.root import RootFileError, load_trusted_root
from edge_agent.runtime import ApplyError, Runtime, Supervising, WorkloadApplier
from edge_agent.settings import BundleSettings, MqttSettings, SupervisorSettings
from edge_agent.store import OutboxStore, StateStore, remove_stale_temporaries
from edge_agent.supervisor.lockfiles import FileLockGate, LockSettings, LockWatcher, lock_dir
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
from protocols import Channel, JobStatus, LockStatus, bundle_references

if TYPE_CHECKING:
    from edge_agent.fetch_thread import Fetcher, FetchStats, MqttSource
    from firmware_bundles.trust import TrustedRoot

log = logging.getLogger("driftless.agent")
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
__all__ = ["AgentDriver", "RootFileError", "load_trusted_root", "run_agent"]


class _Wake:
    """Put on the step queue to make the step thread look at its timers again."""


_WAKE = _Wake()
RuntimeStep = Install | Switch | Commit | RollBack | StartWorkload | StopWorkload | WaitForHealth


class AgentDriver:
    """One device's agent: core + store + runtime + MQTT transport."""

    def __init__(
        self,
        *,
        device_id: str,
        broker_url: str,
        data_dir: Path,
        runtime: Runtime | None = None,
        bundles: BundleSettings | None = None,
        trusted_root: TrustedRoot | None = None,
        clock: Callable[[], float] = time.time,
        tls_factory: Callable[[], ssl.SSLContext] | None = None,
        cert_serial: Callable[[], str] | None = None,
        renewal: Renewal | None = None,
        mqtt: MqttSettings | None = None,
        outbox: OutboxLimits | None = None,
        supervisor: SupervisorSettings | None = None,
        locks: LockSettings | None = None,
        jobs: JobSettings | None = None,
    ) -> None:
        """``tls_factory`` makes the TLS context: at start, and again after ``renewal``
        switched certificates (None: plain MQTT, or TLS trusting the system's CAs);
        ``cert_serial`` reads the serial of the certificate it presents, for births;
        ``mqtt``: keepalive, session expiry, connect timeout and backoff (defaults if None);
        ``outbox``: the bounds of what is kept while offline (defaults if None);
        ``locks``, ``jobs``: update locks' and one-shot jobs' limits (defaults if None)."""
        self.device_id = device_id
        self.data_dir = data_dir
        self.store = StateStore(data_dir)
        self.outbox_store = OutboxStore(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(data_dir)  # a crash mid-write leaves them; we own the dir
        self.bundle_settings = bundles or BundleSettings()
        self.trusted_root = trusted_root
        self.clock = clock
        self.supervisor_settings = supervisor or SupervisorSettings()
        # the update-lock gate the runtime's switch asks (issue 13, item 4)
        self.lock_settings = locks or LockSettings()
        self.lock_gate = FileLockGate(
            lock_dir(data_dir), max_lease_s=self.lock_settings.max_lease_s
        )
        self.runtime: Runtime = runtime or self._default_runtime()
        self.renewal = renewal
        channels = (Channel.DESIRED, Channel.BUNDLE_DATA)
        self.mqtt_settings = mqtt or MqttSettings()
        self.core = AgentCore(
            device_id,
            self.store.load(),
            plumbing.__version__,
            trusted_root=trusted_root,
            clock_skew_s=self.bundle_settings.clock_skew_s,
            supervises=self.runtime.supervises,
            health_timeout_s=self.supervisor_settings.health_timeout_s,
            heartbeat_s=self.mqtt_settings.heartbeat_s,
            channels=(*channels, Channel.CERT) if renewal is not None else channels,
            outbox=Outbox(outbox or OutboxLimits(), self.outbox_store.load()),
        )
        self.broker_url = broker_url
        self.transport = MqttTransport(
            device_id,
            broker_url,
            self._on_transport,
            tls_context=tls_factory() if tls_factory is not None else None,
            settings=self.mqtt_settings,
        )
        self._tls_factory = tls_factory
        self._read_cert_serial = cert_serial
        self._cert_serial = cert_serial() if cert_serial is not None else None
        self._new_tls = False  # set after a renewal: reconnect with the new certificate
        self._used = False  # the transport has had a connection: the next one gets a new client
        self.rejected: dict[str, int] = {}
        self.fetcher: Fetcher | None = None
        self.fetch_stats: FetchStats | None = None
        self._mqtt_source: MqttSource | None = None
        self._fetch_thread: threading.Thread | None = None
        self._fetching: dict[int, FetchBundles] = {}
        self._subscribed = False
        self._topics: tuple[str, ...] = ()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._restart = threading.Event()  # firmware A/B: exec again once stopped
        self._connected = False
        self._steps: queue.Queue[RuntimeStep | _Wake | None] = queue.Queue()
        self._timers: dict[str, float] = {}
        # -- locks and jobs (issue 13, items 4 and 8): the gate the runtime's switch asks,
        # the watcher that reports who holds what, the one-shot job runner.
        self.lock_watcher = LockWatcher(
            self.lock_gate,
            self._locks_changed,
            clock=clock,
            interval_s=self.lock_settings.watch_interval_s,
        )
        self.jobs = JobRunner(data_dir, self._job_update, settings=jobs, clock=clock)
        # -- (end of locks and jobs)
        self._executors = self._executor_table()

    def _default_runtime(self) -> Runtime:
        if not self.supervisor_settings.enabled:
            return WorkloadApplier(
                self.data_dir,
                settings=self.bundle_settings,
                trusted_root=self.trusted_root,
                agent_version=plumbing.__version__,
                clock=self.clock,
                request_restart=self.request_restart,  # firmware A/B: a switch restarts the agent
            )
        from edge_agent.supervisor.runtime import SupervisingRuntime

        return SupervisingRuntime(
            self.data_dir,
            settings=self.bundle_settings,
            supervisor=self.supervisor_settings,
            trusted_root=self.trusted_root,
            agent_version=plumbing.__version__,
            clock=self.clock,
            lock_gate=self.lock_gate,
            request_restart=self.request_restart,
        )

    def _locks_changed(self, locks: list[LockStatus]) -> None:
        self.feed(LocksChanged(tuple(locks), self.clock()))

    def _job_update(self, status: JobStatus) -> None:
        self.feed(JobUpdate(status, self.clock()))

    def _executor_table(self) -> ExecutorTable[Event | None]:
        table: ExecutorTable[Event | None] = ExecutorTable()
        table.register(PersistState, lambda a: self.store.save(a.state))
        table.register(SaveOutbox, lambda a: self.outbox_store.save(a.snapshot))
        table.register(SetWill, lambda a: self.transport.set_will(a.topic, a.payload))
        table.register(Publish, self._publish)
        table.register(Subscribe, self._subscribe)
        table.register(TransferLink, self._transfer_link)
        table.register(DeliverFrame, self._deliver_frame)
        table.register(DeliverCertAnswer, lambda a: self._on_cert_answer(a.payload))
        table.register(CancelFetch, self._cancel_fetch)
        table.register(SetTimer, self._set_timer)
        table.register(CancelTimer, self._cancel_timer)
        table.register(Rejected, self._rejected)
        table.register(Ignored, self._ignored)
        table.register(NoOp, self._no_op)
        table.register(FetchBundles, self._fetch)
        table.register(Install, self._queue_step)
        table.register(Switch, self._queue_step)
        table.register(Commit, self._queue_step)
        table.register(RollBack, self._queue_step)
        table.register(StartWorkload, self._queue_step)
        table.register(StopWorkload, self._queue_step)
        table.register(WaitForHealth, self._queue_step)
        table.register(OverrideLocks, lambda a: self.lock_gate.set_override(a.override))
        table.register(RunJobs, lambda a: self.jobs.offer(a.jobs))
        table.require_complete()
        return table

    # -- event plumbing

    def feed(self, event: Event) -> None:
        """Hand ``event`` to the core and carry out its actions, then the events they answer."""
        with self._lock:
            pending = [event]
            while pending:
                for action in self.core.handle(pending.pop(0)):
                    follow = self._executors.run(action)
                    if follow is not None:
                        pending.append(follow)

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
            case TSubscribed(granted=granted):
                if not granted:
                    log.error(
                        "subscription refused",
                        extra={"device": self.device_id, "topics": list(self._topics)},
                    )
                self.feed(Subscribed(now, granted))
                if granted:
                    self._check_renewal()
            case TMessage(topic=name, payload=payload):
                self.feed(MessageIn(name, payload, now))
            case TConnectRefused(reason=reason):
                log.error("connection refused", extra={"device": self.device_id, "reason": reason})
            case TDisconnected(reason=reason):
                if self._connected and not self._stop.is_set():
                    log.warning("disconnected", extra={"device": self.device_id, "reason": reason})
                self._connected = False
                self._lost(now)

    def _lost(self, now: float) -> None:
        """The connection is gone: what it took and the broker never acknowledged goes
        back to the outbox, ahead of anything made after (one lock for both), so it is
        kept on disk and leaves in order at the next connect. Left in paho's memory it
        would be lost with the process, and paho would send it after that connect's
        outbox and birth, out of order (the hub drops a report older than its newest).
        The next connection gets a new client, so paho does not send it a second time."""
        with self._lock:
            self.feed(Disconnected(now))
            for publish in self.transport.unacknowledged():
                assert isinstance(publish, Publish)
                self.feed(PublishFailed(publish, now))

    def _on_cert_answer(self, payload: bytes) -> None:
        if self.renewal is None:
            return
        try:
            switched = self.renewal.on_answer(payload)
        except Exception:  # a renewal problem must never take the agent down
            log.exception("renewal answer failed", extra={"device": self.device_id})
            return
        if switched and self._tls_factory is not None:
            self._new_tls = True
            self.transport.request_disconnect()  # the network loop reconnects with the new pair

    def _check_renewal(self) -> None:
        """Ask for a new certificate when due (the network thread; cheap when not)."""
        if self.renewal is None:
            return
        try:
            self.renewal.maybe_request()
        except Exception:  # a renewal problem must never take the agent down
            log.exception("renewal check failed", extra={"device": self.device_id})

    # -- executors

    def _publish(self, action: Publish) -> Event | None:
        taken = self.transport.send(
            action.topic,
            action.payload,
            qos=action.qos,
            retain=action.retain,
            token=action if action.lane is not None else None,  # kept if never acknowledged
        )
        return None if taken else PublishFailed(action, self.clock())

    def _subscribe(self, action: Subscribe) -> None:
        self._topics = action.topics
        self.transport.subscribe(list(action.topics))

    def _transfer_link(self, action: TransferLink) -> None:
        self._subscribed = action.up
        if self._mqtt_source is not None:
            if action.up:
                self._mqtt_source.link_up()
            else:
                self._mqtt_source.link_down()

    def _deliver_frame(self, action: DeliverFrame) -> None:
        if self._mqtt_source is not None:
            self._mqtt_source.on_frame(action.payload)

    def _queue_step(self, step: RuntimeStep) -> None:
        log.info(
            "step",
            extra={"device": self.device_id, "step": type(step).__name__, "generation": _gen(step)},
        )
        self._steps.put(step)

    def _set_timer(self, action: SetTimer) -> None:
        self._timers[action.name] = action.at
        self._steps.put(_WAKE)  # the step thread re-reads its timers

    def _cancel_timer(self, action: CancelTimer) -> None:
        self._timers.pop(action.name, None)

    def _fetch(self, action: FetchBundles) -> None:
        log.info(
            "fetching bundles",
            extra={
                "device": self.device_id,
                "generation": action.generation,
                "bundles": list(action.bundles),
            },
        )
        self._fetching[action.generation] = action
        self._ensure_fetcher().submit(action.generation, action.bundles)

    def _cancel_fetch(self, action: CancelFetch) -> None:
        log.info(
            "fetch superseded", extra={"device": self.device_id, "generation": action.generation}
        )
        self._fetching.pop(action.generation, None)
        if self.fetcher is not None:
            self.fetcher.cancel(action.generation)

    def _ensure_fetcher(self) -> Fetcher:
        """The fetcher and its thread, made on first use (imports the verification stack)."""
        if self.fetcher is not None:
            return self.fetcher
        from edge_agent.bundles import BundleCache, SecurityVersions
        from edge_agent.fetch_thread import (
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
        with self._lock:
            step = self._fetching.pop(generation, None)
        if step is None:
            return  # superseded meanwhile: the core is not waiting for it
        now = self.clock()
        self.feed(StepDone(step, now) if ok else StepFailed(step, error or "fetch failed", now))

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

    def _no_op(self, action: NoOp) -> None:
        log.debug(
            "plan done",
            extra={"device": self.device_id, "generation": action.generation, "why": action.why},
        )

    # -- threads

    def _run_step(self, step: RuntimeStep) -> str | None:
        """Carry out one runtime step; raises ApplyError. Returns a rollback's detail."""
        runtime = self.runtime
        if isinstance(step, StartWorkload | StopWorkload | WaitForHealth):
            if not runtime.supervises:
                raise ApplyError(f"this agent's runtime does not supervise workloads: {step!r}")
            supervising = self._supervising()
            match step:
                case StartWorkload(generation=generation, name=name):
                    supervising.start_workload(generation, name)
                case StopWorkload(generation=generation, name=name):
                    supervising.stop_workload(generation, name)
                case WaitForHealth(generation=generation, names=names):
                    supervising.wait_for_health(generation, names)
            return None
        match step:
            case Install(desired=desired):
                self.runtime.install(desired)
            case Switch(desired=desired):
                self.runtime.switch(desired)
            case Commit(generation=generation):
                self.runtime.commit(generation)
            case RollBack(generation=generation, to_generation=to):
                return self.runtime.roll_back(generation, to)
        return None

    def _supervising(self) -> Supervising:
        """The runtime as a supervising one (call only when ``supervises``)."""
        runtime: Supervising = self.runtime  # type: ignore[assignment]
        return runtime

    def _step_worker(self) -> None:
        """Runs runtime steps one at a time, and fires the core's timers when due."""
        while True:
            due = min(self._timers.values(), default=None)
            wait_s = None if due is None else max(0.0, min(due - self.clock(), 1.0))
            try:
                step = self._steps.get(timeout=wait_s)
            except queue.Empty:
                self._fire_timers()
                continue
            if step is None:
                return
            if self._restart.is_set():
                return  # firmware A/B: restarting; what is left is planned again after it
            self._fire_timers()
            if isinstance(step, _Wake):
                continue
            error = None
            detail: str | None = None
            try:
                detail = self._run_step(step)
            except ApplyError as exc:
                error = str(exc)
            except Exception as exc:  # a runtime bug must not kill the agent
                log.exception(
                    "step crashed", extra={"device": self.device_id, "generation": _gen(step)}
                )
                error = f"internal error: {exc!r}"
            log.info(
                "step done" if error is None else "step failed",
                extra={
                    "device": self.device_id,
                    "step": type(step).__name__,
                    "generation": _gen(step),
                    "error": error,
                },
            )
            if self._restart.is_set():
                return  # firmware A/B: the switch asked for the restart; the step is redone after
            now = self.clock()
            done = StepDone(step, now, detail or "")
            self.feed(done if error is None else StepFailed(step, error, now))

    def _fire_timers(self) -> None:
        now = self.clock()
        with self._lock:
            due = sorted((at, name) for name, at in self._timers.items() if at <= now)
            for _, name in due:
                del self._timers[name]
        for _, name in due:
            self.feed(TimerFired(name, now))

    def _network_loop(self) -> None:
        backoff = Backoff(
            min_s=self.mqtt_settings.reconnect_min_s, max_s=self.mqtt_settings.reconnect_max_s
        )
        while not self._stop.is_set():
            if self._new_tls and self._tls_factory is not None:
                self._new_tls = False
                if self._read_cert_serial is not None:
                    self._cert_serial = self._read_cert_serial()
                self._used = True
            if self._used:  # a new client: nothing of the last connection is sent again
                self._used = False
                self.transport = MqttTransport(
                    self.device_id,
                    self.broker_url,
                    self._on_transport,
                    tls_context=self._tls_factory() if self._tls_factory is not None else None,
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
            self._used = True
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
        if self._boot_firmware():
            return 0
        self.feed(Booted(self.clock()))
        if self.runtime.supervises:
            self.core.seed_workloads(self._supervising().resume(self.feed))
        log.info(
            "agent starting",
            extra={
                "device": self.device_id,
                "boot_epoch": self.core.state.boot_epoch,
                "applied_generation": self.core.state.applied_generation,
                "outbox": len(self.core.outbox),
            },
        )
        worker = threading.Thread(target=self._step_worker, name="steps", daemon=True)
        network = threading.Thread(target=self._network_loop, name="mqtt", daemon=True)
        worker.start()
        self.jobs.start()  # reports what a previous agent left running (into the outbox)
        self.lock_watcher.start()
        network.start()
        self._stop.wait()
        self.lock_watcher.stop()
        self.jobs.stop()
        if self.fetcher is not None:
            self.fetcher.stop()
        network.join(timeout=5)
        self._steps.put(None)
        worker.join(timeout=30)
        if self._fetch_thread is not None:
            self._fetch_thread.join(timeout=10)
        if self.runtime.supervises:
            self._supervising().close()
        self._say_goodbye()
        return 0

    def stop(self) -> None:
        self._stop.set()

    # -- firmware A/B (edge_agent/slots.py)

    @property
    def restart_requested(self) -> bool:
        """Whether :meth:`run` returned so that the agent starts again (``run_agent`` execs)."""
        return self._restart.is_set()

    def request_restart(self) -> None:
        """The simulated reboot after a firmware switch: stop cleanly, then start again."""
        log.info("restart requested", extra={"device": self.device_id})
        self._restart.set()
        self.stop()

    def _boot_firmware(self) -> bool:
        """Before connecting: count the boot of a slot on trial, check it, confirm or fall
        back; True when the agent must restart (into the old slot) without connecting."""
        from edge_agent.slots import FirmwareSlots

        outcome = FirmwareSlots(self.data_dir, clock=self.clock).boot()
        if outcome.event != "booted":
            log.info(
                "firmware boot",
                extra={
                    "device": self.device_id,
                    "outcome": outcome.event,
                    "slot": outcome.slot,
                    "version": outcome.version,
                    "reason": outcome.reason,
                },
            )
        if outcome.restart:
            self._restart.set()
        return outcome.restart

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


def _gen(step: Step) -> int:
    return step_generation(step)


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
    supervisor: SupervisorSettings | None = None,
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
        supervisor=supervisor,
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
    status = driver.run()
    if driver.restart_requested and status == 0:
        _exec_again()  # firmware A/B: the simulated reboot
    return status


def _exec_again() -> NoReturn:
    """Replace this process with a fresh agent: same interpreter, same arguments, same pid."""
    log.info("agent restarting", extra={"argv": sys.orig_argv})
    logging.shutdown()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
