"""The agent's reconcile core: events in, actions out, no I/O (architecture rule 8).

Rules:
- A desired document is applied only if its generation is newer than every
  generation applied, failed, in flight or already waiting (invariant 4).
- Applying is planned (:func:`edge_agent.plan.plan`): the core runs one step
  at a time (a :class:`edge_agent.plan.Step` is an action), records the
  driver's :class:`StepDone` / :class:`StepFailed` in the rollout and plans
  again, until the plan is a :class:`edge_agent.plan.NoOp`. A generation is
  recorded as applied only after its ``Commit`` step succeeded; the state is
  persisted (``PersistState``) before it is reported.
- A failed generation (a step failed, or after the switch a workload exited
  or failed its health check, or missed the health deadline: then it is
  rolled back and reported ``rolled_back``) is recorded as failed and not
  retried until a newer one arrives.
- Documents that arrive before the post-connect subscription is acknowledged
  are coalesced: only the newest is applied (invariant 2). This is what turns a
  backlog of queued deliveries into one apply after an offline period.
- A newer document supersedes a rollout still fetching its bundles
  (:class:`CancelFetch`, then its own plan); once the fetch is done it waits
  for the rollout to finish.
- A document *older* than the newest finished generation is answered with a
  report of the current state, so a hub whose count was reset can catch up.
- The connection lifecycle is decided here for every driver: the session
  number grows before every connect and the Last Will set for it
  (:class:`SetWill`) and the birth sent after it carry it; on every CONNACK
  the outbox is drained, then status online, birth and one
  :class:`Subscribe`; a granted SUBACK opens the coalescing window's end and
  the bundle transfer's link (:class:`TransferLink`). Incoming messages are
  routed by topic (:class:`MessageIn`): desired documents here, bundle frames
  and certificate answers to their consumers.
- Every birth and report carries ``(boot_epoch, seq)``; ``boot_epoch`` grows on
  every start and ``seq`` within a boot, so the hub can drop stale reports.
- A report made while the device cannot publish goes into the outbox
  (:mod:`edge_agent.outbox`; :class:`SaveOutbox` asks the driver to keep it):
  generation reports as state (newest wins), workload events in order.
- A desired payload is opened first (:func:`protocols.signed.open_sealed`):
  with a trusted root only a document signed by a threshold of the root's
  ``hub`` keys is read at all (invariant 9); without one (``--insecure-unsigned``)
  it is taken unverified. Then its device id must be ours.
- A HELD document (``config["hold"]`` true: pre-staging, :func:`edge_agent.plan.is_held`)
  is fetched and installed, never switched: it ends reported ``staged`` (its
  generation, ``applied_generation`` unchanged), nothing is persisted or recorded
  in the history. The staged generation counts as known (a copy of it changes
  nothing); a newer document, held or not, replaces it. Kept in memory only: after
  a restart the retained document stages again, from the cache.
- Heartbeat: every ``heartbeat_s`` while connected (a core timer armed at every
  CONNACK) the device sends a state report of where it is (``applied``, ``failed``,
  ``staged``, or ``applying`` a rollout in flight) with its workload table: the
  hub's liveness and soak evidence. The birth announces ``heartbeat_s``. Nothing
  is sent while offline (the birth after the reconnect says it all).
- Time is an input (``now`` on every event); nothing here reads a clock.
  A timer is asked for with :class:`SetTimer` and comes back as :class:`TimerFired`.

The same core runs in the paho driver on devices and in the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from msgspec import structs

from edge_agent.jobs import JobsInDocument, job_specs
from edge_agent.outbox import Lane, Outbox, OutboxLimits, OutboxSnapshot
from edge_agent.plan import (
    Commit,
    Current,
    FetchBundles,
    Install,
    NoOp,
    RollBack,
    Rollout,
    StartWorkload,
    Step,
    StopWorkload,
    Switch,
    WaitForHealth,
    WorkloadSpec,
    WorkloadSpecError,
    plan,
    step_generation,
    targets,
    workload_specs,
)
from edge_agent.supervisor.locks import LockOverride, LockOverrideError, parse_override
from protocols import (
    Birth,
    Channel,
    Desired,
    Inventory,
    ProtocolError,
    Reason,
    Reported,
    Status,
    WorkloadStatus,
    decode,
    encode,
    topic,
    validate_device_id,
)
from protocols.messages import JobStatus, LockStatus, Phase, WorkloadState
from protocols.signed import open_sealed

if TYPE_CHECKING:
    from firmware_bundles.trust import TrustedRoot

__all__ = [  # the steps are actions too; importable from here
    "Commit",
    "FetchBundles",
    "Install",
    "NoOp",
    "RollBack",
    "StartWorkload",
    "Step",
    "StopWorkload",
    "Switch",
    "WaitForHealth",
]

HISTORY_LIMIT = 32
REPORT_KEY = "reported"  # the outbox's state key of generation reports
HEARTBEAT_KEY = "heartbeat"  # the outbox's state key of heartbeats (never replaces a report)
HEARTBEAT_TIMER = "heartbeat"
DEFAULT_HEARTBEAT_S = 30.0
LOCKS_KEY = "locks"  # the outbox's state key of lock reports (the newest is enough)


# ---------------------------------------------------------------- persisted state


@dataclass(frozen=True)
class HistoryEntry:
    generation: int
    ok: bool
    at: float


@dataclass(frozen=True)
class AgentState:
    """What survives a restart; written atomically by the store."""

    applied_generation: int = 0
    failed_generation: int = 0
    last_error: str | None = None
    boot_epoch: int = 0
    session: int = 0
    history: tuple[HistoryEntry, ...] = ()


# ---------------------------------------------------------------- events


@dataclass(frozen=True)
class Booted:
    now: float


@dataclass(frozen=True)
class Connecting:
    """About to open a connection: the driver needs the Will for this session."""

    now: float


@dataclass(frozen=True)
class Connected:
    now: float
    session_present: bool
    # What the device is and has left, collected by the driver; sent in the birth.
    inventory: Inventory | None = None
    # The serial (hex) of the certificate this connection presented, under mutual TLS.
    cert_serial: str | None = None


@dataclass(frozen=True)
class Subscribed:
    """The broker answered the post-connect SUBSCRIBE; ``granted``: every filter."""

    now: float
    granted: bool = True


@dataclass(frozen=True)
class Disconnected:
    now: float


@dataclass(frozen=True)
class MessageIn:
    """A message on one of the topics :class:`Subscribe` asked for."""

    topic: str
    payload: bytes
    now: float


@dataclass(frozen=True)
class DesiredPayload:
    payload: bytes
    now: float


@dataclass(frozen=True)
class StepDone:
    """The driver executed ``step`` (the very object the core handed out).

    ``detail``: what a finished ``RollBack`` adds to the report's error (the
    failed workloads' last log lines)."""

    step: Step
    now: float
    detail: str = ""


