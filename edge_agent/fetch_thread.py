"""The thread that runs the fetch step on a device: the job's I/O, over MQTT or HTTP.

The reconcile core plans :class:`edge_agent.plan.FetchBundles` (generation,
bundle SHA-256s); the driver hands it to :meth:`Fetcher.submit`; this thread
runs the sans-I/O :class:`edge_agent.fetch_job.FetchJob` (which bundles, what
each outcome means) and its per-bundle
:class:`edge_agent.bundle_transfer.BundleFetch` over a source (MQTT chunk
frames, or HTTP range requests when the agent has a hub URL), writes what it
accepts into the cache's temporary area, and reports back through ``on_done``
(the driver feeds ``StepDone`` or ``StepFailed``).

Rules (the I/O side; the policy is ``edge_agent.fetch_job``'s):
- Without a trusted root nothing is fetched: the generation fails with a
  reason that says how to provide one (``--root``).
- A download resumes from its partial file (``bundles/partial/<sha>.part``):
  the bytes on disk are re-hashed through the transfer before the first
  request, so only what is missing is asked for, after a disconnect or a
  restart alike.
- A complete file is fsynced, checked once more from disk with
  :func:`firmware_bundles.archive.verify` and only then renamed to its cache
  name.
- Cancellation (a newer generation) and shutdown stop a download between two
  events; its partial file stays for a later resume and no result is reported.
- Frames arrive on the network thread (:meth:`MqttSource.on_frame`) and wait in
  a bounded queue; a frame past the bound is dropped (the core asks again).
"""

from __future__ import annotations

import http.client
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edge_agent.bundle_transfer import (
    BundleFetch,
    Done,
    Dropped,
    Expectations,
    FetchEvent,
    HeadVerified,
    LinkDown,
    LinkUp,
    LocalBytes,
    Received,
    Refused,
    Request,
    Start,
    Tick,
    Write,
)
from edge_agent.bundles import BundleCache, CacheFull, SecurityVersions
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
from edge_agent.settings import BundleSettings, FetchConfig
from firmware_bundles import archive
from firmware_bundles.errors import BundleError
from firmware_bundles.trust import TrustedRoot
from plumbing.net import Backoff
from protocols import BundleRequest, Channel, ChunkErrorCode, encode, topic

log = logging.getLogger("driftless.agent.fetch")

RESUME_READ_BYTES = 1024 * 1024
IDLE_WAIT_S = 0.5


class SourceFailure(Exception):
    """The source answered in a way this agent cannot use (not a transient failure)."""


class _Cancelled(Exception):
    pass


class _RestartFromZero(Exception):
    pass


@dataclass
class FetchStats:
    """What the fetcher did since the agent started (logged per bundle)."""

    requests_sent: int = 0
    chunks_accepted: int = 0
    bytes_written: int = 0
    resumed_bytes: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    frames_rejected: Counter[str] = field(default_factory=Counter)
    bundles_fetched: int = 0


# ---------------------------------------------------------------- sources


class ChunkSource(Protocol):
    """Where requests go and answers come from; used by the fetch thread only (but inputs)."""

    def begin(self, sha256: str) -> None: ...
    def send(self, request: Request) -> None: ...
    def next_event(self, timeout_s: float) -> FetchEvent | None: ...
    def link_is_up(self) -> bool: ...


