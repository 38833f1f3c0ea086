"""Bundle transfers of simulated devices: the real fetch cores over each device's MQTT link.

A simulated device told to ``FetchBundles`` runs the agent's own fetch job
(:class:`edge_agent.fetch_job.FetchJob`: which bundles, room, what each
failure means) and transfer (:class:`edge_agent.bundle_transfer.BundleFetch`)
unchanged, the way ``edge_agent.fetch_thread`` runs them on a device: the
same requests on its ``bundle_req`` channel, the same frames from
``bundle_data`` (admitted by :func:`edge_agent.fetch_job.admit_frame`), the
same link, timeout, refusal and verification rules. This module is the I/O
only; the disk is simulated. ``simulator.fleet`` imports this module only when the fleet has a
trusted root, so a fleet without bundles never loads the verification stack.

Rules:
- One job (a generation's bundles) at a time per device; its bundles one after
  the other, in the order the core listed them. A bundle already verified on
  the device's disk is not fetched again. The job's result goes back to the
  core (``FetchDone``) unless the job was cancelled.
- The disk (:class:`SimDisk`) holds no bytes. A *verified* bundle is its size,
  name and security version; a *partial* download is its ``BundleFetch`` core,
  which holds exactly what resuming needs: how many contiguous bytes arrived,
  the running hashes and the verified manifest. The bytes are hashed as they
  arrive and dropped, so a partial download costs a few hundred bytes of
  memory however large the bundle, and resuming (after a disconnect, or after
  a superseded job when the same bundle is wanted again) asks only for the
  bytes after those that arrived.
- The disk has a budget (``disk_max_bytes``), accounted as if every byte were
  stored: verified sizes plus the bytes partial downloads hold. When a
  manifest is verified, room is made as ``edge_agent.bundles.BundleCache``
  does: bundles that neither the job nor the applied desired state references
  are evicted, oldest first, else the job fails ("disk full").
- Link events travel through the same queue as frames, in arrival order, so
  the frames that arrived before a reconnect's SUBACK are handled before
  ``LinkUp`` and the core does not ask again for what is already here (as
  ``edge_agent.driver`` feeds its ``MqttSource``).
- Frames wait in a bounded queue (``frame_queue_max``); a frame past the bound,
  for another bundle, or with no job running is dropped and counted (the core
  asks again when it needs it), as on a device.
- Expiry is checked against the wall clock, timeouts against the monotonic
  clock; both are inputs.
- Every wait is bounded: a bundle's transfer gives up after ``max_transfer_s``
  or ``max_transfer_events`` events (the generation fails, the partial stays).
- Deliberate differences from a device: there is no file, so no final re-read
  with ``archive.verify`` (the streaming checks are the same checks) and no
  unpacking (the simulated applier stands for the install); security versions
  are raised when an apply succeeds; the disk is memory, so a worker that is
  killed and restarted forgets its devices' bundles and partial downloads
  (their agent state survives in the journal), and they download again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import plumbing
from edge_agent.bundle_transfer import (
    BundleFetch,
    Done,
    Dropped,
    Expectations,
    FetchEvent,
    LinkDown,
    LinkUp,
    Received,
    Refused,
    Request,
    Start,
    Tick,
    Write,
)
from edge_agent.fetch_job import (
    DiscardPartial,
    FetchFailure,
    FetchJob,
    FrameDropped,
    JobAction,
    JobFailed,
    MakeRoom,
    RestartFromZero,
    admit_frame,
)
from edge_agent.settings import FetchConfig, default_architecture
from firmware_bundles.limits import DEFAULT_LIMITS
from firmware_bundles.model import Manifest, RunSpec
from firmware_bundles.trust import TrustedRoot
from protocols import BundleRequest, Channel, encode, topic

if TYPE_CHECKING:
    from simulator.fleet import BundleCounters

__all__ = ["DeviceTransfers", "DiskFull", "SimDisk", "TransferSettings"]

log = logging.getLogger("driftless.sim.transfer")

Publish = Callable[[str, bytes], Awaitable[bool]]
"""Publish a request (QoS 1); True when the broker took it, False when the link was down."""
Finished = Callable[[int, bool, "str | None"], Awaitable[None]]
"""Feed ``FetchDone(generation, ok, error)`` to the device's core."""


class DiskFull(Exception):
    """The simulated disk cannot hold a bundle even after evicting what nothing references."""