@dataclass(frozen=True)
class StepFailed:
    step: Step
    error: str
    now: float


@dataclass(frozen=True)
class TimerFired:
    """A timer asked for with :class:`SetTimer` is due."""

    name: str
    now: float


@dataclass(frozen=True)
class WorkloadExited:
    """A supervised workload's process ended; ``restarting``: the supervisor starts it again.

    ``exit_code``: negative for the signal that ended it; None when it cannot
    be known (a process adopted after an agent restart). Not restarting with
    code 0 is ``stopped`` (it finished), otherwise ``failed``."""

    name: str
    exit_code: int | None
    restarting: bool
    now: float


@dataclass(frozen=True)
class HealthPassed:
    name: str
    now: float


@dataclass(frozen=True)
class HealthFailed:
    name: str
    reason: str
    now: float


@dataclass(frozen=True)
class PublishFailed:
    """The connection did not take ``publish``; what the outbox keeps goes there."""

    publish: Publish
    now: float


@dataclass(frozen=True)
class Stopping:
    """Orderly shutdown: say offline ourselves, since a clean DISCONNECT sends no Will."""

    now: float


# ---------------------------------------------------------------- locks and jobs: events
# (issue 13, items 4 and 8; edge_agent/supervisor/locks.py, edge_agent/jobs.py)


@dataclass(frozen=True)
class LocksChanged:
    """Who holds which update lock changed (the driver's lock watcher): reported."""

    locks: tuple[LockStatus, ...]
    now: float


