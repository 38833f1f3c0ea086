"""The agent's reconcile core: events in, actions out, no I/O (ARCHITECTURE invariant 8).

Rules:
- A desired document is applied only if its generation is newer than every
  generation applied, failed, in flight or already waiting (invariant 4).
- Documents that arrive before the post-connect subscription is acknowledged
  are coalesced: only the newest is applied (invariant 2). This is what turns a
  backlog of queued deliveries into one apply after an offline period.
- A generation is recorded as applied only after the applier said it succeeded;
  the state is persisted (``PersistState``) before it is reported.
- A document *older* than the newest finished generation is answered with a
  report of the current state, so a hub whose count was reset can catch up.
- Every birth and report carries ``(boot_epoch, seq)``; ``boot_epoch`` grows on
  every start and ``seq`` within a boot, so the hub can drop stale reports.
- The session number grows before every connect; the Last Will set for that
  connect and the birth sent after it carry the same number.
- A desired document whose config references bundles
  (``config["workloads"][i]["bundle"]``, :func:`protocols.bundle_references`)
  is preceded by a fetch step: :class:`Fetch` first, and :class:`Apply` only
  after :class:`FetchDone` said every referenced bundle is present and
  verified. A fetch that fails records the generation as failed, exactly like
  a failed apply. A newer document supersedes a fetch in progress
  (:class:`CancelFetch`, then its own step); it never interrupts an apply,
  it waits for it.
- A desired payload is opened first (:func:`protocols.signed.open_sealed`):
  with a trusted root only a document signed by a threshold of the root's
  ``hub`` keys is read at all (invariant 9); without one (``--insecure-unsigned``)
  it is taken unverified. Then its device id must be ours.
- Time is an input (``now`` on every event); nothing here reads a clock.

The same core runs in the paho driver on devices and in the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from protocols import (
    Birth,
    Channel,
    Desired,
    Inventory,
    ProtocolError,
    Reason,
    Reported,
    Status,
    bundle_references,
    decode,
    encode,
    topic,
    validate_device_id,
)
from protocols.signed import open_sealed

if TYPE_CHECKING:
    from firmware_bundles.trust import TrustedRoot

HISTORY_LIMIT = 32


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
    """The broker acknowledged the desired-topic subscription made after connect."""

    now: float


@dataclass(frozen=True)
class Disconnected:
    now: float


@dataclass(frozen=True)
class DesiredPayload:
    payload: bytes
    now: float


@dataclass(frozen=True)
class ApplyDone:
    generation: int
    ok: bool
    error: str | None
    now: float


@dataclass(frozen=True)
class FetchDone:
    """Every bundle of ``generation`` is present and verified (``ok``), or why not."""

    generation: int
    ok: bool
    error: str | None
    now: float


@dataclass(frozen=True)
class Stopping:
    """Orderly shutdown: say offline ourselves, since a clean DISCONNECT sends no Will."""

    now: float


Event = (
    Booted
    | Connecting
    | Connected
    | Subscribed
    | Disconnected
    | DesiredPayload
    | ApplyDone
    | FetchDone
    | Stopping
)


# ---------------------------------------------------------------- actions


@dataclass(frozen=True)
class PersistState:
    state: AgentState


@dataclass(frozen=True)
class SetWill:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 1


@dataclass(frozen=True)
class Apply:
    desired: Desired


@dataclass(frozen=True)
class Fetch:
    """Make every bundle in ``bundles`` (file SHA-256s) present and verified, then say FetchDone."""

    generation: int
    bundles: tuple[str, ...]


@dataclass(frozen=True)
class CancelFetch:
    """Stop fetching for ``generation`` (superseded); partial files stay for a later resume."""

    generation: int


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


Action = PersistState | SetWill | Publish | Apply | Fetch | CancelFetch | Rejected | Ignored


# ---------------------------------------------------------------- the core


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
    _seq: int = 0
    _ready: bool = False
    _applying: int | None = None
    _fetching: Desired | None = None
    _candidate: Desired | None = None

    def __post_init__(self) -> None:
        validate_device_id(self.device_id)

    @property
    def applying(self) -> int | None:
        return self._applying

    @property
    def fetching(self) -> int | None:
        return self._fetching.generation if self._fetching else None

    @property
    def waiting(self) -> int | None:
        return self._candidate.generation if self._candidate else None

    def handle(self, event: Event) -> list[Action]:
        """Pure with respect to the outside world: updates this object and returns actions."""
        match event:
            case Booted(now=now):
                return self._booted(now)
            case Connecting(now=now):
                return self._connecting(now)
            case Connected(now=now, inventory=inventory, cert_serial=cert_serial):
                self._ready = False
                return [self._status(True, now), self._birth(now, inventory, cert_serial)]
            case Subscribed():
                self._ready = True
                return self._maybe_start()
            case Disconnected():
                self._ready = False
                return []
            case DesiredPayload(payload=payload, now=now):
                return self._desired(payload, now)
            case ApplyDone():
                return self._apply_done(event)
            case FetchDone():
                return self._fetch_done(event)
            case Stopping(now=now):
                self._ready = False
                return [self._status(False, now)]
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
            self._applying or 0,
            self.fetching or 0,
            self.waiting or 0,
        )
        if desired.generation <= newest_known:
            ignored: list[Action] = [
                Ignored(desired.generation, f"not newer than generation {newest_known}")
            ]
            if desired.generation < max(
                self.state.applied_generation, self.state.failed_generation
            ):
                # Older than what we finished: the hub's count was reset (device registered
                # again, DB restored). Tell it where we are so it can re-issue past it.
                ignored.append(self._state_report(now))
            return ignored
        superseded = self.waiting
        self._candidate = desired
        actions: list[Action] = []
        if superseded is not None:
            actions.append(Ignored(superseded, f"superseded by generation {desired.generation}"))
        return actions + self._maybe_start()

    def _maybe_start(self) -> list[Action]:
        if not self._ready or self._applying is not None or self._candidate is None:
            return []
        actions: list[Action] = []
        desired, self._candidate = self._candidate, None
        if self._fetching is not None:  # the candidate is newer by construction
            superseded, self._fetching = self._fetching.generation, None
            actions += [
                CancelFetch(superseded),
                Ignored(superseded, f"fetch superseded by generation {desired.generation}"),
            ]
        bundles = bundle_references(desired.config)
        if bundles:
            self._fetching = desired
            actions.append(Fetch(desired.generation, tuple(sorted(bundles))))
        else:
            self._applying = desired.generation
            actions.append(Apply(desired))
        return actions

    def _fetch_done(self, done: FetchDone) -> list[Action]:
        if self._fetching is None or done.generation != self._fetching.generation:
            return [Ignored(done.generation, "fetch result for a generation not in flight")]
        desired, self._fetching = self._fetching, None
        if done.ok:
            self._applying = desired.generation
            return [Apply(desired)]
        return self._finished(done.generation, False, done.error or "fetch failed", done.now)

    def _apply_done(self, done: ApplyDone) -> list[Action]:
        if done.generation != self._applying:
            return [Ignored(done.generation, "apply result for a generation not in flight")]
        self._applying = None
        return self._finished(done.generation, done.ok, done.error, done.now)

    def _finished(self, generation: int, ok: bool, error: str | None, now: float) -> list[Action]:
        entry = HistoryEntry(generation, ok, now)
        history = (*self.state.history, entry)[-HISTORY_LIMIT:]
        if ok:
            self.state = replace(
                self.state, applied_generation=generation, last_error=None, history=history
            )
        else:
            self.state = replace(
                self.state,
                failed_generation=generation,
                last_error=(error or "apply failed")[:2048],
                history=history,
            )
        report = self._report(phase="applied" if ok else "failed", generation=generation, now=now)
        return [PersistState(self.state), report, *self._maybe_start()]

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
            ts=now,
        )
        return Publish(self._topic(Channel.BIRTH), encode(birth))

    def _state_report(self, now: float) -> Publish:
        failed = self.state.failed_generation > self.state.applied_generation
        return self._report(
            phase="failed" if failed else "applied",
            generation=max(self.state.applied_generation, self.state.failed_generation),
            now=now,
        )

    def _report(self, *, phase: str, generation: int, now: float) -> Publish:
        report = Reported(
            device_id=self.device_id,
            boot_epoch=self.state.boot_epoch,
            seq=self._next_seq(),
            phase=phase,  # type: ignore[arg-type]
            generation=generation,
            applied_generation=self.state.applied_generation,
            failed_generation=self.state.failed_generation,
            error=self.state.last_error if phase == "failed" else None,
            ts=now,
        )
        return Publish(self._topic(Channel.REPORTED), encode(report))
