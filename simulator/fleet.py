"""Many virtual devices in one asyncio process, each running the real agent core.

Rules:
- Every device runs ``edge_agent.core.AgentCore`` unchanged. This module only
  turns MQTT happenings into core events and carries out the core's actions in
  order, under one lock per device, through one executor table
  (``edge_agent.executors.ExecutorTable``), as ``edge_agent.driver`` does.
- What happens on a connection is the core's decision, as on a device:
  ``Connecting`` (the core picks the session and its Will) -> CONNECT with that
  Will, ``clean_start=False`` -> on CONNACK ``Connected``: the core drains its
  outbox, publishes status online and the birth, and asks for one
  ``Subscribe`` -> SUBSCRIBE -> messages that arrived before the SUBACK are
  fed first (``MessageIn``: the core coalesces desired documents and routes
  bundle frames to the transfer) -> ``Subscribed`` (the core opens the
  transfer's link) -> each later message is a ``MessageIn``. A lost
  connection feeds ``Disconnected``; an orderly stop feeds ``Stopping``
  (status offline) and disconnects cleanly, so the broker drops the Will.
- Steps: ``Switch`` runs the simulated applier (a duration, sometimes a
  failure) in its own task; each step answers with ``StepDone`` or
  ``StepFailed``. Without a ``workloads`` profile section the devices
  supervise nothing (``supervises=False``: the core plans no start, stop or
  health steps) and ``Install``, ``Commit`` and ``RollBack`` are done in place.
  With one, each device's core supervises (``supervises=True``) and a
  :class:`simulator.runtime.SimRuntime` (made at its first install) carries
  out ``Install`` (the verified manifests' run specifications), the workload
  starts and stops, ``WaitForHealth``, ``Commit`` and ``RollBack`` with the
  agent's own supervisor machine and transaction over simulated processes;
  its ``WorkloadExited`` / ``HealthPassed`` / ``HealthFailed`` events are fed
  to the core in order, so devices report per-workload states, restarts and
  rollbacks as agents do.
- ``FetchBundles`` runs the real fetch job and transfer cores
  (``edge_agent.fetch_job``, ``edge_agent.bundle_transfer``) over the
  device's own link (``simulator.transfer``);
  ``CancelFetch`` stops it, keeping what arrived for a resume. Without a
  trusted root (``FleetConfig.root_path``) a fetch fails at once with a reason,
  as on a device started without ``--root``; the verification stack is loaded
  only when the fleet has a root. With a root, desired documents must be signed
  by the root's hub keys, as on a device; without one they are taken unverified
  (a device's ``--insecure-unsigned``).
- State lives in memory only: ``PersistState`` replaces the device's saved state.
- The outbox is the core's (``edge_agent.outbox``), kept in memory: a report
  the link did not take goes back to it (``PublishFailed``) and out again on
  the next connection, before the birth; births and status are per session
  and are rebuilt by the core on every connect.
- Reconnects wait a jittered backoff (``plumbing.net``). At most
  ``max_concurrent_connects`` connection attempts are in flight at once, so a
  large fleet ramps up instead of stampeding the broker.
- Randomness is seeded per device (``seed`` + device id + purpose), so a run is
  repeatable whatever order the event loop schedules devices in.
- Faults come from the profile (``simulator.profiles``): one :class:`FaultScheduler`
  task per fleet walks every device's offline windows in time order. At a window's
  start the device's network goes down: its connection is severed without
  DISCONNECT (the broker sends the Will) and it makes no attempt until the network
  is back; then it connects as soon as its backoff allows. Windows may overlap
  (flaky + storm): the network is up only when every window has ended.
- Heartbeats are the core's (``FleetConfig.heartbeat_s``, default 30 s; None: none),
  and so are HELD documents (fetched and installed, reported ``staged``). A device
  can be muted (:meth:`VirtualDevice.mute`: a hung agent whose connection lives on,
  MQTT pings and all): it publishes nothing, so the broker sends no Will and only
  the hub's liveness controller notices.
- A device's "disk" is its last ``PersistState`` (plus, in memory only, its
  bundle storage: ``simulator.transfer.SimDisk``); a fleet can be given the states
  to start from and a ``persist`` callback (``simulator.journal``), so a worker
  process that is killed and restarted keeps its devices' sessions and generations.
- With an identity directory (``FleetConfig.identity_dir``, made by
  ``simulator.enroll``) every device connects over ``mqtts://`` with its own
  certificate and key, trusting only the fleet CA, through an ``ssl.SSLContext``
  of its own built once at start; a device without a usable identity stops the
  start (FleetError). ``mqtts://`` without identities, or identities over plain
  ``mqtt://``, is refused by the config.
- Nothing here imports aiomqtt or paho; ``simulator.link`` does the MQTT.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import itertools
import logging
import random
import resource
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import plumbing
from edge_agent.core import (
    REPORT_KEY,
    AgentCore,
    AgentState,
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
    HealthFailed,
    HealthPassed,
    Ignored,
    Install,
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
    WorkloadExited,
)
from edge_agent.executors import ExecutorTable
from edge_agent.runtime import ApplyError
from edge_agent.settings import FetchConfig
from plumbing.net import Backoff
from protocols import Desired, bundle_references, validate_device_id
from simulator.inventory import DeviceInventory
from simulator.link import DeviceLink, Incoming, LinkError, LinkSettings
from simulator.profiles import (
    ApplySpec,
    FlakySpec,
    Profile,
    SlowSpec,
    StormSpec,
    Window,
    WorkloadsSpec,
    device_rng,
    offline_windows,
)

if TYPE_CHECKING:
    from edge_agent.supervisor.transaction import RunSource
    from simulator.runtime import SimRuntime
    from simulator.transfer import DeviceTransfers, TransferSettings

__all__ = [
    "BundleCounters",
    "Fleet",
    "FleetConfig",
    "FleetCounters",
    "FleetError",
    "FleetTimeout",
    "SimApplier",
    "VirtualDevice",
    "WorkloadCounters",
    "device_backoff",
    "device_ids",
    "device_rng",
    "raise_nofile_limit",
    "tune_gc_for_many_devices",
]

log = logging.getLogger("driftless.sim")

FD_HEADROOM = 64  # descriptors beyond one per device: logs, the loop, stdio, a bench's clients
SIM_WINDOW_CHUNKS = 2
SIM_FETCH = FetchConfig(window_chunks=SIM_WINDOW_CHUNKS)
"""The simulated devices' transfers: the agent's chunk size and timeouts, a window of 2.