@dataclass(frozen=True)
class JobUpdate:
    """A one-shot job started, made progress or finished: reported as an event."""

    status: JobStatus
    now: float


# ---------------------------------------------------------------- (end of locks and jobs)


Event = (
    Booted
    | Connecting
    | Connected
    | Subscribed
    | Disconnected
    | MessageIn
    | DesiredPayload
    | StepDone
    | StepFailed
    | TimerFired
    | WorkloadExited
    | HealthPassed
    | HealthFailed
    | PublishFailed
    | Stopping
    | LocksChanged
    | JobUpdate
)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class PersistState:
    state: AgentState


@dataclass(frozen=True)
class SaveOutbox:
    """Keep the outbox as it is now (on disk on a device)."""

    snapshot: OutboxSnapshot


@dataclass(frozen=True)
class SetWill:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Publish:
    """Publish at QoS ``qos``; ``lane`` (None: not worth keeping) says how the outbox
    keeps it if the connection does not take it."""

    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1
    lane: Lane | None = None
    key: str = ""


@dataclass(frozen=True)
class Subscribe:
    """One SUBSCRIBE for all ``topics`` at QoS 1; answer with :class:`Subscribed`."""

    topics: tuple[str, ...]


@dataclass(frozen=True)
class TransferLink:
    """Bundle frames can flow (``up``) or cannot (a transfer sends nothing, times out nothing)."""

    up: bool


@dataclass(frozen=True)
class DeliverFrame:
    """A ``bundle_data`` frame for the bundle transfer."""

    payload: bytes


@dataclass(frozen=True)
class DeliverCertAnswer:
    """A ``cert`` message for the certificate renewal."""

    payload: bytes


@dataclass(frozen=True)
class CancelFetch:
    """Stop fetching for ``generation`` (superseded); partial files stay for a later resume."""

    generation: int


@dataclass(frozen=True)
class SetTimer:
    """Feed ``TimerFired(name)`` at ``at`` (the clock ``now`` comes from); replaces one so named."""

    name: str
    at: float


@dataclass(frozen=True)
class CancelTimer:
    name: str


@dataclass(frozen=True)
class Rejected:
    """A message from the wire that broke the contract: the driver counts and logs it."""

    reason: str
    detail: str


@dataclass(frozen=True)
class Ignored:
    """A valid message that changes nothing (duplicate, stale, superseded)."""

    generation: int
    why: str


# ---------------------------------------------------------------- locks and jobs: actions


@dataclass(frozen=True)
class OverrideLocks:
    """Honour this lock override from a verified desired document on (until its
    ``until``); the driver hands it to its lock gate."""

    override: LockOverride


@dataclass(frozen=True)
class RunJobs:
    """The one-shot jobs of a verified desired document; the job runner starts those it
    never saw (``edge_agent.jobs.to_start``)."""

    generation: int
    jobs: JobsInDocument


# ---------------------------------------------------------------- (end of locks and jobs)


Action = (
    PersistState
    | SaveOutbox
    | SetWill
    | Publish
    | Subscribe
    | TransferLink
    | DeliverFrame
    | DeliverCertAnswer
    | CancelFetch
    | SetTimer
    | CancelTimer
    | Rejected
    | Ignored
    | OverrideLocks
    | RunJobs
    | Step
)


# ---------------------------------------------------------------- the core

_RUNNING: frozenset[WorkloadState] = frozenset({"starting", "healthy", "unhealthy"})


def exit_text(code: int | None) -> str:
    """Pure: an exit code as reports say it (negative: the signal that ended it)."""
    if code is None:
        return "an unknown code"
    return f"signal {-code}" if code < 0 else f"code {code}"


def health_timer(generation: int) -> str:
    """Pure: the name of the timer that ends a generation's wait for health."""
    return f"health:{generation}"


