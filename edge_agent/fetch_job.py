"""The fetch step's policy: a generation's bundles, one after the other (sans-I/O).

The core plans :class:`edge_agent.plan.FetchBundles`; a :class:`FetchJob`
decides how that job runs, and the device's fetch thread
(``edge_agent.fetch_thread``: a real cache on disk, MQTT or HTTP) and the
simulator's virtual devices (``simulator.transfer``: a disk in memory, the
device's own MQTT link) only carry out its actions. Each bundle's transfer is
:class:`edge_agent.bundle_transfer.BundleFetch` (windows, resume, the
verification order); the job wraps it.

Rules:
- Every reference must be a SHA-256 in hex, else the job fails before any
  request (:class:`FetchFailure`, whose text goes into the failed report).
- Bundles come in the order the core listed them; one already verified on the
  device is not fetched again (``held``).
- Once a bundle's manifest is verified (and only then is its payload asked
  for), the job asks for room (:class:`MakeRoom`): what neither this job nor
  the applied configuration references may be evicted (``keep``). No room
  fails the job and drops the partial download.
- A transfer that fails on bad bytes it *resumed* (a torn tail after a power
  cut) starts once more from zero (:class:`RestartFromZero`); any other
  failure drops the partial download (:class:`DiscardPartial`) and fails the
  job with ``bundle <sha>…: <ErrorType>: <why>``; a refusal by the source is
  labelled by its code (``SourceRefused:unknown_bundle``).
- Frames are admitted by :func:`admit_frame`: malformed ones rejected with
  their reason, frames of another bundle or past the queue bound dropped
  (the transfer asks again), the rest turned into transfer events.
- Pure: no I/O; time comes in on events.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from edge_agent.bundle_transfer import (
    BundleFetch,
    Expectations,
    Failed,
    FetchAction,
    HeadVerified,
    Received,
    Refused,
    SourceRefused,
)
from edge_agent.settings import FetchConfig
from firmware_bundles.errors import BundleError
from protocols import ChunkData, ProtocolError, decode_frame, is_sha256


class FetchFailure(Exception):
    """A generation's bundles cannot be made present; the message goes into the report."""

    def __init__(self, message: str, label: str | None = None) -> None:
        super().__init__(message)
        # A refused bundle's label (its error type, or the source's refusal code), for
        # counters; None for a job that failed otherwise (a bad reference, a timeout).
        self.label = label


# ---------------------------------------------------------------- frames


@dataclass(frozen=True)
class FrameDropped:
    """A frame not handed to the transfer: ``why`` is ``malformed``-like reasons when
    ``rejected`` (the frame broke the contract), else ``other_bundle`` / ``queue_full``."""

    why: str
    rejected: bool = False
    detail: str = ""
    data_bytes: int = 0  # the data a dropped data frame carried


def admit_frame(
    payload: bytes, *, current: str | None, queued: int, queue_max: int, now: float
) -> Received | Refused | FrameDropped:
    """Pure: a ``bundle_data`` payload as a transfer event, or why it is dropped."""
    try:
        frame = decode_frame(payload)
    except ProtocolError as exc:
        return FrameDropped(exc.reason.value, rejected=True, detail=exc.detail)
    size = len(frame.data) if isinstance(frame, ChunkData) else 0
    if current is None:
        return FrameDropped("not_fetching", data_bytes=size)
    if frame.bundle != current:
        return FrameDropped("other_bundle", data_bytes=size)
    if queued >= queue_max:
        return FrameDropped("queue_full", data_bytes=size)
    if isinstance(frame, ChunkData):
        return Received(frame.offset, frame.data, now)
    return Refused(frame.offset, frame.code, frame.detail, now)


# ---------------------------------------------------------------- job actions


@dataclass(frozen=True)
class MakeRoom:
    """Make ``need_bytes`` fit the storage budget, evicting nothing in ``keep``; answer with
    :meth:`FetchJob.no_room` if that cannot be done."""

    sha256: str
    need_bytes: int
    keep: frozenset[str]


@dataclass(frozen=True)
class DiscardPartial:
    """Drop what arrived of ``sha256``: nothing of a refused bundle stays."""

    sha256: str


