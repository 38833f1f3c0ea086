"""Pure rules for messages from devices (sans-I/O): topic + payload in, decisions out.

Nothing here touches MQTT, the database or the clock: callers pass ``now`` and the
device's current tracking fields, and get back the new fields plus what to do.

Rules (the contract; architecture rules 3 and 5):

- **Birth.** ``birth.session < tracking.session``: stale birth, ignored entirely.
  Otherwise ``session``, ``online=True``, ``last_seen``, ``agent_version`` and
  ``inventory`` (when the birth has one) are
  taken from it. If ``(boot_epoch, seq)`` is newer than the newest report, it also
  counts as a report: ``reported_generation = applied_generation``,
  ``failed_generation``, phase ``failed`` if ``failed_generation > applied_generation``
  else ``applied``. Regardless of ordering, when ``desired_generation > 0`` and
  ``desired_generation > birth.applied_generation`` the desired document is
  republished (the broker may have lost the retained copy).
- **Rekey.** A birth or report whose applied or failed generation is past the
  hub's desired generation means the hub's count was reset (device deleted and
  registered again, DB restored). The hub's desired config is re-issued under a
  generation past the device's, because the device ignores anything not newer.
- **Status** (retained; the Last Will is a Status with ``online=False``).
  ``status.session < tracking.session``: stale (a Will from an older session arriving
  after the next birth must not mark the device offline). Otherwise ``session``,
  ``online`` and ``last_seen`` are taken from it.
- ``online_changed_at`` is ``now`` whenever a birth or status flips ``online``, and
  kept otherwise: placement failover counts only continuous absence, so a device
  that flaps never looks long gone.
- **Reported.** ``(boot_epoch, seq) <= (last_report_epoch, last_report_seq)``: stale,
  dropped. Otherwise the report fields, the ordering key and ``last_seen`` are taken;
  ``locks`` when the report lists them (an empty list: none held), and each job in
  ``jobs`` replaces that job id's last state (the newest 100 ids kept).
  A report marks the device online (a device the liveness controller marked
  offline while its messages were late is back with its next one); it cannot
  be from an older connection than the Will that marked it offline, since the
  broker publishes a Will after everything the connection sent.
- **Staged.** A report with phase ``staged`` raises ``staged_generation`` to its
  generation (never lowers it).
- **Heartbeat interval.** A birth stores its ``heartbeat_s`` (None: the device does
  not say; the liveness controller then uses the hub's default).
- **Soak evidence** (for the applied generation; what a rollout's soak reads). A
  birth or report whose ``applied_generation`` differs from the one known resets it
  first (``healthy_since`` None, ``healthy_reports`` 0, ``unhealthy_at`` None). Then
  a report (not ``applying``: that one lists a rollout's progress) in which a
  workload that was ``healthy`` is now ``unhealthy``, ``failed`` or ``starting``, or
  whose ``restarts`` grew, resets ``healthy_reports`` and ``healthy_since`` and sets
  ``unhealthy_at`` to ``now``; otherwise a report with
  phase ``applied`` after which every workload the hub knows of is ``healthy`` (or it
  knows none) counts: ``healthy_reports`` + 1, ``healthy_since`` set if None.
- Duplicates and out-of-order deliveries therefore change nothing.
- **Decommissioned** device: every message is refused (``decommissioned``).
- **Revoked certificate**: a birth naming a certificate of the device that was
  revoked (``cert_serial``) comes from a session that began before a revocation
  (queued, or from a connection the broker has not closed yet): refused.
- **Awaiting birth** (a decommissioned id enrolled again): nothing counts until a
  birth names one of the device's current certificates; until then status and
  reports, which may be the old unit's, are dropped (``awaiting_birth``).
- A message must arrive on the channel of its kind, name the device of its topic,
  and decode under :mod:`protocols`; otherwise it is rejected with a reason.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec

from protocols import (
    Birth,
    Channel,
    JobStatus,
    ProtocolError,
    Reported,
    Status,
    WorkloadStatus,
    decode,
    parse_topic,
)

DeviceMessage = Birth | Status | Reported

_DECODERS: dict[Channel, Callable[[bytes], DeviceMessage]] = {
    Channel.BIRTH: lambda payload: decode(payload, Birth),
    Channel.STATUS: lambda payload: decode(payload, Status),
    Channel.REPORTED: lambda payload: decode(payload, Reported),
}


class Stale(enum.StrEnum):
    """Why a well-formed message changed nothing; stable strings used as stats keys."""

    BIRTH = "stale_birth"
    STATUS = "stale_status"
    REPORT = "stale_report"
    AWAITING_BIRTH = "awaiting_birth"


class Reject(enum.StrEnum):
    """Hub-side rejection reasons (the codec's own reasons come from ``protocols.Reason``)."""

    DEVICE_MISMATCH = "device_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    UNEXPECTED_CHANNEL = "unexpected_channel"
    DECOMMISSIONED = "decommissioned"
    REVOKED_CERTIFICATE = "revoked_certificate"


class CertFact(enum.StrEnum):
    """What the hub's records say of the certificate a birth names (``cert_serial``)."""

    NONE = "none"  # the birth names none (plain broker, or an agent that does not say)
    CURRENT = "current"  # one of this device's certificates, not revoked
    REVOKED = "revoked"  # one of this device's certificates, revoked
    UNKNOWN = "unknown"  # not on the hub's record for this device


class Rejected(Exception):
    """A message the hub refuses; ``reason`` is a stable stats key."""

    def __init__(self, reason: str, detail: str, *, device_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device_id = device_id


@dataclass(frozen=True)
class Tracking:
    """The per-device fields the rules read and write (a projection of the DB row)."""

    desired_generation: int = 0  # read only: the rules never change desired state
    session: int = -1
    online: bool = False
    last_seen: datetime | None = None
    online_changed_at: datetime | None = None  # when ``online`` last flipped
    agent_version: str | None = None
    reported_generation: int = 0
    failed_generation: int = 0
    report_phase: str | None = None
    report_error: str | None = None
    report_generation: int = 0
    last_report_epoch: int = -1
    last_report_seq: int = -1
    inventory: dict[str, Any] | None = None  # the newest birth's, as plain JSON
    decommissioned_at: datetime | None = None  # read only
    awaiting_birth: bool = False
    # Per-workload states as last reported, merged by name (protocols.WorkloadStatus as
    # JSON; see merge_workloads).
    workloads: list[dict[str, Any]] | None = None
    # What the device's outbox dropped so far (its newest birth says).
    events_dropped: int = 0
    # Update locks held, as the newest report that listed them said (LockStatus as JSON).
    locks: list[dict[str, Any]] | None = None
    # The last state of each one-shot job (JobStatus as JSON), newest MAX_JOBS_KEPT.
    jobs: list[dict[str, Any]] | None = None
    # The heartbeat interval the newest birth announced (seconds; None: not said).
    heartbeat_s: float | None = None
    # Soak evidence for the applied generation (see the module rules).
    healthy_since: datetime | None = None
    healthy_reports: int = 0
    unhealthy_at: datetime | None = None
    # The newest HELD generation the device reported staged.
    staged_generation: int = 0


@dataclass(frozen=True)
class Decision:
    """What one message does: the new tracking fields, and whether to republish desired."""

    tracking: Tracking
    republish: bool = False
    stale: Stale | None = None
    reject: Reject | None = None  # refused: nothing changes, counted as a rejection
    # The device reports a generation past the hub's desired one: the hub's count was
    # reset (device deleted and registered again, DB restored from a backup). The
    # store re-issues the hub's desired config under a generation past the device's.
    rekey: bool = False


def _device_is_ahead(old: Tracking, new: Tracking) -> bool:
    return old.desired_generation > 0 and (
        max(new.reported_generation, new.failed_generation) > old.desired_generation
    )


def classify(topic_name: str, payload: bytes) -> DeviceMessage:
    """Pure: decode a message from a device and check it against its topic.

    Raises Rejected with reason ``bad_topic``/``bad_device_id`` (topic),
    ``oversized``/``malformed``/``unsupported_version``/``invalid_fields``/``wrong_kind``
    (payload), ``unexpected_channel`` (e.g. a device publishing on ``desired``) or
    ``device_mismatch`` (body names another device than the topic).
    """
    try:
        device_id, channel = parse_topic(topic_name)
    except ProtocolError as exc:
        raise Rejected(exc.reason.value, exc.detail) from None
    decoder = _DECODERS.get(channel)
    if decoder is None:
        raise Rejected(
            Reject.UNEXPECTED_CHANNEL,
            f"devices do not publish on the {channel.value!r} channel",
            device_id=device_id,
        )
    try:
        message = decoder(payload)
    except ProtocolError as exc:
        raise Rejected(exc.reason.value, exc.detail, device_id=device_id) from None
    if message.device_id != device_id:
        raise Rejected(
            Reject.DEVICE_MISMATCH,
            f"body names device {message.device_id!r} on the topic of {device_id!r}",
            device_id=device_id,
        )
    return message


def on_birth(t: Tracking, birth: Birth, *, now: datetime) -> Decision:
    """Pure: apply a birth (see the module rules)."""
    if birth.session < t.session:
        return Decision(t, stale=Stale.BIRTH)
    new = dataclasses.replace(
        t,
        session=birth.session,
        online=True,
        online_changed_at=t.online_changed_at if t.online else now,
        last_seen=now,
        agent_version=birth.agent_version,
        # A birth without inventory (an older or minimal agent) keeps the last one known.
        inventory=msgspec.structs.asdict(birth.inventory) if birth.inventory else t.inventory,
        events_dropped=birth.events_dropped,
        heartbeat_s=birth.heartbeat_s,
    )
    if (birth.boot_epoch, birth.seq) > (t.last_report_epoch, t.last_report_seq):
        failed = birth.failed_generation > birth.applied_generation
        generation = birth.failed_generation if failed else birth.applied_generation
        # A birth carries no error text: keep the one we have if it is about the same failure.
        keep_error = failed and t.report_phase == "failed" and t.report_generation == generation
        new = dataclasses.replace(
            new,
            reported_generation=birth.applied_generation,
            failed_generation=birth.failed_generation,
            report_phase="failed" if failed else "applied",
            report_generation=generation,
            report_error=t.report_error if keep_error else None,
            last_report_epoch=birth.boot_epoch,
            last_report_seq=birth.seq,
        )
        if birth.applied_generation != t.reported_generation:
            new = _reset_evidence(new)
    rekey = _device_is_ahead(t, new)
    republish = t.desired_generation > 0 and t.desired_generation > birth.applied_generation
    return Decision(new, republish=republish or rekey, rekey=rekey)


def on_status(t: Tracking, status: Status, *, now: datetime) -> Decision:
    """Pure: apply a status or Last Will (see the module rules)."""
    if status.session < t.session:
        return Decision(t, stale=Stale.STATUS)
    changed_at = t.online_changed_at if status.online == t.online else now
    return Decision(
        dataclasses.replace(
            t,
            session=status.session,
            online=status.online,
            online_changed_at=changed_at,
            last_seen=now,
        )
    )


def on_reported(t: Tracking, report: Reported, *, now: datetime) -> Decision:
    """Pure: apply a report (see the module rules)."""
    if (report.boot_epoch, report.seq) <= (t.last_report_epoch, t.last_report_seq):
        return Decision(t, stale=Stale.REPORT)
    new = dataclasses.replace(
        t,
        online=True,
        online_changed_at=t.online_changed_at if t.online else now,
        reported_generation=report.applied_generation,
        failed_generation=report.failed_generation,
        report_phase=report.phase,
        report_generation=report.generation,
        report_error=report.error,
        last_report_epoch=report.boot_epoch,
        last_report_seq=report.seq,
        last_seen=now,
        workloads=merge_workloads(t.workloads, report.workloads),
    )
    if report.locks is not None:
        new = dataclasses.replace(new, locks=[msgspec.structs.asdict(x) for x in report.locks])
    if report.jobs:
        new = dataclasses.replace(new, jobs=merge_jobs(t.jobs, report.jobs))
    if report.phase == "staged" and report.generation > t.staged_generation:
        new = dataclasses.replace(new, staged_generation=report.generation)
    new = soak_evidence(t, new, report, now=now)
    rekey = _device_is_ahead(t, new)
    return Decision(new, republish=rekey, rekey=rekey)


_NOT_HEALTHY = frozenset({"unhealthy", "failed", "starting"})


def _reset_evidence(t: Tracking) -> Tracking:
    return dataclasses.replace(t, healthy_since=None, healthy_reports=0, unhealthy_at=None)


def turned_unhealthy(
    known: list[dict[str, Any]] | None, reported: Sequence[WorkloadStatus] | None
) -> bool:
    """Pure: whether a report says a workload that was ``healthy`` is no longer (it is
    ``unhealthy``, ``failed`` or ``starting`` again), or that one restarted (``restarts``
    grew): either ends a soak."""
    if not reported:
        return False
    before = {w["name"]: w for w in known or ()}
    for status in reported:
        previous = before.get(status.name)
        if previous is None:
            continue
        if status.state in _NOT_HEALTHY and previous.get("state") == "healthy":
            return True
        if status.restarts > previous.get("restarts", 0):
            return True
    return False


def soak_evidence(old: Tracking, new: Tracking, report: Reported, *, now: datetime) -> Tracking:
    """Pure: ``new`` (``old`` after ``report``'s other fields) with its soak evidence
    (see the module rules). ``new.workloads`` is the table after the report."""
    if report.applied_generation != old.reported_generation:
        new = _reset_evidence(new)
        known = None  # the workloads of another generation say nothing of this one
    else:
        known = old.workloads
    # An ``applying`` report lists a rollout's workloads on their way in (downloading,
    # starting): progress, not a health event.
    if report.phase != "applying" and turned_unhealthy(known, report.workloads):
        return dataclasses.replace(new, healthy_since=None, healthy_reports=0, unhealthy_at=now)
    if report.phase == "applied" and all(w["state"] == "healthy" for w in new.workloads or ()):
        return dataclasses.replace(
            new,
            healthy_reports=new.healthy_reports + 1,
            healthy_since=new.healthy_since or now,
        )
    return new


def merge_workloads(
    known: list[dict[str, Any]] | None, reported: Sequence[WorkloadStatus] | None
) -> list[dict[str, Any]] | None:
    """Pure: the device's workload table after a report, merged by name.

    A report lists the workloads whose state it tells: a rollout's outcome lists the
    generation's (and those it removed, as ``removed``), a supervisor event lists the one
    that changed. So each listed workload replaces its entry, the others stay as last
    known, and a ``removed`` one leaves the table. A report that lists none (nothing
    supervised, an older agent) keeps the table as it is.
    """
    if reported is None:
        return known
    by_name = {w["name"]: w for w in known or ()}
    for status in reported:
        if status.state == "removed":
            by_name.pop(status.name, None)
        else:
            by_name[status.name] = msgspec.structs.asdict(status)
    return [by_name[name] for name in sorted(by_name)]


MAX_JOBS_KEPT = 100
"""Job states kept per device (the newest updated); older ones are forgotten."""


def merge_jobs(
    known: list[dict[str, Any]] | None, updates: Sequence[JobStatus]
) -> list[dict[str, Any]]:
    """Pure: the last state per job id: each update replaces its id's entry and moves it
    last (the most recently updated last); at most :data:`MAX_JOBS_KEPT`."""
    by_id = {job["id"]: job for job in known or ()}
    for update in updates:
        by_id.pop(update.id, None)
        by_id[update.id] = msgspec.structs.asdict(update)
    return list(by_id.values())[-MAX_JOBS_KEPT:]


def decide(
    t: Tracking, message: DeviceMessage, *, now: datetime, cert: CertFact = CertFact.NONE
) -> Decision:
    """Pure: admit ``message`` (decommissioned, revoked, awaiting birth), then dispatch it
    to its rule. ``cert``: what the hub's records say of the certificate a birth names."""
    if t.decommissioned_at is not None:
        return Decision(t, reject=Reject.DECOMMISSIONED)
    if isinstance(message, Birth):
        if cert is CertFact.REVOKED:
            return Decision(t, reject=Reject.REVOKED_CERTIFICATE)
        if t.awaiting_birth and cert is not CertFact.CURRENT:
            return Decision(t, stale=Stale.AWAITING_BIRTH)
        decision = on_birth(t, message, now=now)
        if t.awaiting_birth and decision.stale is None:
            tracking = dataclasses.replace(decision.tracking, awaiting_birth=False)
            return dataclasses.replace(decision, tracking=tracking)
        return decision
    if t.awaiting_birth:
        return Decision(t, stale=Stale.AWAITING_BIRTH)
    if isinstance(message, Status):
        return on_status(t, message, now=now)
    return on_reported(t, message, now=now)