@dataclass
class AgentCore:
    """Reconciler for one device: call :meth:`handle` per event, run the actions in order."""

    device_id: str
    state: AgentState
    agent_version: str = "0"
    # The fleet's root: desired documents must be signed by its hub role. None: unverified.
    trusted_root: TrustedRoot | None = None
    # Allowance for this device's clock running ahead when checking the root's expiry.
    clock_skew_s: int = 300
    # Whether the runtime starts workloads and checks their health (the runtime issue).
    supervises: bool = False
    health_timeout_s: float = 60.0
    # A state report this often while connected (seconds; None: no heartbeat).
    heartbeat_s: float | None = DEFAULT_HEARTBEAT_S
    # The channels subscribed after every connect (``cert`` where the device renews).
    channels: tuple[Channel, ...] = (Channel.DESIRED, Channel.BUNDLE_DATA)
    outbox: Outbox = field(default_factory=lambda: Outbox(OutboxLimits()))
    _seq: int = 0
    _online: bool = False
    _ready: bool = False
    _rollout: Rollout | None = None
    _step: Step | None = None
    _candidate: Desired | None = None
    _staged: int = 0  # the newest HELD generation staged (memory only)
    _workloads: dict[str, WorkloadStatus] = field(default_factory=dict)
    # The applied generation's workloads (supervising runtimes): the driver seeds them at
    # start from the applied configuration; a rollout starts only what differs.
    applied_specs: tuple[WorkloadSpec, ...] = ()

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)
        self._desired_topic = self._topic(Channel.DESIRED)
        self._frames_topic = self._topic(Channel.BUNDLE_DATA)
        self._cert_topic = self._topic(Channel.CERT)

    def seed_workloads(self, specs: tuple[WorkloadSpec, ...]) -> None:
        """At start: the applied generation's workloads, which the runtime starts or adopts."""
        self.applied_specs = specs
        self._workloads = {s.name: WorkloadStatus(name=s.name, state="starting") for s in specs}

    @property
    def desired_topic(self) -> str:
        return self._desired_topic

    @property
    def applying(self) -> int | None:
        """The generation past its fetch and not finished, if any."""
        if self._rollout is None or isinstance(self._step, FetchBundles):
            return None
        return self._rollout.generation

    @property
    def fetching(self) -> int | None:
        return self._step.generation if isinstance(self._step, FetchBundles) else None

    @property
    def waiting(self) -> int | None:
        return self._candidate.generation if self._candidate else None

    @property
    def staged(self) -> int | None:
        """The HELD generation staged and not outdated by anything applied or failed."""
        newest = max(self.state.applied_generation, self.state.failed_generation)
        return self._staged if self._staged > newest else None

    @property
    def step(self) -> Step | None:
        """The step handed to the driver and not answered yet."""
        return self._step

    @property
    def workloads(self) -> dict[str, WorkloadStatus]:
        """The applied generation's workloads as the device last saw them (a copy)."""
        return dict(self._workloads)

    def handle(self, event: Event) -> list[Action]:
        """Pure with respect to the outside world: updates this object and returns actions."""
        match event:
            case Booted(now=now):
                return self._booted(now)
            case Connecting(now=now):
                self._online = self._ready = False
                return self._connecting(now)
            case Connected(now=now, inventory=inventory, cert_serial=cert_serial):
                self._online, self._ready = True, False
                beat = (
                    [SetTimer(HEARTBEAT_TIMER, now + self.heartbeat_s)] if self.heartbeat_s else []
                )
                return [
                    *self._flush(),
                    self._status(True, now),
                    self._birth(now, inventory, cert_serial),
                    *beat,
                    Subscribe(tuple(self._topic(c) for c in self.channels)),
                ]
            case Subscribed(granted=granted, now=now):
                if not granted or not self._online:
                    return []
                self._ready = True
                return [TransferLink(True), *self._advance(now)]
            case Disconnected():
                self._online = self._ready = False
                return [TransferLink(False)]
            case MessageIn(topic=name, payload=payload, now=now):
                return self._message(name, payload, now)
            case DesiredPayload(payload=payload, now=now):
                return self._desired(payload, now)
            case StepDone(step=step, now=now, detail=detail):
                if detail and isinstance(step, RollBack) and self._rollout is not None:
                    failure = f"{self._rollout.failure}\n{detail}"
                    self._rollout = structs.replace(self._rollout, failure=failure)
                return self._step_done(step, None, now)
            case StepFailed(step=step, error=error, now=now):
                return self._step_done(step, error, now)
            case TimerFired(name=name, now=now):
                return self._timer(name, now)
            case WorkloadExited() | HealthPassed() | HealthFailed():
                return self._workload_event(event)
            case PublishFailed(publish=publish):
                return self._keep(publish)
            case Stopping(now=now):
                self._online = self._ready = False
                return [self._status(False, now)]
            case LocksChanged() | JobUpdate():
                return self._locks_and_jobs(event)
        raise TypeError(f"unknown event {event!r}")

    # -- lifecycle

    def _booted(self, now: float) -> list[Action]:
        # An epoch from the clock keeps epochs growing even if the state file was lost.
        epoch = max(self.state.boot_epoch + 1, int(now))
        self.state = replace(self.state, boot_epoch=epoch)
        self._seq = 0
        return [PersistState(self.state)]

    def _connecting(self, now: float) -> list[Action]:
        self.state = replace(self.state, session=self.state.session + 1)
        will = encode(
            Status(device_id=self.device_id, online=False, session=self.state.session, ts=now)
        )
        return [PersistState(self.state), SetWill(self._topic(Channel.STATUS), will)]

    def _message(self, name: str, payload: bytes, now: float) -> list[Action]:
        if name == self._desired_topic:
            return self._desired(payload, now)
        if name == self._frames_topic:
            return [DeliverFrame(payload)]
        if name == self._cert_topic:
            return [DeliverCertAnswer(payload)]
        return []

    # -- the outbox

    def _flush(self) -> list[Action]:
        """Everything kept while offline, oldest first (before the birth that outdates it)."""
        if not len(self.outbox):
            return []
        sent: list[Action] = [
            Publish(e.topic, e.payload, e.retain, lane=e.lane, key=e.key)
            for e in self.outbox.drain()
        ]
        return [*sent, SaveOutbox(self.outbox.snapshot())]

    def _emit(self, publish: Publish) -> list[Action]:
        return [publish] if self._online else self._keep(publish)

    def _keep(self, publish: Publish) -> list[Action]:
        if publish.lane is None:
            return []
        self.outbox.put(
            publish.lane, publish.key, publish.topic, publish.payload, retain=publish.retain
        )
        return [SaveOutbox(self.outbox.snapshot())]

    # -- desired state

    def _desired(self, payload: bytes, now: float) -> list[Action]:
        if not payload:
            return [Ignored(0, "desired document cleared by the hub")]
        try:
            message = open_sealed(
                payload, self.trusted_root, now=now, clock_skew_s=self.clock_skew_s
            )
            desired = decode(message, Desired)
        except ProtocolError as exc:
            return [Rejected(exc.reason.value, exc.detail)]
        if desired.device_id != self.device_id:
            return [
                Rejected(
                    Reason.DEVICE_MISMATCH.value,
                    f"document for {desired.device_id!r} on {self.device_id!r}'s topic",
                )
            ]
        newest_known = max(
            self.state.applied_generation,
            self.state.failed_generation,
            self._rollout.generation if self._rollout else 0,
            self.waiting or 0,
            self._staged,
        )
        extras = self._document_extras(desired) if desired.generation >= newest_known else []
        if desired.generation <= newest_known:
            ignored: list[Action] = [
                *extras,
                Ignored(desired.generation, f"not newer than generation {newest_known}"),
            ]
            if desired.generation < max(
                self.state.applied_generation, self.state.failed_generation
            ):
                # Older than what we finished: the hub's count was reset (device registered
                # again, DB restored). Tell it where we are so it can re-issue past it.
                ignored += self._emit(self._state_report(now))
            return ignored
        superseded = self.waiting
        self._candidate = desired
        actions: list[Action] = list(extras)
        if superseded is not None:
            actions.append(Ignored(superseded, f"superseded by generation {desired.generation}"))
        return actions + self._advance(now)

    # -- plan and execute

    def _current(self) -> Current:
        running: frozenset[str] = frozenset()
        if self.supervises:  # only a supervising runtime has anything running to stop
            running = frozenset(n for n, w in self._workloads.items() if w.state in _RUNNING)
        return Current(
            self.state.applied_generation,
            supervises=self.supervises,
            running=running,
            health_timeout_s=self.health_timeout_s,
            applied=self.applied_specs,
        )

    def _advance(self, now: float) -> list[Action]:
        """Start the next step: of the rollout in flight, or of a new one when ready."""
        actions: list[Action] = []
        if self._ready and self._candidate is not None and isinstance(self._step, FetchBundles):
            superseded = self._step.generation  # the candidate is newer by construction
            self._rollout = self._step = None
            actions += [
                CancelFetch(superseded),
                Ignored(superseded, f"fetch superseded by generation {self._candidate.generation}"),
            ]
        if self._step is not None:
            return actions
        if self._rollout is None:
            if not self._ready or self._candidate is None:
                return actions
            desired, self._candidate = self._candidate, None
            try:
                self._rollout = Rollout(desired, tuple(workload_specs(desired.config)))
            except WorkloadSpecError as exc:
                self._rollout = Rollout(desired).failed(None, str(exc))
        steps = plan(self._current(), self._rollout)
        if not steps:
            return actions  # waiting for the workloads' health
        step = steps[0]
        if isinstance(step, NoOp):
            return actions + self._finish(step, now)
        self._step = step
        if isinstance(step, WaitForHealth):
            actions.append(SetTimer(health_timer(step.generation), now + step.timeout_s))
        actions.append(step)
        return actions + self._progress(self._rollout, step, steps, now)

    def _progress(
        self, rollout: Rollout, step: Step, steps: list[Step], now: float
    ) -> list[Action]:
        """An ``applying`` report as a rollout's workloads move: downloading, installing,
        starting (the rest pending). Only the workloads this rollout starts are listed (an
        unchanged one keeps running and keeps its state); state lane, so while offline only
        the newest is kept, and the outcome's report replaces it."""
        if not isinstance(step, FetchBundles | Install | StartWorkload):
            return []
        coming = [s.name for s in steps if isinstance(s, StartWorkload)]
        if not coming:
            return []
        names = sorted(rollout.started - rollout.healthy) + coming
        states: list[WorkloadStatus] = []
        for name in names:
            state: WorkloadState
            if isinstance(step, FetchBundles):
                state = "downloading"
            elif isinstance(step, Install):
                state = "installing"
            elif name in rollout.started or name == step.name:
                state = "starting"
            else:
                state = "pending"
            states.append(WorkloadStatus(name=name, state=state))
        report = self._report(
            phase="applying", generation=rollout.generation, now=now, workloads=states
        )
        return self._emit(report)

    def _step_done(self, step: Step, error: str | None, now: float) -> list[Action]:
        if self._rollout is None or step != self._step:
            return [Ignored(step_generation(step), "step result for a step not in flight")]
        self._step = None
        if error is None:
            self._rollout = self._rollout.done(step)
        else:
            self._rollout = self._rollout.failed(step, error or f"{type(step).__name__} failed")
        return self._advance(now)

    def _timer(self, name: str, now: float) -> list[Action]:
        if name == HEARTBEAT_TIMER:
            return self._heartbeat(now)
        rollout = self._rollout
        if rollout is None or name != health_timer(rollout.generation) or rollout.failure:
            return [Ignored(0, f"timer {name!r} is not wanted any more")]
        waiting = [n for n in targets(self._current(), rollout) if n not in rollout.healthy]
        reason = f"workloads {', '.join(waiting)} not healthy within {self.health_timeout_s:g} s"
        self._rollout = rollout.failed(None, reason)
        return self._advance(now)

    def _workload_event(self, event: WorkloadExited | HealthPassed | HealthFailed) -> list[Action]:
        name, now = event.name, event.now
        rollout = self._rollout
        if rollout is not None and name in rollout.started and rollout.failure is None:
            match event:
                case HealthPassed():
                    self._rollout = structs.replace(rollout, healthy=rollout.healthy | {name})
                    done = set(targets(self._current(), rollout)) <= self._rollout.healthy
                    cancel: list[Action] = [CancelTimer(health_timer(rollout.generation))]
                    return (cancel if done else []) + self._advance(now)
                case HealthFailed(reason=reason):
                    self._rollout = rollout.failed(None, f"workload {name}: {reason}")
                case WorkloadExited(exit_code=code):
                    why = f"workload {name} exited with {exit_text(code)}"
                    self._rollout = rollout.failed(None, why)
            return [CancelTimer(health_timer(rollout.generation)), *self._advance(now)]
        known = self._workloads.get(name)
        if known is None:
            return [Ignored(0, f"event for workload {name!r}, which this device does not run")]
        match event:
            case HealthPassed():
                changed = structs.replace(known, state="healthy")
            case HealthFailed():
                changed = structs.replace(known, state="unhealthy")
            case WorkloadExited(exit_code=code, restarting=restarting):
                changed = structs.replace(
                    known,
                    state="starting" if restarting else "stopped" if code == 0 else "failed",
                    restarts=known.restarts + (1 if restarting else 0),
                    last_exit_code=code,
                    last_exit_at=now,
                )
        if changed == known:
            return []
        self._workloads[name] = changed
        return self._emit(self._workload_report(changed, now))

    def _heartbeat(self, now: float) -> list[Action]:
        """A state report of where the device is, then the next timer (only while
        connected: the next CONNACK arms it again)."""
        if not self._online or not self.heartbeat_s:
            return []
        rollout = self._rollout
        phase: Phase
        if rollout is not None:
            phase, generation = "applying", rollout.generation
        else:
            phase, generation = self._state_phase()
        workloads = [self._workloads[n] for n in sorted(self._workloads)] or None
        report = self._report(
            phase=phase, generation=generation, now=now, workloads=workloads, key=HEARTBEAT_KEY
        )
        return [*self._emit(report), SetTimer(HEARTBEAT_TIMER, now + self.heartbeat_s)]

    def _staged_done(self, noop: NoOp, rollout: Rollout, now: float) -> list[Action]:
        """A HELD document is in place: report it ``staged``; nothing applied changes."""
        self._staged = max(self._staged, rollout.generation)
        report = self._report(phase="staged", generation=rollout.generation, now=now)
        return [noop, *self._emit(report), *self._advance(now)]

    def _finish(self, noop: NoOp, now: float) -> list[Action]:
        rollout = self._rollout
        assert rollout is not None
        self._rollout = None
        if rollout.staged:
            return self._staged_done(noop, rollout, now)
        generation, ok = rollout.generation, rollout.committed
        entry = HistoryEntry(generation, ok, now)
        history = (*self.state.history, entry)[-HISTORY_LIMIT:]
        statuses = self._outcome_statuses(rollout)
        if ok:
            self.state = replace(
                self.state, applied_generation=generation, last_error=None, history=history
            )
            phase: Phase = "applied"
        else:
            self.state = replace(
                self.state,
                failed_generation=generation,
                last_error=(rollout.failure or "apply failed")[:2048],
                history=history,
            )
            phase = (
                "rolled_back" if rollout.rolled_back and not rollout.rollback_failed else "failed"
            )
        actions: list[Action] = [noop]
        if self.supervises and rollout.names:
            actions.append(CancelTimer(health_timer(generation)))
        report = self._report(phase=phase, generation=generation, now=now, workloads=statuses)
        return [*actions, PersistState(self.state), *self._emit(report), *self._advance(now)]

    def _outcome_statuses(self, rollout: Rollout) -> list[WorkloadStatus] | None:
        """The workloads a finished rollout reports; updates the applied generation's table."""
        if rollout.committed:
            before = self._workloads
            healthy: WorkloadState = "healthy"
            started = set(targets(self._current(), rollout))
            self._workloads = {
                n: WorkloadStatus(name=n, state=healthy)
                if n in started or n not in before
                else before[n]
                for n in rollout.names
            }
            if self.supervises:
                self.applied_specs = rollout.specs
            removed = [
                WorkloadStatus(name=n, state="removed") for n in before if n not in self._workloads
            ]
            statuses = [*self._workloads.values(), *removed]
        else:
            state: WorkloadState = "rolled_back" if rollout.rolled_back else "failed"
            statuses = [WorkloadStatus(name=n, state=state) for n in rollout.names]
        return statuses or None

    # -- locks and jobs (issue 13, items 4 and 8)

    def _document_extras(self, desired: Desired) -> list[Action]:
        """What a verified document, not older than any known, says beside the apply:
        its lock override and its one-shot jobs, if it has them. Offered again
        when the same generation comes again (a restart), so nothing is lost."""
        actions: list[Action] = []
        try:
            override = parse_override(desired.config)
        except LockOverrideError as exc:
            actions.append(Ignored(desired.generation, f"lock override refused: {exc}"))
        else:
            if override is not None:  # it lasts until its `until`; one in the past ends it
                actions.append(OverrideLocks(override))
        jobs = job_specs(desired.config)
        if jobs.specs or jobs.invalid:
            actions.append(RunJobs(desired.generation, jobs))
        actions += [Ignored(desired.generation, why) for why in jobs.ignored]
        return actions

    def _locks_and_jobs(self, event: LocksChanged | JobUpdate) -> list[Action]:
        """A lock report (state: only the newest matters) or a job report (an event)."""
        phase, generation = self._state_phase()
        locks = list(event.locks) if isinstance(event, LocksChanged) else None
        jobs = [event.status] if isinstance(event, JobUpdate) else None
        report = Reported(
            device_id=self.device_id,
            boot_epoch=self.state.boot_epoch,
            seq=self._next_seq(),
            phase=phase,
            generation=generation,
            applied_generation=self.state.applied_generation,
            failed_generation=self.state.failed_generation,
            error=self.state.last_error if phase == "failed" else None,
            locks=locks,
            jobs=jobs,
            ts=event.now,
        )
        lane, key = (Lane.STATE, LOCKS_KEY) if locks is not None else (Lane.EVENT, REPORT_KEY)
        topic_name = self._topic(Channel.REPORTED)
        return self._emit(Publish(topic_name, encode(report), lane=lane, key=key))

    # -- messages

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _topic(self, channel: Channel) -> str:
        return topic(self.device_id, channel)

    def _status(self, online: bool, now: float) -> Publish:
        payload = encode(
            Status(device_id=self.device_id, online=online, session=self.state.session, ts=now)
        )
        return Publish(self._topic(Channel.STATUS), payload, retain=True)

    def _birth(self, now: float, inventory: Inventory | None, cert_serial: str | None) -> Publish:
        birth = Birth(
            device_id=self.device_id,
            session=self.state.session,
            boot_epoch=self.state.boot_epoch,
            seq=self._next_seq(),
            applied_generation=self.state.applied_generation,
            failed_generation=self.state.failed_generation,
            agent_version=self.agent_version,
            inventory=inventory,
            cert_serial=cert_serial,
            events_dropped=self.outbox.dropped,
            heartbeat_s=self.heartbeat_s or None,
            ts=now,
        )
        return Publish(self._topic(Channel.BIRTH), encode(birth))

    def _state_phase(self) -> tuple[Phase, int]:
        staged = self.staged
        if staged is not None:
            return "staged", staged
        failed = self.state.failed_generation > self.state.applied_generation
        generation = max(self.state.applied_generation, self.state.failed_generation)
        return ("failed" if failed else "applied"), generation

    def _state_report(self, now: float) -> Publish:
        phase, generation = self._state_phase()
        return self._report(phase=phase, generation=generation, now=now)

    def _workload_report(self, status: WorkloadStatus, now: float) -> Publish:
        """An event: one workload's state changed (each occurrence kept, in order)."""
        phase, generation = self._state_phase()
        return self._report(
            phase=phase, generation=generation, now=now, workloads=[status], lane=Lane.EVENT
        )

    def _report(
        self,
        *,
        phase: Phase,
        generation: int,
        now: float,
        workloads: list[WorkloadStatus] | None = None,
        lane: Lane = Lane.STATE,
        key: str = REPORT_KEY,
    ) -> Publish:
        report = Reported(
            device_id=self.device_id,
            boot_epoch=self.state.boot_epoch,
            seq=self._next_seq(),
            phase=phase,
            generation=generation,
            applied_generation=self.state.applied_generation,
            failed_generation=self.state.failed_generation,
            error=self.state.last_error if phase in ("failed", "rolled_back") else None,
            workloads=workloads,
            ts=now,
        )
        return Publish(self._topic(Channel.REPORTED), encode(report), lane=lane, key=key)