@dataclass(frozen=True)
class RestartFromZero:
    """The bytes resumed from storage were bad: drop them and download ``sha256`` afresh."""

    sha256: str


@dataclass(frozen=True)
class JobFailed:
    failure: FetchFailure


JobAction = FetchAction | MakeRoom | DiscardPartial | RestartFromZero | JobFailed


def failure_of(sha256: str, error: BundleError | SourceRefused) -> FetchFailure:
    """Pure: the job failure a failed transfer means (text for the report, label for counts)."""
    label = type(error).__name__
    if isinstance(error, SourceRefused):
        label = f"SourceRefused:{error.code.label}"
    return FetchFailure(f"bundle {sha256[:16]}…: {type(error).__name__}: {error}", label)


# ---------------------------------------------------------------- the job


class FetchJob:
    """One FetchBundles step: which bundles to fetch, and what each transfer's outcome means.

    Use: :meth:`next_bundle` until it returns None (the job succeeded); for each
    bundle :meth:`begin` (optionally with a transfer kept from an earlier job:
    a resume), then :meth:`handle` every transfer event and carry out the
    actions in order. A :class:`JobFailed` action ends the job.
    """

    def __init__(
        self,
        generation: int,
        bundles: tuple[str, ...],
        *,
        applied: Iterable[str],
        expect: Expectations,
        config: FetchConfig,
    ) -> None:
        """Raises FetchFailure for a reference that is not a SHA-256."""
        for sha in bundles:
            if not is_sha256(sha):
                raise FetchFailure(f"bundle reference {sha[:80]!r} is not a SHA-256 in hex")
        self.generation = generation
        self.bundles = bundles
        self.keep = frozenset(bundles) | frozenset(applied)
        self.expect = expect
        self.config = config
        self.transfer: BundleFetch | None = None
        self.sha256: str | None = None
        self.already_held = 0
        self._position = 0
        self._restarted = False

    def next_bundle(self, held: Callable[[str], bool]) -> str | None:
        """The next bundle to download (``held``: verified on the device already), or None."""
        while self._position < len(self.bundles):
            sha = self.bundles[self._position]
            self._position += 1
            if held(sha):
                self.already_held += 1
                continue
            return sha
        return None

    def begin(self, sha256: str, transfer: BundleFetch | None = None) -> BundleFetch:
        """Start (``transfer`` None) or continue a bundle's transfer; returns it."""
        self.sha256 = sha256
        self._restarted = False
        self.transfer = transfer or BundleFetch(sha256, self.expect, self.config)
        return self.transfer

    def restart(self) -> BundleFetch:
        """After :class:`RestartFromZero`: a fresh transfer of the same bundle."""
        assert self.sha256 is not None
        self.transfer = BundleFetch(self.sha256, self.expect, self.config)
        self._restarted = True
        return self.transfer

    def handle(self, actions: list[FetchAction]) -> list[JobAction]:
        """The transfer's actions with the job's policy applied (room, failures)."""
        transfer, sha = self.transfer, self.sha256
        assert transfer is not None and sha is not None
        out: list[JobAction] = []
        for action in actions:
            match action:
                case HeadVerified(total_bytes=total):
                    out += [action, MakeRoom(sha, max(0, total - transfer.received), self.keep)]
                case Failed(error=error):
                    resumed = transfer.resumed_bytes > 0 and not self._restarted
                    if resumed and isinstance(error, BundleError):
                        out.append(RestartFromZero(sha))
                    else:
                        out += [DiscardPartial(sha), JobFailed(failure_of(sha, error))]
                    return out
                case _:
                    out.append(action)
        return out

    def no_room(self, detail: str, label: str) -> list[JobAction]:
        """:class:`MakeRoom` could not be done: the partial goes, the job fails."""
        assert self.sha256 is not None
        sha = self.sha256
        failure = FetchFailure(f"bundle {sha[:16]}…: {detail}", label)
        return [DiscardPartial(sha), JobFailed(failure)]

    def refused_after_done(self, error: BundleError) -> list[JobAction]:
        """The complete file failed a check after :class:`Done` (the device's re-read)."""
        assert self.sha256 is not None
        return [DiscardPartial(self.sha256), JobFailed(failure_of(self.sha256, error))]