class MqttSource:
    """Requests on the device's ``bundle_req`` channel; frames from its ``bundle_data``."""

    def __init__(
        self,
        device_id: str,
        publish: Callable[[str, bytes], object],
        *,
        queue_max: int,
        stats: FetchStats,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.request_topic = topic(device_id, Channel.BUNDLE_REQ)
        self._publish = publish
        self._queue_max = queue_max
        self._stats = stats
        self._monotonic = monotonic
        self._events: queue.Queue[FetchEvent] = queue.Queue()
        self._frames = 0  # frames in the queue (bounded); link events are not
        self._lock = threading.Lock()
        self._current: str | None = None
        self._up = False

    # network thread

    def on_frame(self, payload: bytes) -> None:
        with self._lock:
            event = admit_frame(
                payload,
                current=self._current,
                queued=self._frames,
                queue_max=self._queue_max,
                now=self._monotonic(),
            )
            if not isinstance(event, FrameDropped):
                self._frames += 1
        if isinstance(event, FrameDropped):
            if event.rejected:
                self._stats.frames_rejected[event.why] += 1
                log.warning(
                    "bundle frame rejected",
                    extra={"device": self.device_id, "reason": event.why, "detail": event.detail},
                )
            else:
                self._stats.dropped[event.why] += 1
            return
        self._events.put(event)

    def link_up(self) -> None:
        self._up = True
        self._events.put(LinkUp(self._monotonic()))

    def link_down(self) -> None:
        self._up = False
        self._events.put(LinkDown())

    # fetch thread

    def begin(self, sha256: str) -> None:
        with self._lock:
            self._current = sha256
            while True:  # events of an earlier transfer mean nothing now
                try:
                    self._events.get_nowait()
                except queue.Empty:
                    break
            self._frames = 0

    def send(self, request: Request) -> None:
        assert self._current is not None
        body = BundleRequest(
            device_id=self.device_id,
            bundle=self._current,
            offset=request.offset,
            length=request.length,
        )
        self._publish(self.request_topic, encode(body))

    def next_event(self, timeout_s: float) -> FetchEvent | None:
        try:
            event = self._events.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return None
        if isinstance(event, Received | Refused):
            with self._lock:
                self._frames -= 1
        return event

    def link_is_up(self) -> bool:
        return self._up


class HttpSource:
    """Range requests against ``GET {hub}/api/v1/bundles/{sha256}/file``, one at a time.

    404 is ``unknown_bundle`` and 416 ``bad_range``; connection errors, timeouts,
    429 and 5xx are retried after a jittered backoff; a 200 (Range ignored) or any
    other status fails the transfer. A body is read to at most one byte more
    than asked for, so a server that sends more cannot make the agent hold it.
    """

    def __init__(
        self,
        hub_url: str,
        *,
        timeout_s: float,
        stop: threading.Event,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = hub_url.rstrip("/") + "/api/v1/bundles"
        self._timeout_s = timeout_s
        self._stop = stop
        self._monotonic = monotonic
        self._pending: deque[Request] = deque()
        self._url = ""
        self._retry_at = 0.0
        self._backoff = Backoff(min_s=0.5, max_s=30.0)

    def begin(self, sha256: str) -> None:
        self._url = f"{self.base_url}/{sha256}/file"
        self._pending.clear()
        self._backoff.reset()
        self._retry_at = 0.0

    def send(self, request: Request) -> None:
        if all(p.offset != request.offset for p in self._pending):
            self._pending.append(request)

    def link_is_up(self) -> bool:
        return True

    def next_event(self, timeout_s: float) -> FetchEvent | None:
        wait_s = max(0.0, self._retry_at - self._monotonic())
        if not self._pending or wait_s > 0:
            self._stop.wait(min(timeout_s, wait_s) if self._pending else timeout_s)
            return None
        request = self._pending[0]
        try:
            event = self._get(request)
        except (urllib.error.URLError, http.client.HTTPException, OSError, _Transient) as exc:
            delay = self._backoff.next_delay_s()
            self._retry_at = self._monotonic() + delay
            log.warning(
                "bundle range request failed; retrying",
                extra={"url": self._url, "error": str(exc), "retry_in_s": round(delay, 2)},
            )
            return None
        self._pending.popleft()
        self._backoff.reset()
        return event

    def _get(self, request: Request) -> FetchEvent:
        last = request.offset + request.length - 1
        http_request = urllib.request.Request(
            self._url,
            headers={"Range": f"bytes={request.offset}-{last}", "Accept-Encoding": "identity"},
        )
        try:
            with urllib.request.urlopen(http_request, timeout=self._timeout_s) as response:
                if response.status != 206:
                    raise SourceFailure(
                        f"{self._url} answered {response.status} to a range request "
                        "(expected 206 Partial Content)"
                    )
                content_range = response.headers.get("Content-Range", "")
                if not content_range.startswith(f"bytes {request.offset}-"):
                    raise SourceFailure(
                        f"{self._url} sent Content-Range {content_range!r} for bytes "
                        f"{request.offset}-{last}"
                    )
                data = response.read(request.length + 1)
        except urllib.error.HTTPError as exc:
            detail = f"HTTP {exc.code} from {self._url}"
            if exc.code == 404:
                return Refused(request.offset, ChunkErrorCode.UNKNOWN_BUNDLE, detail, self._now())
            if exc.code == 416:
                return Refused(request.offset, ChunkErrorCode.BAD_RANGE, detail, self._now())
            if exc.code == 429 or exc.code >= 500:
                raise _Transient(detail) from None
            raise SourceFailure(detail) from None
        return Received(request.offset, data, self._now())

    def _now(self) -> float:
        return self._monotonic()


class _Transient(Exception):
    pass


# ---------------------------------------------------------------- the fetcher


Job = tuple[int, tuple[str, ...]]


class Fetcher:
    """Runs fetch jobs one at a time in its own thread (:meth:`run`)."""

    def __init__(
        self,
        *,
        cache: BundleCache,
        security: SecurityVersions,
        settings: BundleSettings,
        trusted_root: TrustedRoot | None,
        agent_version: str,
        source: ChunkSource,
        on_done: Callable[[int, bool, str | None], None],
        applied_references: Callable[[], Iterable[str]],
        stats: FetchStats,
        stop_event: threading.Event,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.security = security
        self.settings = settings
        self.trusted_root = trusted_root
        self.agent_version = agent_version
        self.source = source
        self.stats = stats
        self._config: FetchConfig = settings.http if settings.hub_url else settings.mqtt
        self._on_done = on_done
        self._applied_references = applied_references
        self._clock = clock
        self._monotonic = monotonic
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self.stop_event = stop_event  # shared with the source, so a stop ends its waits too

    # -- from the driver (under its lock)

    def submit(self, generation: int, bundles: tuple[str, ...]) -> None:
        self._jobs.put((generation, bundles))

    def cancel(self, generation: int) -> None:
        with self._lock:
            self._cancelled.add(generation)

    def stop(self) -> None:
        self.stop_event.set()
        self._jobs.put(None)

    # -- the thread

    def run(self) -> None:
        while (job := self._jobs.get()) is not None:
            generation, bundles = job
            with self._lock:  # jobs come in generation order: older marks are spent
                self._cancelled = {g for g in self._cancelled if g >= generation}
            if self._is_cancelled(generation):
                continue
            ok, error = True, None
            try:
                self._run_job(generation, bundles)
            except _Cancelled:
                log.info("fetch cancelled", extra={"generation": generation})
                continue
            except FetchFailure as exc:
                ok, error = False, str(exc)
            except OSError as exc:  # the device's own storage (full disk, permissions)
                log.exception("fetch failed on local storage", extra={"generation": generation})
                ok, error = False, f"cannot store bundles: {exc.strerror or exc}"
            except Exception as exc:  # a bug here must not kill the agent
                log.exception("fetch crashed", extra={"generation": generation})
                ok, error = False, f"internal error while fetching bundles: {exc!r}"
            if self._is_cancelled(generation) or self.stop_event.is_set():
                continue
            log.info(
                "bundles ready" if ok else "fetch failed",
                extra={"generation": generation, "bundles": len(bundles), "error": error},
            )
            self._on_done(generation, ok, error)

    def _is_cancelled(self, generation: int) -> bool:
        with self._lock:
            return generation in self._cancelled

    def _check_running(self, generation: int) -> None:
        if self.stop_event.is_set() or self._is_cancelled(generation):
            raise _Cancelled

    def _run_job(self, generation: int, bundles: tuple[str, ...]) -> None:
        if self.trusted_root is None:
            raise FetchFailure(
                "no trusted root: this agent cannot verify bundles; start it with "
                "--root ROOT_JSON (the fleet's root.json)"
            )
        job = FetchJob(
            generation,
            bundles,
            applied=self._applied_references(),
            expect=self._expectations(),
            config=self._config,
        )
        while (sha := job.next_bundle(self.cache.has)) is not None:
            try:
                self._download(job, job.begin(sha))
            except _RestartFromZero:
                self.cache.discard_partial(sha)
                log.warning("resumed bytes were bad; downloading again", extra={"bundle": sha})
                self._download(job, job.restart(), resume=False)

    # -- one bundle

    def _expectations(self) -> Expectations:
        assert self.trusted_root is not None
        try:
            installed = self.security.load()
        except ValueError as exc:
            raise FetchFailure(str(exc)) from None
        return Expectations(
            trusted_root=self.trusted_root,
            now=self._clock(),
            clock_skew_s=self.settings.clock_skew_s,
            architecture=self.settings.architecture,
            agent_version=self.agent_version,
            installed_security_versions=installed,
            max_bundle_bytes=self.settings.max_bundle_bytes,
        )

    def _download(self, job: FetchJob, core: BundleFetch, *, resume: bool = True) -> None:
        self.cache.prepare()
        sha, generation = core.sha256, job.generation
        path = self.cache.partial_path(sha)
        started = self._monotonic()
        requests_before = self.stats.requests_sent
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            offset = 0
            while resume and not core.finished:
                data = os.pread(fd, RESUME_READ_BYTES, offset)
                if not data:
                    break
                offset += len(data)
                self._execute(job, job.handle(core.handle(LocalBytes(data))), fd, sha)
            if core.resumed_bytes:
                self.stats.resumed_bytes += core.resumed_bytes
                log.info(
                    "resuming bundle download",
                    extra={"bundle": sha, "bytes_on_disk": core.resumed_bytes},
                )
            if not core.finished:
                self.source.begin(sha)
                actions = core.handle(Start(self._monotonic(), self.source.link_is_up()))
                while True:
                    self._execute(job, job.handle(actions), fd, sha)
                    if core.finished:
                        break
                    self._check_running(generation)
                    deadline = core.next_deadline()
                    wait_s = IDLE_WAIT_S
                    if deadline is not None:
                        wait_s = min(wait_s, max(0.0, deadline - self._monotonic()))
                    try:
                        event = self.source.next_event(wait_s)
                    except SourceFailure as exc:
                        raise FetchFailure(f"bundle {sha[:16]}…: {exc}") from None
                    actions = core.handle(event or Tick(self._monotonic()))
        finally:
            os.close(fd)
        self._commit(job, sha, path)
        elapsed = self._monotonic() - started
        size = core.total_bytes or 0
        self.stats.bundles_fetched += 1
        log.info(
            "bundle fetched",
            extra={
                "bundle": sha,
                "bytes": size,
                "resumed_bytes": core.resumed_bytes,
                "requests": self.stats.requests_sent - requests_before,
                "elapsed_s": round(elapsed, 3),
                "mib_per_s": round((size - core.resumed_bytes) / 2**20 / max(elapsed, 1e-9), 1),
            },
        )

    def _execute(self, job: FetchJob, actions: list[JobAction], fd: int, sha: str) -> None:
        for action in actions:
            match action:
                case Request():
                    self.source.send(action)
                    self.stats.requests_sent += 1
                case Write(offset=offset, data=data):
                    view = memoryview(data)
                    while view:
                        written = os.pwrite(fd, view, offset)
                        view, offset = view[written:], offset + written
                    self.stats.chunks_accepted += 1
                    self.stats.bytes_written += len(data)
                case MakeRoom(need_bytes=need, keep=keep):
                    try:
                        self.cache.make_room(need, keep)
                    except CacheFull as exc:
                        self._execute(job, job.no_room(str(exc), type(exc).__name__), fd, sha)
                case HeadVerified(manifest=manifest, total_bytes=total):
                    log.info(
                        "bundle manifest verified",
                        extra={
                            "bundle": sha,
                            "bundle_name": manifest.name,
                            "version": manifest.version,
                            "bytes": total,
                        },
                    )
                case Dropped(why=why):
                    self.stats.dropped[why] += 1
                    log.debug("bundle chunk dropped", extra={"bundle": sha, "why": why})
                case Done():
                    os.fsync(fd)
                case RestartFromZero():
                    raise _RestartFromZero
                case DiscardPartial(sha256=partial):
                    self.cache.discard_partial(partial)
                case JobFailed(failure=failure):
                    raise failure

    def _commit(self, job: FetchJob, sha: str, path: Path) -> None:
        assert self.trusted_root is not None
        try:
            archive.verify(path, self.trusted_root, self._clock(), self.settings.clock_skew_s)
        except BundleError as exc:
            self._execute(job, job.refused_after_done(exc), -1, sha)
        self.cache.commit(sha)