@dataclass(frozen=True)
class TransferSettings:
    """What every device of a fleet shares for transfers; limits carry their unit."""

    trusted_root: TrustedRoot
    fetch: FetchConfig = field(default_factory=FetchConfig)
    disk_max_bytes: int = 256 * 1024 * 1024
    max_bundle_bytes: int = 1024 * 1024 * 1024
    frame_queue_max: int = 64
    clock_skew_s: int = DEFAULT_LIMITS.default_clock_skew_s
    architecture: str = field(default_factory=default_architecture)
    agent_version: str = plumbing.__version__
    """Compared with a manifest's ``min_agent_version``: the driftless version simulated."""
    max_transfer_s: float = 3600.0
    max_transfer_events: int = 10_000_000
    wall_clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        for name in ("disk_max_bytes", "max_bundle_bytes", "frame_queue_max", "max_transfer_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.frame_queue_max < 2 * self.fetch.window_chunks:
            raise ValueError("frame_queue_max must hold at least two windows of chunks")
        if self.max_transfer_events < 1:
            raise ValueError("max_transfer_events must be at least 1")


# ---------------------------------------------------------------- the simulated disk


@dataclass(frozen=True, slots=True)
class Verified:
    """A bundle that arrived whole and verified."""

    size: int
    name: str
    security_version: int
    at: float  # monotonic, for eviction order
    version: str = ""
    kind: str = "app"
    run: RunSpec | None = None  # how the simulated runtime "runs" it (``simulator.runtime``)


@dataclass(slots=True)
class Partial:
    """A download in progress or interrupted: its core is what the partial file would be."""

    core: BundleFetch
    at: float  # monotonic, when it began (for eviction order)
    started: bool = False  # Start was fed
    link_dropped: bool = False  # the link went down since the last LinkUp
    resumed: bool = False  # continued at least once with bytes already held


class SimDisk:
    """One device's bundle storage, accounted in bytes, holding none.

    Not thread-safe; used from the event loop only. Pure apart from this object.
    """

    __slots__ = ("max_bytes", "partials", "verified")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.verified: dict[str, Verified] = {}
        self.partials: dict[str, Partial] = {}

    def usage(self) -> int:
        """Bytes the disk would hold: verified files plus what partial downloads hold."""
        held = sum(v.size for v in self.verified.values())
        return held + sum(p.core.received for p in self.partials.values())

    def make_room(self, need_bytes: int, keep: Iterable[str]) -> list[str]:
        """Evict unreferenced bundles (oldest first) until ``need_bytes`` more fit.

        Returns the evicted SHA-256s; raises DiskFull when even that is not enough.
        """
        kept = set(keep)
        usage = self.usage()
        candidates = sorted(
            [(v.at, sha, v.size) for sha, v in self.verified.items()]
            + [(p.at, sha, p.core.received) for sha, p in self.partials.items()]
        )
        evicted: list[str] = []
        for _at, sha, size in candidates:
            if usage + need_bytes <= self.max_bytes:
                break
            if sha in kept:
                continue
            self.verified.pop(sha, None)
            self.partials.pop(sha, None)
            usage -= size
            evicted.append(sha)
        if usage + need_bytes > self.max_bytes:
            raise DiskFull(
                f"simulated disk of {self.max_bytes} bytes cannot hold {need_bytes} more bytes "
                f"({usage} bytes held by bundles current desired state references)"
            )
        return evicted

    def commit(self, sha: str, manifest: Manifest, size: int, at: float) -> None:
        """A partial download finished and verified: it becomes a verified bundle."""
        self.partials.pop(sha, None)
        self.verified[sha] = Verified(
            size,
            manifest.name,
            manifest.security_version,
            at,
            manifest.version,
            manifest.kind,
            manifest.run,
        )

    def discard(self, sha: str) -> None:
        """Forget a refused download: nothing of it stays."""
        self.partials.pop(sha, None)
        self.verified.pop(sha, None)


# ---------------------------------------------------------------- one device's transfers


class DeviceTransfers:
    """A device's fetch step: its disk, its link state, and at most one job at a time.

    The device calls :meth:`link_up`, :meth:`link_down` and :meth:`on_frame`
    from its connection, :meth:`start` and :meth:`cancel` for the core's
    ``Fetch`` and ``CancelFetch``, :meth:`applied` after a successful apply and
    :meth:`close` when it stops.
    """

    IDLE_WAIT_S = 30.0  # longest single wait for an event when no request can time out

    def __init__(
        self,
        device_id: str,
        settings: TransferSettings,
        *,
        counters: BundleCounters,
        changed: Callable[[], None],
        publish: Publish,
        finished: Finished,
        link_up: bool,
    ) -> None:
        self.device_id = device_id
        self.settings = settings
        self.disk = SimDisk(settings.disk_max_bytes)
        self.request_topic = topic(device_id, Channel.BUNDLE_REQ)
        self._counters = counters
        self._changed = changed
        self._publish = publish
        self._finished = finished
        self._link_up = link_up
        self._security: dict[str, int] = {}
        self._applied_refs: frozenset[str] = frozenset()
        self._job: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: str | None = None  # the bundle being fetched
        self._queue: asyncio.Queue[FetchEvent] | None = None
        self._frames = 0  # frames waiting in the queue (bounded); link events are not

    # -- from the device's connection

    def link_up(self) -> None:
        self._link_up = True
        if self._queue is not None:
            self._queue.put_nowait(LinkUp(self.settings.monotonic()))

    def link_down(self) -> None:
        self._link_up = False
        if self._queue is not None:
            self._queue.put_nowait(LinkDown())

    def on_frame(self, payload: bytes) -> None:
        """A ``bundle_data`` message: admit it and queue it for the transfer it answers."""
        c = self._counters
        event = admit_frame(
            payload,
            current=self._current if self._queue is not None else None,
            queued=self._frames,
            queue_max=self.settings.frame_queue_max,
            now=self.settings.monotonic(),
        )
        if isinstance(event, FrameDropped) and event.rejected:
            _bump(c.frames_rejected, event.why)
            log.warning(
                "bundle frame rejected",
                extra={"device": self.device_id, "reason": event.why, "detail": event.detail},
            )
            return
        c.frames += 1
        if isinstance(event, FrameDropped):
            c.frame_bytes += event.data_bytes
        elif isinstance(event, Received):
            c.frame_bytes += len(event.data)
        if isinstance(event, FrameDropped):
            _bump(c.dropped, event.why)
            return
        assert self._queue is not None
        self._frames += 1
        self._queue.put_nowait(event)

    # -- from the core

    def start(self, generation: int, bundles: tuple[str, ...]) -> None:
        """Run a job in its own task; its result is fed back through ``finished``."""
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the core never overlaps jobs; a stale one must not report
        self._job = generation
        self._counters.jobs += 1
        self._task = asyncio.create_task(
            self._run_job(generation, bundles), name=f"fetch:{self.device_id}:{generation}"
        )

    def cancel(self, generation: int) -> None:
        """Stop the job for ``generation`` (superseded); its partial download stays."""
        if self._job != generation or self._task is None or self._task.done():
            return
        self._task.cancel()
        self._counters.jobs_cancelled += 1
        self._changed()

    def applied(self, references: frozenset[str]) -> None:
        """An apply succeeded: raise security versions of its bundles, keep them on the disk."""
        self._applied_refs = references
        for sha in references:
            held = self.disk.verified.get(sha)
            if held is not None:
                known = self._security.get(held.name, 0)
                self._security[held.name] = max(known, held.security_version)

    async def close(self) -> None:
        """Cancel a job in progress (orderly stop); nothing is reported."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- the job

    async def _run_job(self, generation: int, bundles: tuple[str, ...]) -> None:
        c = self._counters
        ok, error, failure_label = True, None, None
        try:
            await self._fetch_all(generation, bundles)
        except FetchFailure as exc:
            ok, error, failure_label = False, str(exc), exc.label
        except Exception as exc:  # a bug here must not take the device down
            log.exception("fetch crashed", extra={"device": self.device_id})
            ok, error = False, f"internal error while fetching bundles: {exc!r}"
        if ok:
            c.jobs_ok += 1
        else:
            c.jobs_failed += 1
            if failure_label is not None:  # a refused bundle, by why
                _bump(c.errors, failure_label)
        self._changed()
        if self._task is asyncio.current_task():
            self._task = None  # the result may start the next job (a newer document waits)
        await self._finished(generation, ok, error)

    async def _fetch_all(self, generation: int, bundles: tuple[str, ...]) -> None:
        job = FetchJob(
            generation,
            bundles,
            applied=self._applied_refs,
            expect=self._expectations(),
            config=self.settings.fetch,
        )
        while (sha := job.next_bundle(self.disk.verified.__contains__)) is not None:
            await self._download(job, sha)
        self._counters.already_held += job.already_held

    def _expectations(self) -> Expectations:
        s = self.settings
        return Expectations(
            trusted_root=s.trusted_root,
            now=s.wall_clock(),
            clock_skew_s=s.clock_skew_s,
            architecture=s.architecture,
            agent_version=s.agent_version,
            installed_security_versions=dict(self._security),
            max_bundle_bytes=s.max_bundle_bytes,
        )

    async def _download(self, job: FetchJob, sha: str) -> None:
        s = self.settings
        queue: asyncio.Queue[FetchEvent] = asyncio.Queue()
        self._queue, self._current, self._frames = queue, sha, 0
        partial = self.disk.partials.get(sha)
        now = s.monotonic()
        core = job.begin(sha, partial.core if partial is not None else None)
        if partial is None:  # a partial download is its transfer core: kept for a resume
            partial = self.disk.partials[sha] = Partial(core, at=now)
        if not partial.started:
            partial.started = True
            actions = core.handle(Start(now, self._link_up))
        else:  # an interrupted job's partial download: continue where it ended
            actions = core.handle(LinkDown())
            partial.link_dropped = not self._link_up  # then the resume counts at LinkUp
            if self._link_up:
                self._note_resume(partial)
                actions += core.handle(LinkUp(now))
        try:
            await self._transfer(job, partial, queue, job.handle(actions), sha)
        finally:
            if self._queue is queue:  # a newer job may have its own queue already
                self._current, self._queue, self._frames = None, None, 0

    async def _transfer(
        self,
        job: FetchJob,
        partial: Partial,
        queue: asyncio.Queue[FetchEvent],
        actions: list[JobAction],
        sha: str,
    ) -> None:
        s = self.settings
        core = partial.core
        deadline = s.monotonic() + s.max_transfer_s
        for _ in range(s.max_transfer_events):
            await self._execute(job, actions, partial, sha)
            if core.finished:
                return
            event = await self._next_event(queue, core, deadline)
            if event is None:
                raise FetchFailure(
                    f"bundle {sha[:16]}…: not complete after {s.max_transfer_s:.0f} s "
                    f"({core.received} bytes so far; the next job resumes from there)"
                )
            if isinstance(event, LinkDown) and not partial.link_dropped:
                partial.link_dropped = True
                self._counters.link_drops += 1
            elif isinstance(event, LinkUp) and partial.link_dropped:
                partial.link_dropped = False
                self._note_resume(partial)
            actions = job.handle(core.handle(event))
        raise FetchFailure(f"bundle {sha[:16]}…: more than {s.max_transfer_events} events")

    def _note_resume(self, partial: Partial) -> None:
        held = partial.core.received
        if held:
            partial.resumed = True
            self._counters.resumes += 1
            self._counters.resumed_bytes += held
            self._changed()

    async def _next_event(
        self, queue: asyncio.Queue[FetchEvent], core: BundleFetch, deadline: float
    ) -> FetchEvent | None:
        """The next queued event, a Tick when a request times out, None past ``deadline``."""
        s = self.settings
        if queue.empty():
            now = s.monotonic()
            if now >= deadline:
                return None
            wait_s = min(self.IDLE_WAIT_S, deadline - now)
            due = core.next_deadline()
            if due is not None:
                wait_s = min(wait_s, max(0.0, due - now))
            try:
                async with asyncio.timeout(wait_s):
                    event = await queue.get()
            except TimeoutError:
                return Tick(s.monotonic())
        else:
            event = queue.get_nowait()
        if isinstance(event, Received | Refused):
            self._frames -= 1
        return event

    async def _execute(
        self, job: FetchJob, actions: list[JobAction], partial: Partial, sha: str
    ) -> None:
        c = self._counters
        for action in actions:
            match action:
                case Request(offset=offset, length=length):
                    body = BundleRequest(
                        device_id=self.device_id, bundle=sha, offset=offset, length=length
                    )
                    if await self._publish(self.request_topic, encode(body)):
                        c.requests += 1
                    else:  # the link is down: LinkUp sends every request in flight again
                        c.requests_unsent += 1
                case Write(data=data):
                    c.bytes_accepted += len(data)
                case MakeRoom(need_bytes=need, keep=keep):
                    try:
                        evicted = self.disk.make_room(need, keep)
                    except DiskFull as exc:
                        await self._execute(job, job.no_room(str(exc), "DiskFull"), partial, sha)
                    else:
                        c.evicted += len(evicted)
                case Dropped(length=length, why=why):
                    _bump(c.dropped, why)
                    if why == "duplicate":
                        c.duplicate_bytes += length
                case Done(manifest=manifest, total_bytes=total):
                    self.disk.commit(sha, manifest, total, self.settings.monotonic())
                    c.fetched += 1
                    if partial.resumed:
                        c.fetched_after_resume += 1
                    self._changed()
                case DiscardPartial(sha256=gone):
                    self.disk.discard(gone)
                case RestartFromZero():  # never: a kept core's bytes were checked on arrival
                    raise FetchFailure(f"bundle {sha[:16]}…: resumed bytes were bad")
                case JobFailed(failure=failure):
                    raise failure


def _bump(table: dict[str, int], key: str) -> None:
    table[key] = table.get(key, 0) + 1