A chunk in flight is held in the worker's memory until its device hashes it, so
the window is what a transfer costs per device (64 KiB x 2 here, x 8 with the
agent's default); with 500 devices per process a window of 8 peaked at ~550 KiB
per device against ~190 KiB for 2, and the fleet finished in the same time: the
hub and the broker, not each device's round trips, set the pace.
"""


class FleetError(RuntimeError):
    """The fleet cannot run as configured here (bad settings, too few file descriptors)."""


class FleetTimeout(TimeoutError):
    """A wait on the fleet's counters passed its deadline."""


# ---------------------------------------------------------------- configuration


def device_ids(count: int, prefix: str = "sim") -> tuple[str, ...]:
    """Pure: ``count`` ids ``{prefix}-00000``, ``{prefix}-00001``, ... in sorting order."""
    if count < 0:
        raise ValueError("count must not be negative")
    width = max(5, len(str(max(count - 1, 0))))
    return tuple(validate_device_id(f"{prefix}-{i:0{width}d}") for i in range(count))


def _check_heartbeat(heartbeat_s: float | None) -> None:
    """The protocol's bounds on ``Birth.heartbeat_s``; raises ValueError."""
    if heartbeat_s is not None and not 1.0 <= heartbeat_s <= 86400.0:
        raise ValueError(f"heartbeat_s {heartbeat_s} is not within [1, 86400] s")


@dataclass(frozen=True)
class FleetConfig:
    """Everything a fleet run depends on; limits carry their unit in the name."""

    broker_url: str
    device_ids: tuple[str, ...]
    seed: int = 0
    apply_time_s: float = 0.0
    apply_jitter_s: float = 0.0
    failure_rate: float = 0.0
    max_concurrent_connects: int = 64
    reconnect_min_s: float = 0.2
    reconnect_max_s: float = 30.0
    keepalive_s: int = 60
    heartbeat_s: float | None = 30.0
    """A state report this often while connected (1..86400 s; None: no heartbeats)."""
    session_expiry_s: int = 3600
    op_timeout_s: float = 10.0
    stop_timeout_s: float = 15.0
    agent_version: str = f"sim-{plumbing.__version__}"
    flaky: FlakySpec | None = None
    storm: StormSpec | None = None
    slow: SlowSpec | None = None
    profile_name: str = "custom"
    root_path: Path | None = None
    """The fleet's root.json: devices verify bundles against it; None: a fetch fails."""
    fetch: FetchConfig = field(default_factory=lambda: SIM_FETCH)
    """Chunk size, window and timeouts of every device's transfers (see SIM_FETCH)."""
    bundle_disk_max_bytes: int = 256 * 1024 * 1024
    """Each device's simulated bundle storage, accounted in bytes (none are kept)."""
    frame_queue_max: int = 64
    """Chunk frames waiting per device; more are dropped (and asked for again)."""
    max_transfer_s: float = 3600.0
    """A bundle not complete after this long fails its generation (the partial stays)."""
    identity_dir: Path | None = None
    """The devices' enrolled identities (``simulator.enroll``); needs an ``mqtts://`` broker."""
    workloads: WorkloadsSpec | None = None
    """Devices supervise their workloads with simulated processes; None: they supervise none."""
    restart_floor_s: float = 1.0
    """The supervisor's shortest restart delay (the agent's ``restart_floor_s``)."""
    rollback_timeout_s: float = 120.0
    """How long a rollback waits for the previous versions to be healthy again."""

    @classmethod
    def from_profile(
        cls, profile: Profile, *, broker_url: str, device_ids: tuple[str, ...], **limits: Any
    ) -> FleetConfig:
        """The fleet a profile describes; ``limits`` sets the other fields (seed, timeouts)."""
        return cls(
            broker_url=broker_url,
            device_ids=device_ids,
            apply_time_s=profile.apply.time_s,
            apply_jitter_s=profile.apply.jitter_s,
            failure_rate=profile.apply.failure_rate,
            flaky=profile.flaky,
            storm=profile.storm,
            slow=profile.slow,
            workloads=profile.workloads,
            profile_name=profile.name,
            **limits,
        )

    def profile(self) -> Profile:
        """The fault part of this config as a profile (for schedules and reports)."""
        return Profile(
            name=self.profile_name,
            apply=ApplySpec(
                time_s=self.apply_time_s,
                jitter_s=self.apply_jitter_s,
                failure_rate=self.failure_rate,
            ),
            flaky=self.flaky,
            storm=self.storm,
            slow=self.slow,
            workloads=self.workloads,
        )

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate {self.failure_rate} is not within [0, 1]")
        if self.apply_time_s < 0 or self.apply_jitter_s < 0:
            raise ValueError("apply_time_s and apply_jitter_s must not be negative")
        if self.max_concurrent_connects < 1:
            raise ValueError("max_concurrent_connects must be at least 1")
        _check_heartbeat(self.heartbeat_s)
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ValueError("need 0 < reconnect_min_s <= reconnect_max_s")
        if len(set(self.device_ids)) != len(self.device_ids):
            raise ValueError("device ids must be unique (each one is an MQTT client id)")
        for device_id in self.device_ids:
            validate_device_id(device_id)
        if self.restart_floor_s <= 0 or self.rollback_timeout_s <= 0:
            raise ValueError("restart_floor_s and rollback_timeout_s must be positive")
        if self.bundle_disk_max_bytes <= 0 or self.max_transfer_s <= 0:
            raise ValueError("bundle_disk_max_bytes and max_transfer_s must be positive")
        if self.frame_queue_max < 2 * self.fetch.window_chunks:
            raise ValueError("frame_queue_max must hold at least two windows of chunks")
        tls = self.link_settings().tls
        if tls and self.identity_dir is None:
            raise ValueError(
                "an mqtts:// broker needs the devices' identities (identity_dir; "
                "driftless sim run --enroll makes them)"
            )
        if self.identity_dir is not None and not tls:
            raise ValueError(
                "enrolled devices connect with mutual TLS: the broker URL must be mqtts://"
            )

    def link_settings(self) -> LinkSettings:
        return LinkSettings.from_url(
            self.broker_url,
            keepalive_s=self.keepalive_s,
            session_expiry_s=self.session_expiry_s,
            op_timeout_s=self.op_timeout_s,
            slow=self.slow,
        )


def device_backoff(config: FleetConfig, device_id: str) -> Backoff:
    """Pure: the device's reconnect backoff, jittered by its own seeded rng."""
    return Backoff(
        min_s=config.reconnect_min_s,
        max_s=config.reconnect_max_s,
        rng=device_rng(config.seed, device_id, "backoff"),
    )


GC_THRESHOLDS = (10_000, 10, 10)
"""CPython's cyclic collector thresholds for a process that holds thousands of devices.

With the defaults (700, 10, 10) a full collection walks the whole heap every
time a quarter of it is new, and a reconnect storm renews every device's client
objects: a worker with 2,500 devices spent ~30% of its CPU in the collector
during a storm, and a process of 2,500 bare MQTT clients ~27%
(``py-spy --native``, docs/benchmarks.md). With a young generation of 10,000,
full collections fall from ~20 to ~1 per storm, the workers' CPU per storm by
~30%, for ~30% more resident memory (garbage waits longer for a full collection).
"""


def tune_gc_for_many_devices() -> None:
    """Set :data:`GC_THRESHOLDS` for this whole process (worker entry points call it)."""
    gc.set_threshold(*GC_THRESHOLDS)


def raise_nofile_limit(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force.

    Raises FleetError if even the hard limit is below ``needed``: without this a
    process fails at ~1,016 connections (FIELD-NOTES).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft < needed:
        raise FleetError(
            f"{needed} file descriptors needed but the hard RLIMIT_NOFILE is {hard}; "
            "raise it (ulimit -Hn) or split the fleet over processes"
        )
    return soft


# ---------------------------------------------------------------- simulated applier


@dataclass(frozen=True)
class ApplyOutcome:
    duration_s: float
    error: str | None


class SimApplier:
    """The simulated runtime: an apply takes a while and sometimes fails.

    Rule: outcomes come only from the injected rng, so a seed replays a run.
    """

    def __init__(
        self,
        *,
        apply_time_s: float,
        jitter_s: float = 0.0,
        failure_rate: float = 0.0,
        rng: random.Random,
    ) -> None:
        self.apply_time_s = apply_time_s
        self.jitter_s = jitter_s
        self.failure_rate = failure_rate
        self.rng = rng

    def plan(self, desired: Desired) -> ApplyOutcome:
        """Draw the next apply's duration and verdict (consumes randomness, no I/O)."""
        duration = self.apply_time_s
        if self.jitter_s > 0:
            duration += self.rng.uniform(0.0, self.jitter_s)
        failed = self.failure_rate > 0 and self.rng.random() < self.failure_rate
        error = f"simulated failure applying generation {desired.generation}" if failed else None
        return ApplyOutcome(duration, error)

    async def apply(self, desired: Desired) -> None:
        """Take the planned time, then succeed or raise ApplyError."""
        outcome = self.plan(desired)
        if outcome.duration_s > 0:
            await asyncio.sleep(outcome.duration_s)  # the simulated work itself
        if outcome.error is not None:
            raise ApplyError(outcome.error)


# ---------------------------------------------------------------- counters


def _bump(table: dict[Any, int], key: Any) -> None:
    table[key] = table.get(key, 0) + 1


@dataclass
class BundleCounters:
    """What the fleet's bundle transfers did (``simulator.transfer``); all totals."""

    jobs: int = 0  # Fetch actions run (a generation's bundles)
    jobs_ok: int = 0
    jobs_failed: int = 0
    jobs_cancelled: int = 0  # superseded by a newer document (CancelFetch)
    fetched: int = 0  # bundles that arrived whole and verified
    already_held: int = 0  # bundles a job found verified on the device's disk
    requests: int = 0  # bundle_req messages the broker acknowledged
    requests_unsent: int = 0  # requests that met a link down (sent again on LinkUp)
    frames: int = 0  # bundle_data frames received (data and error frames)
    frame_bytes: int = 0  # data bytes in the data frames received
    bytes_accepted: int = 0  # bytes the fetch cores accepted (each byte of a bundle once)
    duplicate_bytes: int = 0  # data bytes in frames dropped as duplicates
    link_drops: int = 0  # links lost while a transfer was in progress
    resumes: int = 0  # transfers that continued with bytes already held
    resumed_bytes: int = 0  # the bytes held at those moments (not asked for again)
    fetched_after_resume: int = 0  # bundles completed that had resumed at least once
    evicted: int = 0  # bundles evicted from simulated disks to make room
    dropped: dict[str, int] = field(default_factory=dict)  # frames dropped, by why
    frames_rejected: dict[str, int] = field(default_factory=dict)  # malformed frames, by reason
    errors: dict[str, int] = field(default_factory=dict)  # bundles refused, by error type

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        out: dict[str, Any] = {}
        for name, value in vars(self).items():
            out[name] = dict(sorted(value.items())) if isinstance(value, dict) else value
        return out


@dataclass
class WorkloadCounters:
    """What the devices' simulated workloads did (``workloads`` profiles); all totals."""

    healthy: int = 0  # HealthPassed events fed to cores
    unhealthy: int = 0  # HealthFailed events
    restarts: int = 0  # exits the supervisor restarts after
    gave_up: int = 0  # exits it did not restart after (failed or finished)
    start_failures: int = 0  # rollout starts that could not start (the step failed)

    def snapshot(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class FleetCounters:
    """What the whole fleet did; mutated only by its devices, read by anyone."""

    connected: int = 0  # devices with an open session right now
    connects: int = 0  # CONNACKs received, all time
    connect_failures: int = 0  # attempts that got no CONNACK
    connections_lost: int = 0  # sessions that ended other than by stop()
    desired_received: int = 0  # messages received on devices' desired topics
    reports_sent: int = 0  # reported messages the broker acknowledged
    reports_deferred: int = 0  # reports that had to wait for a later connection
    ignored: int = 0  # valid desired documents that changed nothing
    applied: dict[int, int] = field(default_factory=dict)  # generation -> devices
    failed: dict[int, int] = field(default_factory=dict)  # generation -> devices
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> messages
    messages_in: int = 0  # messages received, any topic
    messages_out: int = 0  # publishes the broker acknowledged (QoS 1) or took (QoS 0)
    bytes_in: int = 0  # payload bytes of messages_in
    bytes_out: int = 0  # payload bytes of messages_out
    network_drops: int = 0  # offline windows begun (a device's network went down)
    severed: int = 0  # connections cut by a fault (no DISCONNECT: the broker sends the Will)
    offline_now: int = 0  # devices whose network is down right now
    ever_connected: int = 0  # devices that have had a session at least once
    bundles: BundleCounters = field(default_factory=BundleCounters)
    workloads: WorkloadCounters = field(default_factory=WorkloadCounters)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy (generation keys become strings)."""
        return {
            "connected": self.connected,
            "offline_now": self.offline_now,
            "connects": self.connects,
            "connect_failures": self.connect_failures,
            "connections_lost": self.connections_lost,
            "desired_received": self.desired_received,
            "reports_sent": self.reports_sent,
            "reports_deferred": self.reports_deferred,
            "ignored": self.ignored,
            "applied": {str(k): v for k, v in sorted(self.applied.items())},
            "failed": {str(k): v for k, v in sorted(self.failed.items())},
            "rejected": dict(sorted(self.rejected.items())),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "network_drops": self.network_drops,
            "severed": self.severed,
            "ever_connected": self.ever_connected,
            "bundles": self.bundles.snapshot(),
            "workloads": self.workloads.snapshot(),
        }


# ---------------------------------------------------------------- one device


async def _nothing(_action: object) -> None:
    """An action that needs nothing done on a simulated device."""


class VirtualDevice:
    """One device: the real core, an in-memory "disk", a simulated applier, one MQTT session."""

    def __init__(
        self,
        device_id: str,
        *,
        config: FleetConfig,
        settings: LinkSettings,
        counters: FleetCounters,
        connect_gate: asyncio.Semaphore,
        changed: Callable[[], None],
        clock: Callable[[], float],
        state: AgentState | None = None,
        persist: Callable[[str, AgentState], None] | None = None,
        transfer_settings: TransferSettings | None = None,
        tls_context: ssl.SSLContext | None = None,
        cert_serial: str | None = None,
    ) -> None:
        self.device_id = device_id
        self._tls_context = tls_context  # its own certificate, for mqtts:// (one per device)
        self._cert_serial = cert_serial  # named in births, as an agent does
        self.core = AgentCore(
            device_id,
            state or AgentState(),
            config.agent_version,
            # With the fleet's root, desired documents must be hub-signed, as on a device.
            trusted_root=transfer_settings.trusted_root if transfer_settings else None,
            clock_skew_s=transfer_settings.clock_skew_s if transfer_settings else 0,
            supervises=config.workloads is not None,
            health_timeout_s=config.workloads.health_timeout_s if config.workloads else 60.0,
            heartbeat_s=config.heartbeat_s,
        )
        self._config = config
        self._runtime: SimRuntime | None = None  # made at the first install (workloads)
        self.saved_state = self.core.state  # what a disk would hold after the last PersistState
        self.saved_outbox = self.core.outbox.snapshot()  # likewise, for the outbox
        self._persist = persist
        self.applier = SimApplier(
            apply_time_s=config.apply_time_s,
            jitter_s=config.apply_jitter_s,
            failure_rate=config.failure_rate,
            rng=device_rng(config.seed, device_id, "apply"),
        )
        self.backoff = device_backoff(config, device_id)
        self.inventory = DeviceInventory(config.seed, device_id)
        self.session_present: bool | None = None  # the last CONNACK's flag
        self.transfers: DeviceTransfers | None = None  # made at the first FetchBundles
        self._transfer_settings = transfer_settings
        self._settings = settings
        self._counters = counters
        self._gate = connect_gate
        self._changed = changed
        self._clock = clock
        self._lock = asyncio.Lock()
        self._stopping = asyncio.Event()
        self._link: DeviceLink | None = None
        self._will: tuple[str, bytes] | None = None
        self._subscribe: tuple[str, ...] = ()  # what the core asked to subscribe to
        self._fetching: dict[int, FetchBundles] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # steps and refusals in flight
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._link_ready = False  # subscribed on the current session (bundle frames flow)
        self._ever_connected = False
        self._offline_depth = 0  # offline windows in force; the network is up at 0
        self._muted = False  # a hung agent: publishes nothing, its connection lives on
        self._wake = asyncio.Event()  # set when the network returns or stop() is called
        self._executors = self._executor_table()

    # -- the core

    def _executor_table(self) -> ExecutorTable[Awaitable[Event | None]]:
        table: ExecutorTable[Awaitable[Event | None]] = ExecutorTable()
        table.register(PersistState, self._persist_state)
        table.register(SaveOutbox, self._save_outbox)
        table.register(SetWill, self._set_will)
        table.register(Publish, self._publish)
        table.register(Subscribe, self._ask_subscribe)
        table.register(TransferLink, self._transfer_link)
        table.register(DeliverFrame, self._deliver_frame)
        table.register(DeliverCertAnswer, _nothing)  # simulated devices do not renew
        table.register(CancelFetch, self._cancel_fetch)
        table.register(SetTimer, self._set_timer)
        table.register(CancelTimer, self._cancel_timer)
        table.register(Rejected, self._rejected)
        table.register(Ignored, self._ignored)
        table.register(NoOp, _nothing)
        table.register(FetchBundles, self._fetch)
        table.register(Switch, self._switch)
        if self.core.supervises:  # simulated processes (simulator.runtime)
            table.register(Install, self._install)
            table.register(Commit, self._commit)
            table.register(RollBack, self._roll_back)
            table.register(StartWorkload, self._start_workload)
            table.register(StopWorkload, self._stop_workload)
            table.register(WaitForHealth, self._wait_for_health)
        else:
            table.register(Install, self._done_in_place)  # nothing is unpacked
            table.register(Commit, self._done_in_place)
            table.register(RollBack, self._done_in_place)
            table.register(StartWorkload, self._unsupervised)
            table.register(StopWorkload, self._unsupervised)
            table.register(WaitForHealth, self._unsupervised)
        table.register(OverrideLocks, _nothing)  # simulated devices take no locks
        table.register(RunJobs, _nothing)  # nor run jobs (the rollouts issue may simulate them)
        table.require_complete()
        return table

    async def feed(self, event: Event) -> None:
        """Hand one event to the core and run its actions in order, one event at a time;
        then the events that executors answered at once."""
        async with self._lock:
            pending = [event]
            while pending:
                for action in self.core.handle(pending.pop(0)):
                    follow = await self._executors.run(action)
                    if follow is not None:
                        pending.append(follow)

    async def _persist_state(self, action: PersistState) -> None:
        before, state = self.saved_state, action.state
        self.saved_state = state
        # Counted here, before the report that follows goes out, so whoever sees it sees them.
        if state.applied_generation > before.applied_generation:
            _bump(self._counters.applied, state.applied_generation)
            self._changed()
        if state.failed_generation > before.failed_generation:
            _bump(self._counters.failed, state.failed_generation)
            self._changed()
        if self._persist is not None:
            self._persist(self.device_id, state)

    async def _save_outbox(self, action: SaveOutbox) -> None:
        kept = action.snapshot.next_order - self.saved_outbox.next_order
        self.saved_outbox = action.snapshot
        if kept > 0:  # reports that wait for a later connection
            self._counters.reports_deferred += kept
            self._changed()

    async def _set_will(self, action: SetWill) -> None:
        self._will = (action.topic, action.payload)

    async def _ask_subscribe(self, action: Subscribe) -> None:
        self._subscribe = action.topics  # the session subscribes once the birth is out

    async def _transfer_link(self, action: TransferLink) -> None:
        self._link_ready = action.up
        if self.transfers is not None:
            if action.up:
                self.transfers.link_up()
            else:
                self.transfers.link_down()

    async def _deliver_frame(self, action: DeliverFrame) -> None:
        if self.transfers is not None:
            self.transfers.on_frame(action.payload)
        else:
            _bump(self._counters.bundles.dropped, "not_fetching")

    async def _cancel_fetch(self, action: CancelFetch) -> None:
        self._fetching.pop(action.generation, None)
        if self.transfers is not None:
            self.transfers.cancel(action.generation)

    async def _set_timer(self, action: SetTimer) -> None:
        await self._cancel_timer(CancelTimer(action.name))
        loop = asyncio.get_running_loop()
        delay = max(0.0, action.at - self._clock())
        self._timers[action.name] = loop.call_later(delay, self._timer_due, action.name)

    def _timer_due(self, name: str) -> None:
        self._timers.pop(name, None)
        self._spawn(self.feed(TimerFired(name, self._clock())), f"timer:{self.device_id}")

    async def _cancel_timer(self, action: CancelTimer) -> None:
        handle = self._timers.pop(action.name, None)
        if handle is not None:
            handle.cancel()

    async def _rejected(self, action: Rejected) -> None:
        _bump(self._counters.rejected, action.reason)
        self._changed()
        log.warning(
            "rejected message",
            extra={"device": self.device_id, "reason": action.reason, "detail": action.detail},
        )

    async def _ignored(self, action: Ignored) -> None:
        self._counters.ignored += 1
        self._changed()

    async def _publish(self, action: Publish) -> Event | None:
        if self._muted:
            return None  # hung: nothing goes out, nothing is kept (the agent is stuck)
        link = self._link
        try:
            if link is None:
                raise LinkError("offline")
            await link.publish(action.topic, action.payload, qos=action.qos, retain=action.retain)
        except LinkError:
            return PublishFailed(action, self._clock())  # the outbox keeps what matters
        self._counters.messages_out += 1
        self._counters.bytes_out += len(action.payload)
        if action.key == REPORT_KEY:
            self._counters.reports_sent += 1
            self._changed()
        return None

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _done_in_place(self, step: Install | Commit | RollBack) -> Event:
        """A step with nothing to do on a simulated device (no files): done at once."""
        return StepDone(step, self._clock())

    async def _unsupervised(self, step: StartWorkload | StopWorkload | WaitForHealth) -> Event:
        """The simulated runtime supervises nothing; the core never plans these for it."""
        return StepFailed(step, "the simulated runtime does not supervise workloads", self._clock())

    # -- the supervising runtime (profiles with ``workloads``)

    @property
    def runtime(self) -> SimRuntime:
        """The device's simulated supervising runtime, made when first needed."""
        if self._runtime is None:
            from simulator.runtime import SimRuntime

            spec = self._config.workloads
            assert spec is not None, "only supervising devices have a runtime"
            seed, device_id = self._config.seed, self.device_id
            self._runtime = SimRuntime(
                spec,
                manifests=self._manifest,
                feed=self._workload_event,
                clock=self._clock,
                process_rng=device_rng(seed, device_id, "processes"),
                restart_rng=device_rng(seed, device_id, "restarts"),
                floor_s=self._config.restart_floor_s,
                step_timeout_s=self._config.rollback_timeout_s,
            )
        return self._runtime

    def _manifest(self, sha: str) -> RunSource | None:
        return self.transfers.disk.verified.get(sha) if self.transfers is not None else None

    def _workload_event(self, event: WorkloadExited | HealthPassed | HealthFailed) -> None:
        """The supervisor's events go to the core in order, after what it is handling."""
        counts = self._counters.workloads
        if isinstance(event, HealthPassed):
            counts.healthy += 1
        elif isinstance(event, HealthFailed):
            counts.unhealthy += 1
        elif event.restarting:
            counts.restarts += 1
        else:
            counts.gave_up += 1
        self._changed()
        self._spawn(self.feed(event), f"workload:{self.device_id}")

    async def _install(self, step: Install) -> Event:
        try:
            self.runtime.install(step.desired)
        except ApplyError as exc:
            return StepFailed(step, str(exc), self._clock())
        return StepDone(step, self._clock())

    async def _start_workload(self, step: StartWorkload) -> None:
        self._spawn(self._starting(step), f"start:{self.device_id}")

    async def _starting(self, step: StartWorkload) -> None:
        try:
            await self.runtime.start_workload(step.generation, step.name)
        except ApplyError as exc:
            self._counters.workloads.start_failures += 1
            await self.feed(StepFailed(step, str(exc), self._clock()))
            return
        await self.feed(StepDone(step, self._clock()))

    async def _stop_workload(self, step: StopWorkload) -> Event:
        self.runtime.stop_workload(step.generation, step.name)
        return StepDone(step, self._clock())

    async def _wait_for_health(self, step: WaitForHealth) -> Event:
        try:
            self.runtime.wait_for_health(step.generation, step.names)
        except ApplyError as exc:
            return StepFailed(step, str(exc), self._clock())
        return StepDone(step, self._clock())

    async def _commit(self, step: Commit) -> Event:
        self.runtime.commit(step.generation)
        return StepDone(step, self._clock())

    async def _roll_back(self, step: RollBack) -> None:
        self._spawn(self._rolling_back(step), f"rollback:{self.device_id}")

    async def _rolling_back(self, step: RollBack) -> None:
        try:
            detail = await self.runtime.roll_back(step.generation, step.to_generation)
        except ApplyError as exc:
            await self.feed(StepFailed(step, str(exc), self._clock()))
            return
        await self.feed(StepDone(step, self._clock(), detail or ""))

    async def _switch(self, step: Switch) -> None:
        """The simulated apply: its duration and verdict, in a task of its own."""
        self._spawn(self._apply(step), f"apply:{self.device_id}")

    async def _apply(self, step: Switch) -> None:
        desired = step.desired
        try:
            await self.applier.apply(desired)
        except ApplyError as exc:
            await self.feed(StepFailed(step, str(exc), self._clock()))
            return
        if self.transfers is not None:  # the install: security versions, what to keep
            self.transfers.applied(bundle_references(desired.config))
        await self.feed(StepDone(step, self._clock()))

    async def _fetch(self, step: FetchBundles) -> None:
        """Run the core's FetchBundles: the real fetch job over this link, or a refusal."""
        self._fetching[step.generation] = step
        if self._transfer_settings is None:
            self._counters.bundles.jobs += 1
            self._counters.bundles.jobs_failed += 1
            _bump(self._counters.bundles.errors, "NoTrustedRoot")
            refusal = self._fetch_done(
                step.generation,
                False,
                "no trusted root: this simulated device cannot verify bundles; start the "
                "simulator with --root ROOT_JSON (the fleet's root.json)",
            )
            self._spawn(refusal, f"fetch:{self.device_id}")
            return
        if self.transfers is None:
            from simulator.transfer import DeviceTransfers

            self.transfers = DeviceTransfers(
                self.device_id,
                self._transfer_settings,
                counters=self._counters.bundles,
                changed=self._changed,
                publish=self._publish_request,
                finished=self._fetch_done,
                link_up=self._link_ready,
            )
        self.transfers.start(step.generation, step.bundles)

    async def _fetch_done(self, generation: int, ok: bool, error: str | None) -> None:
        step = self._fetching.pop(generation, None)
        if step is None:
            return  # superseded meanwhile: the core is not waiting for it
        now = self._clock()
        await self.feed(StepDone(step, now) if ok else StepFailed(step, error or "failed", now))

    async def _publish_request(self, name: str, payload: bytes) -> bool:
        """A bundle request, QoS 1; False when there is no connection to take it."""
        link = self._link
        if link is None:
            return False
        try:
            await link.publish(name, payload, qos=1, retain=False)
        except LinkError:
            return False
        self._counters.messages_out += 1
        self._counters.bytes_out += len(payload)
        return True

    # -- the connection

    async def run(self) -> None:
        """Connect, serve, and reconnect after a jittered backoff until :meth:`stop`."""
        await self.feed(Booted(self._clock()))
        while not self._stopping.is_set():
            while self._offline_depth > 0 and not self._stopping.is_set():
                self._wake.clear()
                await self._wake.wait()
            if self._stopping.is_set():
                return
            try:
                await self._session()
            except LinkError as exc:
                log.debug("link down", extra={"device": self.device_id, "error": str(exc)})
            if self._stopping.is_set():
                return
            delay = self.backoff.next_delay_s()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _session(self) -> None:
        await self.feed(Connecting(self._clock()))
        assert self._will is not None, "the core sets a Will on Connecting"
        will_topic, will_payload = self._will
        link = DeviceLink(
            self.device_id,
            self._settings,
            will_topic=will_topic,
            will_payload=will_payload,
            tls_context=self._tls_context,
        )
        async with self._gate:
            if self._stopping.is_set():
                return
            try:
                present = await link.open()
            except LinkError:
                self._counters.connect_failures += 1
                self._changed()
                raise
        if self._stopping.is_set():  # stop() came while we were connecting
            await self._goodbye(link)
            return
        self._link = link
        self.session_present = present
        self._counters.connected += 1
        self._counters.connects += 1
        if not self._ever_connected:
            self._ever_connected = True
            self._counters.ever_connected += 1
        self._changed()
        if self._offline_depth > 0:  # the network went while the CONNACK was on its way
            link.sever()
            self._counters.severed += 1
        try:
            await self._serve(link, present)
        finally:
            self._link = None
            self._counters.connected -= 1
            if not self._stopping.is_set():
                self._counters.connections_lost += 1
            self._changed()
            await self.feed(Disconnected(self._clock()))
            await link.close()

    async def _serve(self, link: DeviceLink, session_present: bool) -> None:
        # The core drains its outbox, publishes status and birth, and asks for a SUBSCRIBE.
        await self.feed(
            Connected(self._clock(), session_present, self.inventory.reading(), self._cert_serial)
        )
        if not await link.subscribe(*self._subscribe, qos=1):
            raise LinkError(f"{self.device_id}: subscription to {self._subscribe} refused")
        # Everything already received arrived before the SUBACK: the core coalesces it,
        # and a transfer handles the frames the broker kept before it hears "link up".
        for _ in range(link.pending()):
            await self._on_message(await link.receive())
        await self.feed(Subscribed(self._clock()))
        self.backoff.reset()
        while True:
            await self._on_message(await link.receive())

    async def _on_message(self, message: Incoming) -> None:
        self._counters.messages_in += 1
        self._counters.bytes_in += len(message.payload)
        if message.topic == self.core.desired_topic:
            self._counters.desired_received += 1
            self._changed()
        await self.feed(MessageIn(message.topic, message.payload, self._clock()))

    async def _goodbye(self, link: DeviceLink) -> None:
        if link.is_open:
            await self.feed(Stopping(self._clock()))  # offline for this session, retained
            await link.close()

    # -- control

    async def stop(self) -> None:
        """Orderly shutdown: no step in flight, status offline, clean DISCONNECT."""
        self._stopping.set()
        self._wake.set()
        for task in list(self._tasks):
            task.cancel()
        for handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._runtime is not None:
            self._runtime.close()
        if self.transfers is not None:
            await self.transfers.close()
        link = self._link
        if link is not None:
            await self._goodbye(link)

    def sever(self) -> bool:
        """Fault: drop the connection without DISCONNECT (the broker sends the Will).

        Returns False when there was no connection to drop. The device reconnects
        after its backoff with a new session.
        """
        link = self._link
        if link is None or not link.is_open:
            return False
        link.sever()
        return True

    @property
    def subscribed(self) -> bool:
        """The current session's SUBSCRIBE was acknowledged (documents and frames flow)."""
        return self._link_ready

    @property
    def network_up(self) -> bool:
        return self._offline_depth == 0

    def network_down(self) -> None:
        """An offline window begins: sever the connection; no attempt until it ends."""
        self._offline_depth += 1
        if self._offline_depth == 1:
            self._counters.network_drops += 1
            self._counters.offline_now += 1
            if self.sever():
                self._counters.severed += 1
            self._changed()

    def mute(self, muted: bool = True) -> None:
        """Fault: the agent hangs (``muted``) or recovers. A hung agent publishes
        nothing, but its MQTT client still answers pings, so the broker keeps the
        connection and sends no Will: only missed heartbeats show it gone."""
        self._muted = muted

    def network_restored(self, *, all_windows: bool = False) -> None:
        """An offline window ends (``all_windows``: every one does); reconnect when none is left."""
        if self._offline_depth == 0:
            return
        self._offline_depth = 0 if all_windows else self._offline_depth - 1
        if self._offline_depth == 0:
            self._counters.offline_now -= 1
            self._wake.set()
            self._changed()


# ---------------------------------------------------------------- faults

MAX_SKIPPED_WINDOWS = 1_000_000  # per device, when a (re)started fleet catches up with its epoch


class FaultScheduler:
    """Drives every device's offline windows from one heap, in time order.

    ``windows(device_id)`` gives the device's windows in start order, in seconds
    since ``epoch`` (a ``clock()`` value). Windows that ended before the
    scheduler started are skipped, so a restarted worker rejoins the run's
    schedule; a window in progress takes effect at once.
    """

    DOWN, UP = 0, 1

    def __init__(
        self,
        devices: Mapping[str, VirtualDevice],
        windows: Callable[[str], Iterator[Window]],
        *,
        epoch: float,
        clock: Callable[[], float],
    ) -> None:
        self._devices = devices
        self._windows = windows
        self._epoch = epoch
        self._clock = clock
        self._seq = itertools.count()
        self._heap: list[tuple[float, int, int, str]] = []
        self._streams: dict[str, Iterator[Window]] = {}
        self.events = 0  # windows begun + ended, for tests and reports

    def _now_s(self) -> float:
        return self._clock() - self._epoch

    def _push_next_window(self, device_id: str, not_before_s: float) -> None:
        stream = self._streams[device_id]
        for _ in range(MAX_SKIPPED_WINDOWS):
            window = next(stream, None)
            if window is None:
                return
            if window.end_s > not_before_s:
                heapq.heappush(self._heap, (window.start_s, next(self._seq), self.DOWN, device_id))
                heapq.heappush(self._heap, (window.end_s, next(self._seq), self.UP, device_id))
                return
        raise FleetError(f"{device_id}: more than {MAX_SKIPPED_WINDOWS} offline windows skipped")

    async def run(self) -> None:
        """Until cancelled (or every schedule ran out)."""
        now = self._now_s()
        for device_id in self._devices:
            self._streams[device_id] = self._windows(device_id)
            self._push_next_window(device_id, now)
        while self._heap:
            due_s, _, kind, device_id = self._heap[0]
            delay = due_s - self._now_s()
            if delay > 0:
                await asyncio.sleep(min(delay, 1.0))  # re-read the clock at least every second
                continue
            heapq.heappop(self._heap)
            self.events += 1
            device = self._devices[device_id]
            if kind == self.DOWN:
                device.network_down()
                self._push_next_window(device_id, due_s)
            else:
                device.network_restored()


# ---------------------------------------------------------------- the fleet


class Fleet:
    """Runs a :class:`VirtualDevice` task per device id; ``async with Fleet(cfg) as fleet``.

    ``epoch`` (a ``clock()`` value, default: when :meth:`start` runs) is t = 0 of
    the profile's fault schedule; worker processes of one run share it.
    ``states`` are the devices' saved states to start from; ``persist`` is called
    with every state a device saves.
    """

    def __init__(
        self,
        config: FleetConfig,
        *,
        clock: Callable[[], float] = time.time,
        epoch: float | None = None,
        states: Mapping[str, AgentState] | None = None,
        persist: Callable[[str, AgentState], None] | None = None,
    ) -> None:
        self.config = config
        self.counters = FleetCounters()
        self.devices: dict[str, VirtualDevice] = {}
        self.epoch = epoch
        self.faults: FaultScheduler | None = None
        self._clock = clock
        self._states = dict(states or {})
        self._persist = persist
        self._settings = config.link_settings()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._fault_task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self.config.device_ids)

    def _notify(self) -> None:
        self._changed.set()

    async def start(self) -> None:
        """Start every device; returns at once (use :meth:`wait_connected`). Raises FleetError."""
        if self._tasks:
            raise FleetError("fleet already started")
        limit = raise_nofile_limit(len(self) + FD_HEADROOM)
        gate = asyncio.Semaphore(self.config.max_concurrent_connects)
        transfers = self._transfer_settings()
        contexts = self._tls_contexts()
        for device_id in self.config.device_ids:
            device = VirtualDevice(
                device_id,
                config=self.config,
                settings=self._settings,
                counters=self.counters,
                connect_gate=gate,
                changed=self._notify,
                clock=self._clock,
                state=self._states.pop(device_id, None),
                persist=self._persist,
                transfer_settings=transfers,
                tls_context=contexts[device_id][0] if device_id in contexts else None,
                cert_serial=contexts[device_id][1] if device_id in contexts else None,
            )
            self.devices[device_id] = device
            self._tasks.append(asyncio.create_task(device.run(), name=f"device:{device_id}"))
        if self.epoch is None:
            self.epoch = self._clock()
        profile = self.config.profile()
        if profile.has_offline_windows:
            seed = self.config.seed
            self.faults = FaultScheduler(
                self.devices,
                lambda device_id: offline_windows(profile, seed, device_id),
                epoch=self.epoch,
                clock=self._clock,
            )
            self._fault_task = asyncio.create_task(self.faults.run(), name="faults")
        log.info(
            "fleet starting",
            extra={
                "devices": len(self),
                "broker": self.config.broker_url,
                "max_concurrent_connects": self.config.max_concurrent_connects,
                "nofile": limit,
            },
        )

    def _tls_contexts(self) -> dict[str, tuple[ssl.SSLContext, str]]:
        """Every device's own TLS context and certificate serial; empty without
        identities. Raises FleetError naming the first device whose identity is
        missing or unusable."""
        if self.config.identity_dir is None:
            return {}
        from simulator.enroll import DeviceIdentities, EnrollError

        identities = DeviceIdentities(self.config.identity_dir)
        try:
            ca_pem = identities.ca_pem()
            return {
                d: (identities.tls_context(d, ca_pem), identities.serial(d))
                for d in self.config.device_ids
            }
        except EnrollError as exc:
            raise FleetError(str(exc)) from None

    def _transfer_settings(self) -> TransferSettings | None:
        """What every device shares for bundle transfers; None without a root.

        Loads the verification stack only when there is a root. Raises FleetError
        for a root that cannot be read or does not verify.
        """
        cfg = self.config
        if cfg.root_path is None:
            return None
        from edge_agent.root import load_trusted_root
        from simulator.transfer import TransferSettings

        try:
            root = load_trusted_root(cfg.root_path)
        except ValueError as exc:
            raise FleetError(str(exc)) from None
        return TransferSettings(
            trusted_root=root,
            fetch=cfg.fetch,
            disk_max_bytes=cfg.bundle_disk_max_bytes,
            frame_queue_max=cfg.frame_queue_max,
            max_transfer_s=cfg.max_transfer_s,
            wall_clock=self._clock,
        )

    async def wait_until(
        self, predicate: Callable[[FleetCounters], bool], *, timeout_s: float, what: str
    ) -> None:
        """Wait, woken by counter changes, until ``predicate(counters)``; raises FleetTimeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(self.counters):
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FleetTimeout(
                    f"timed out after {timeout_s}s waiting for {what}; "
                    f"counters={self.counters.snapshot()}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_connected(self, *, timeout_s: float) -> None:
        """Wait until every device has an open session; raises FleetTimeout."""
        total = len(self)
        await self.wait_until(
            lambda c: c.connected >= total, timeout_s=timeout_s, what=f"{total} devices connected"
        )

    def applied_generations(self) -> dict[int, int]:
        """Pure read: how many devices have each generation applied right now."""
        out: dict[int, int] = {}
        for device in self.devices.values():
            _bump(out, device.core.state.applied_generation)
        return out

    async def _stop_faults(self) -> None:
        task, self._fault_task = self._fault_task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a schedule that could not run is logged, never fatal here
            log.error("fault schedule failed", extra={"error": repr(exc)})

    async def heal(self) -> None:
        """End every fault for good: no more offline windows, every network back up."""
        await self._stop_faults()
        for device in self.devices.values():
            device.network_restored(all_windows=True)

    async def stop(self) -> None:
        """Every device says offline and disconnects; stragglers are cancelled at the deadline."""
        await self._stop_faults()
        if not self._tasks:
            return
        goodbyes = asyncio.gather(
            *(device.stop() for device in self.devices.values()), return_exceptions=True
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(goodbyes, self.config.stop_timeout_s)
        _done, pending = await asyncio.wait(self._tasks, timeout=self.config.op_timeout_s)
        for task in pending:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for device_id, result in zip(self.config.device_ids, results, strict=True):
            if isinstance(result, Exception):
                log.error(
                    "device task failed",
                    extra={"device": device_id, "error": repr(result)},
                )
        self._tasks.clear()
        log.info("fleet stopped", extra={"counters": self.counters.snapshot()})

    async def __aenter__(self) -> Fleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
