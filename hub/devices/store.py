"""Data-access layer: every read and write of the device table goes through here.

Rules:
- Functions take the session first and everything else by keyword; time (``now``)
  is a parameter.
- They raise the domain errors of :mod:`hub.devices.errors`, never HTTP errors.
- Each write function is one transaction and commits it. A change of desired state
  bumps ``desired_generation`` by exactly 1 in the same transaction as the config
  (architecture rule 1); write transactions take the write lock up front
  (:func:`hub.db.begin_write`, plus ``FOR UPDATE`` where the database has it), so
  concurrent changes never hand out the same generation twice.
- The per-message rules live in :mod:`hub.devices.rules` (pure); :func:`apply_messages`
  only loads rows, runs the rules and writes the result back.
- A decommissioned device keeps its row (visible, refused) until it is purged: it
  gets no desired document, no fleet-wide change and no place in the fleet's
  counts, and its certificates are revoked in the same transaction that marks it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import (
    ColumnElement,
    Connection,
    RowMapping,
    Table,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    update,
)
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

import protocols
from hub.bundles.models import Bundle
from hub.db import begin_write
from hub.deployments.layers import layers_for
from hub.deployments.merge import Layer, compose
from hub.deployments.models import DeviceEvent
from hub.devices.errors import (
    ConfigTooLarge,
    CutOffPending,
    DeviceActive,
    DeviceDecommissioned,
    DeviceExists,
    DeviceNotFound,
    UnknownBundles,
)
from hub.devices.models import Device, DeviceDeletion, DeviceState
from hub.devices.rules import CertFact, DeviceMessage, Reject, Tracking, decide
from hub.enrollment.models import DeviceCertificate
from hub.jobs.entries import job_entries, with_jobs
from hub.rollouts import gate

_TRACKING_FIELDS = tuple(f.name for f in dataclasses.fields(Tracking))
_READ_ONLY = frozenset({"desired_generation", "decommissioned_at"})  # the rules never write them
_WRITTEN = tuple(name for name in _TRACKING_FIELDS if name not in _READ_ONLY)
_DEVICES: Table = Device.__table__  # type: ignore[attr-defined]
_TRACKING_COLUMNS = tuple(_DEVICES.c[name] for name in _TRACKING_FIELDS)
# executemany statements; bind names must differ from column names in SET clauses
_UPDATE_REKEY = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("b_id"))
    .values(
        desired_generation=bindparam("b_generation"), desired_updated_at=bindparam("b_updated_at")
    )
)
_json = msgspec.json.Encoder()
_EVENTS: Table = DeviceEvent.__table__  # type: ignore[attr-defined]


# -- devices -----------------------------------------------------------------------------


def register_device(
    session: Session, *, device_id: str, labels: Mapping[str, str], now: datetime
) -> Device:
    """Insert a new device; raises DeviceExists (DeviceDecommissioned for a
    decommissioned id: enroll it again, or purge it first)."""
    begin_write(session)
    existing = session.get(Device, device_id)
    if existing is not None:
        session.rollback()
        if existing.decommissioned_at is not None:
            raise DeviceDecommissioned(
                device_id, "enroll it again, or purge it (DELETE ?purge=true) to reuse the id"
            )
        raise DeviceExists(device_id)
    row = Device(id=device_id, labels=dict(labels), created_at=now)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise DeviceExists(device_id) from None
    return row


def register_devices(
    session: Session, *, devices: Sequence[tuple[str, Mapping[str, str]]], now: datetime
) -> tuple[list[str], list[str]]:
    """Insert the devices that do not exist yet, in one transaction; idempotent.

    Returns ``(created, existing)`` ids; existing devices keep their labels.
    """
    begin_write(session)
    ids = [device_id for device_id, _ in devices]
    existing = set(session.exec(select(Device.id).where(col(Device.id).in_(ids))).all())
    created: list[str] = []
    for device_id, labels in devices:
        if device_id in existing or device_id in created:
            continue
        session.add(Device(id=device_id, labels=dict(labels), created_at=now))
        created.append(device_id)
    session.commit()
    return created, sorted(existing)


def get_device(session: Session, *, device_id: str) -> Device:
    """Raises DeviceNotFound."""
    row = session.get(Device, device_id)
    if row is None:
        raise DeviceNotFound(device_id)
    return row


def _label_filter(labels: Mapping[str, str] | None) -> list[ColumnElement[bool]]:
    labels_column = col(Device.labels)
    return [labels_column[key].as_string() == value for key, value in (labels or {}).items()]


def _active() -> ColumnElement[bool]:
    return col(Device.decommissioned_at).is_(None)


def _device_filter(
    labels: Mapping[str, str] | None, state: DeviceState | None
) -> list[ColumnElement[bool]]:
    where = _label_filter(labels)
    if state == "active":
        where.append(_active())
    elif state == "decommissioned":
        where.append(col(Device.decommissioned_at).is_not(None))
    return where


def list_devices(
    session: Session,
    *,
    limit: int,
    offset: int,
    labels: Mapping[str, str] | None = None,
    state: DeviceState | None = None,
) -> tuple[list[Device], int]:
    """One page of devices ordered by id, and the total matching ``labels`` (all given
    pairs) and ``state`` (None: every state)."""
    where = _device_filter(labels, state)
    total = session.exec(select(func.count()).select_from(Device).where(*where)).one()
    rows = session.exec(
        select(Device).where(*where).order_by(col(Device.id)).limit(limit).offset(offset)
    ).all()
    return list(rows), int(total)


def device_page(
    session: Session,
    *,
    limit: int,
    offset: int,
    labels: Mapping[str, str] | None = None,
    state: DeviceState | None = None,
    matches: Callable[[Mapping[str, str]], bool] | None = None,
) -> tuple[list[RowMapping], int]:
    """:func:`list_devices` as plain rows (SQL Core): the API's hot read path.

    Loading ORM objects cost more than the query (identity map, instrumentation);
    the API builds its answer from these mappings directly (``hub.devices.views``).
    """
    where = _device_filter(labels, state)
    if matches is not None:
        # A label selector (hub.deployments.selectors) is matched here, not in SQL: read
        # ids and labels, then the page's rows.
        candidates = session.connection().execute(
            sa_select(_DEVICES.c.id, _DEVICES.c.labels).where(*where).order_by(_DEVICES.c.id)
        )
        ids = [device_id for device_id, found in candidates if matches(found or {})]
        page_ids = ids[offset : offset + limit]
        rows = (
            session.connection()
            .execute(sa_select(_DEVICES).where(_DEVICES.c.id.in_(page_ids)).order_by(_DEVICES.c.id))
            .mappings()
            .all()
        )
        return list(rows), len(ids)
    total = session.exec(select(func.count()).select_from(Device).where(*where)).one()
    rows = (
        session.connection()
        .execute(
            sa_select(_DEVICES).where(*where).order_by(_DEVICES.c.id).limit(limit).offset(offset)
        )
        .mappings()
        .all()
    )
    return list(rows), int(total)


def device_row(session: Session, *, device_id: str) -> RowMapping:
    """One device as a plain row; raises DeviceNotFound."""
    row = (
        session.connection()
        .execute(sa_select(_DEVICES).where(_DEVICES.c.id == device_id))
        .mappings()
        .first()
    )
    if row is None:
        raise DeviceNotFound(device_id)
    return row


@dataclass(frozen=True)
class Decommissioned:
    """What :func:`decommission_device` did."""

    revoked_serials: list[int]
    already: bool  # it was decommissioned before (its cut-off is asked for again)


def decommission_device(session: Session, *, device_id: str, now: datetime) -> Decommissioned:
    """Decommission in one transaction: revoke every certificate, clear the desired
    document (a new generation, so the link clears the broker's retained copy) and
    queue the broker cut-off (``cut_off_at`` None). Idempotent: decommissioning again
    revokes what was issued since and asks the broker to cut it off again.

    Raises DeviceNotFound.
    """
    begin_write(session)
    row = session.exec(select(Device).where(Device.id == device_id).with_for_update()).first()
    if row is None:
        raise DeviceNotFound(device_id)
    already = row.decommissioned_at is not None
    certificates = session.exec(
        select(DeviceCertificate).where(
            DeviceCertificate.device_id == device_id, col(DeviceCertificate.revoked_at).is_(None)
        )
    ).all()
    for certificate in certificates:
        certificate.revoked_at = now
        session.add(certificate)
    if not already:
        row.decommissioned_at = now
        # Nothing runs on it any more; the placement controller moves its instances away.
        row.manual_config, row.assignments, row.contributions = {}, [], {}
        _bump(row, {}, now, _next_desired_seq(session))
    row.cut_off_at = None
    row.awaiting_birth = False
    session.add(row)
    session.commit()
    return Decommissioned([int(c.serial, 16) for c in certificates], already)


def purge_device(session: Session, *, device_id: str, now: datetime, require_cut_off: bool) -> None:
    """Forget a decommissioned device: delete the row and record that in the change feed.

    Raises DeviceNotFound; DeviceActive (decommission it first); CutOffPending while
    ``require_cut_off`` and the broker has not confirmed the cut-off (forgetting the
    row would forget that the broker still owes it).
    """
    begin_write(session)
    row = session.get(Device, device_id)
    if row is None:
        raise DeviceNotFound(device_id)
    if row.decommissioned_at is None:
        session.rollback()
        raise DeviceActive(device_id)
    if require_cut_off and row.cut_off_at is None:
        session.rollback()
        raise CutOffPending(device_id)
    seq = _next_desired_seq(session)  # before the row goes: it may hold the newest value
    session.delete(row)
    session.add(DeviceDeletion(seq=seq, device_id=device_id, deleted_at=now))
    session.commit()


def reactivate_for_enrollment(
    session: Session, row: Device, *, now: datetime, require_cut_off: bool
) -> None:
    """A decommissioned id enrolled again (inside the caller's write transaction).

    Everything learnt from the old unit is forgotten (sessions, reports, inventory),
    and nothing counts until the replacement's birth names one of its current
    certificates (``awaiting_birth``). Raises CutOffPending while ``require_cut_off``
    and the broker has not confirmed the old unit's connections closed: until then
    the old session could get the id's topics back.
    """
    if require_cut_off and row.cut_off_at is None:
        raise CutOffPending(row.id)
    fresh = Tracking()
    for name in _WRITTEN:
        setattr(row, name, getattr(fresh, name))
    row.decommissioned_at = None
    row.cut_off_at = None
    row.awaiting_birth = True
    row.desired_seq = _next_desired_seq(session)
    row.desired_updated_at = row.desired_updated_at or now
    session.add(row)


def pending_cut_offs(session: Session, *, limit: int) -> list[str]:
    """Decommissioned devices whose live connections the broker has not confirmed closed."""
    return list(
        session.exec(
            select(Device.id)
            .where(col(Device.decommissioned_at).is_not(None), col(Device.cut_off_at).is_(None))
            .order_by(col(Device.id))
            .limit(limit)
        )
    )


def confirm_cut_offs(session: Session, *, device_ids: Sequence[str], now: datetime) -> list[str]:
    """Record the broker's confirmation: the devices are offline for good. Returns the
    ids that were still waiting for it (a confirmation for a device enrolled again
    since, or already confirmed, changes nothing)."""
    begin_write(session)
    rows = session.exec(
        select(Device)
        .where(
            col(Device.id).in_(list(device_ids)),
            col(Device.decommissioned_at).is_not(None),
            col(Device.cut_off_at).is_(None),
        )
        .with_for_update()
    ).all()
    for row in rows:
        row.cut_off_at = now
        row.online = False
        session.add(row)
    session.commit()
    return [row.id for row in rows]


# -- desired state -----------------------------------------------------------------------


def config_size_bytes(config: Mapping[str, Any]) -> int:
    """Pure: the size of ``config`` encoded as on the wire."""
    return len(_json.encode(config))


def _check_config(config: Mapping[str, Any], max_config_bytes: int) -> dict[str, Any]:
    size = config_size_bytes(config)
    if size > max_config_bytes:
        raise ConfigTooLarge(size, max_config_bytes)
    return dict(config)


def _feed_now(session: Session) -> int:
    devices = session.exec(select(func.max(Device.desired_seq))).one()
    deletions = session.exec(select(func.max(DeviceDeletion.seq))).one()
    return max(int(devices or 0), int(deletions or 0))


def _next_desired_seq(session: Session) -> int:
    """The next value of the change feed; call inside the write transaction."""
    return _feed_now(session) + 1


next_desired_seq = _next_desired_seq
"""For other writers of desired state (:mod:`hub.deployments.reconcile`)."""


def check_bundles(session: Session, config: Mapping[str, Any]) -> None:
    """Raise UnknownBundles (rolling back) unless every bundle ``config`` references is
    stored; inside a write transaction."""
    _check_bundles(session, config)


def desired_changes_since(
    session: Session, *, seq: int, limit: int
) -> tuple[list[tuple[str, int | None]], int]:
    """``(device id, generation)`` changed after ``seq`` (oldest first), and the new mark.

    A deleted device comes as ``(device id, None)``.
    """
    changed = session.exec(
        select(Device.id, Device.desired_generation, Device.desired_seq)
        .where(col(Device.desired_seq) > seq)
        .order_by(col(Device.desired_seq))
        .limit(limit)
    ).all()
    deleted = session.exec(
        select(DeviceDeletion.device_id, DeviceDeletion.seq)
        .where(col(DeviceDeletion.seq) > seq)
        .order_by(col(DeviceDeletion.seq))
        .limit(limit)
    ).all()
    rows: list[tuple[int, str, int | None]] = [(r[2], r[0], r[1]) for r in changed]
    rows += [(r[1], r[0], None) for r in deleted]
    rows = sorted(rows)[:limit]
    mark = max((row[0] for row in rows), default=seq)
    return [(row[1], row[2]) for row in rows], mark


def desired_seq_now(session: Session) -> int:
    """The change feed's current mark (where a newly started poller begins)."""
    return _feed_now(session)


def _bump(row: Device, config: dict[str, Any], now: datetime, seq: int) -> None:
    # The device ignores any generation not newer than one it applied or failed
    # (invariant 4). A device deleted and registered again still remembers its old
    # generations, so the new one must pass them, or it would be ignored forever.
    row.desired_generation = (
        max(row.desired_generation, row.reported_generation, row.failed_generation) + 1
    )
    row.desired_config = dict(config)
    row.desired_updated_at = now
    row.desired_seq = seq


def _check_bundles(session: Session, config: Mapping[str, Any]) -> None:
    """Raise UnknownBundles unless every bundle ``config`` references is stored.

    Runs inside the write transaction that sets the config, so a bundle cannot be
    deleted between the check and the commit (deleting takes the same write lock
    and refuses while a desired state references the bundle).
    """
    wanted = protocols.bundle_references(config)
    if not wanted:
        return
    held = set(session.exec(select(Bundle.sha256).where(col(Bundle.sha256).in_(wanted))).all())
    missing = sorted(wanted - held)
    if missing:
        session.rollback()
        raise UnknownBundles(missing)


def set_desired(
    session: Session,
    *,
    device_id: str,
    config: Mapping[str, Any],
    now: datetime,
    max_config_bytes: int,
) -> Device:
    """Replace a device's desired config; its ``desired_generation`` grows by exactly 1
    (or jumps past the generations the device reports, after a re-registration).

    Returns the row (``row.desired_generation`` is the new generation).
    Raises ConfigTooLarge, DeviceNotFound or UnknownBundles; nothing is written then.
    """
    document = _check_config(config, max_config_bytes)
    begin_write(session)
    row = session.exec(select(Device).where(Device.id == device_id).with_for_update()).first()
    if row is None:
        raise DeviceNotFound(device_id)
    if row.decommissioned_at is not None:
        session.rollback()
        raise DeviceDecommissioned(device_id, "it gets no desired state")
    _check_bundles(session, document)
    _set_own(session, row, document, now, _next_desired_seq(session), max_config_bytes, {})
    session.commit()
    return row


def _set_own(
    session: Session,
    row: Device,
    own: dict[str, Any],
    now: datetime,
    seq: int,
    max_config_bytes: int,
    layers: dict[str, Layer | None],
) -> None:
    """Make ``own`` the device's base layer and bump it to the merge with its deployments
    (an own change always bumps: it is how an operator retries a failed generation).
    ``layers`` caches deployments by name across the rows of one transaction."""
    entries = job_entries(session.connection(), [row.id]).get(row.id)  # hub.jobs.entries
    base = with_jobs(own, entries)
    current = layers_for(session, row.assignments, layers)
    gating = gate.read_gating(session.connection()) if row.assignments else {}
    if gating:  # a rollout runs: the device's deployments at the versions it has them
        versions = gate.Versions({layer.name: layer for layer in current}, gating, set())
        names = tuple(sorted(row.assignments))
        composed = versions.compose(base, names, versions.modes(row.id, names))
    else:
        composed = compose(base, current)
    document = composed.document
    if row.assignments:
        size = config_size_bytes(document)
        if size > max_config_bytes:
            session.rollback()
            raise ConfigTooLarge(size, max_config_bytes)
    row.manual_config = own
    row.contributions = composed.contributions
    _bump(row, document, now, seq)


def set_lock_override(
    session: Session,
    *,
    device_id: str,
    workloads: Sequence[str] | None,
    until: datetime,
    now: datetime,
    max_config_bytes: int,
) -> Device:
    """Put a lock override into the device's desired config (the ``lock_override``
    member, docs/runtime.md "Update locks"): the rest of the config as it is, the
    generation + 1, in one transaction (a concurrent desired change is not lost).

    Raises ConfigTooLarge, DeviceNotFound or DeviceDecommissioned; nothing is written then.
    """
    begin_write(session)
    row = session.exec(select(Device).where(Device.id == device_id).with_for_update()).first()
    if row is None:
        raise DeviceNotFound(device_id)
    if row.decommissioned_at is not None:
        session.rollback()
        raise DeviceDecommissioned(device_id, "it gets no desired state")
    override = {
        "until": until.timestamp(),
        "workloads": sorted(set(workloads)) if workloads is not None else None,
    }
    try:
        document = _check_config({**row.manual_config, "lock_override": override}, max_config_bytes)
    except ConfigTooLarge:
        session.rollback()
        raise
    _set_own(session, row, document, now, _next_desired_seq(session), max_config_bytes, {})
    session.commit()
    return row


def set_desired_for_selector(
    session: Session,
    *,
    labels: Mapping[str, str] | None,
    config: Mapping[str, Any],
    now: datetime,
    max_config_bytes: int,
) -> list[tuple[str, int]]:
    """Set the same desired config on every active device whose labels include ``labels``
    (every active device when ``labels`` is None or empty), in one transaction.

    Returns ``(device_id, new_generation)`` for each device, ordered by id.
    Raises ConfigTooLarge or UnknownBundles.
    """
    document = _check_config(config, max_config_bytes)
    begin_write(session)
    _check_bundles(session, document)
    rows = session.exec(
        select(Device)
        .where(*_device_filter(labels, "active"))
        .order_by(col(Device.id))
        .with_for_update()
    ).all()
    seq = _next_desired_seq(session)  # one value: the rows commit together
    layers: dict[str, Layer | None] = {}
    for row in rows:
        _set_own(session, row, document, now, seq, max_config_bytes, layers)
    session.commit()
    return [(row.id, row.desired_generation) for row in rows]


def _out_of_sync() -> ColumnElement[bool]:
    return and_(
        _active(),
        col(Device.desired_generation) > 0,
        col(Device.desired_generation) > col(Device.reported_generation),
    )


def out_of_sync_ids(session: Session) -> list[str]:
    """Devices whose desired generation is newer than what they report having applied."""
    return list(session.exec(select(Device.id).where(_out_of_sync()).order_by(col(Device.id))))


def desired_documents(
    session: Session, *, device_ids: Iterable[str]
) -> dict[str, protocols.Desired | None]:
    """The current desired document of each device, read now so the newest generation wins.

    ``None`` means "nothing to deliver: clear the retained copy" (the device was
    decommissioned or deleted, or was re-registered and has no desired state yet).
    """
    wanted = sorted(set(device_ids))
    rows = {row.id: row for row in session.exec(select(Device).where(col(Device.id).in_(wanted)))}
    out: dict[str, protocols.Desired | None] = {}
    for device_id in wanted:
        row = rows.get(device_id)
        if (
            row is None
            or row.decommissioned_at is not None
            or row.desired_generation <= 0
            or row.desired_updated_at is None
        ):
            out[device_id] = None
        else:
            out[device_id] = protocols.Desired(
                device_id=row.id,
                generation=row.desired_generation,
                config=row.desired_config,
                issued_at=row.desired_updated_at.timestamp(),
            )
    return out


# -- fleet -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceCounts:
    """Devices per state. The active fleet's states overlap (a device is ``online``
    and ``in_sync`` at once); ``decommissioned`` devices are counted apart."""

    total: int  # active devices
    online: int
    in_sync: int
    out_of_sync: int  # behind: desired generation ahead of the reported one
    failed: int  # the newest report says its apply failed
    decommissioned: int


def device_counts(session: Session) -> DeviceCounts:
    """The fleet's states (the summary without ``by_generation``): what the metrics'
    device gauges show; the same one pass as :func:`fleet_summary`."""
    summary = fleet_summary(session)
    return DeviceCounts(
        total=summary.total,
        online=summary.online,
        in_sync=summary.in_sync,
        out_of_sync=summary.out_of_sync,
        failed=summary.failed,
        decommissioned=summary.decommissioned,
    )


@dataclass(frozen=True)
class Summary:
    total: int
    online: int
    in_sync: int
    out_of_sync: int
    failed: int
    by_generation: dict[int, int]
    decommissioned: int


def fleet_summary(session: Session) -> Summary:
    """Counts over the active fleet; ``by_generation`` counts devices per desired
    generation; decommissioned devices are only counted, apart.

    One pass over the table: one row per (decommissioned?, desired generation) with
    the counts beside it, added up here (a summary is polled often, e.g. while a
    fleet converges).
    """

    def _count(condition: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    gone = col(Device.decommissioned_at).is_not(None)
    generation = col(Device.desired_generation)
    rows = session.execute(
        sa_select(
            gone,
            generation,
            func.count(),
            _count(col(Device.online).is_(True)),
            _count(generation == col(Device.reported_generation)),
            _count(and_(generation > 0, generation > col(Device.reported_generation))),
            _count(col(Device.report_phase) == "failed"),
        )
        .select_from(Device)
        .group_by(gone, generation)
    ).all()
    total = online = in_sync = out_of_sync = failed = decommissioned = 0
    by_generation: dict[int, int] = {}
    for is_gone, desired, n, n_online, n_in_sync, n_out_of_sync, n_failed in rows:
        if is_gone:
            decommissioned += int(n)
            continue
        by_generation[int(desired)] = int(n)
        total += int(n)
        online += int(n_online)
        in_sync += int(n_in_sync)
        out_of_sync += int(n_out_of_sync)
        failed += int(n_failed)
    return Summary(
        total=total,
        online=online,
        in_sync=in_sync,
        out_of_sync=out_of_sync,
        failed=failed,
        by_generation=by_generation,
        decommissioned=decommissioned,
    )


# -- ingest ------------------------------------------------------------------------------

APPLIED = "applied"


@dataclass(frozen=True)
class ApplyResult:
    """``outcomes[i]`` says what happened to ``batch[i]``: ``applied``, a ``Stale`` value,
    or a ``Reject`` value. ``republish`` lists devices whose desired document must be
    published again, in first-seen order."""

    outcomes: list[str]
    republish: list[str]


def apply_messages(
    session: Session, batch: Sequence[DeviceMessage], *, now: datetime
) -> ApplyResult:
    """Apply decoded device messages in order, in ONE transaction, and commit it.

    SQL Core, not the ORM: one SELECT of the tracking columns of the batch's
    devices, the rules in memory, then one executemany UPDATE per set of changed
    columns (and one for re-keyed devices), and one executemany INSERT of the
    ``online``/``offline`` device events for every flip of ``online`` (each flip in
    the batch, in order). Per batch that is a fixed handful of
    statements whatever the number of messages; the ORM's identity map, change
    tracking and per-row flush cost about four times as much per message
    (docs/benchmarks.md, "Hub ingest: what the profile showed").
    """
    connection = _write_connection(session)
    ids = sorted({message.device_id for message in batch})
    rows = connection.execute(
        sa_select(_DEVICES.c.id, *_TRACKING_COLUMNS).where(_DEVICES.c.id.in_(ids)).with_for_update()
    )
    loaded = {row[0]: Tracking(*row[1:]) for row in rows}
    tracking = dict(loaded)
    certificates = _certificate_facts(connection, batch)
    changed: dict[str, Tracking] = {}
    rekeyed: dict[str, int] = {}
    outcomes: list[str] = []
    republish: dict[str, None] = {}
    flips: list[dict[str, Any]] = []
    for message in batch:
        device_id = message.device_id
        current = tracking.get(device_id)
        if current is None:
            outcomes.append(Reject.UNKNOWN_DEVICE.value)
            continue
        cert = certificates.get((device_id, getattr(message, "cert_serial", None)), CertFact.NONE)
        decision = decide(current, message, now=now, cert=cert)
        new = current
        if decision.reject is not None:
            outcomes.append(decision.reject.value)
        elif decision.stale is not None:
            outcomes.append(decision.stale.value)
        else:
            new = decision.tracking
            if new.desired_generation != current.desired_generation:
                # the rules never write desired state (_WRITTEN leaves it out of the UPDATE)
                new = dataclasses.replace(new, desired_generation=current.desired_generation)
            changed[device_id] = new
            outcomes.append(APPLIED)
            if new.online != current.online:
                flips.append(online_event(device_id, online=new.online, at=now))
        if decision.rekey:  # as _bump: pass every generation the device reported
            generation = (
                max(new.desired_generation, new.reported_generation, new.failed_generation) + 1
            )
            new = dataclasses.replace(new, desired_generation=generation)
            rekeyed[device_id] = generation
        if decision.republish:
            republish[device_id] = None
        tracking[device_id] = new
    _write_changes(connection, loaded, changed, rekeyed, now=now)
    if flips:
        insert_events(connection, flips)
    session.commit()
    return ApplyResult(outcomes=outcomes, republish=list(republish))


def _write_changes(
    connection: Connection,
    loaded: Mapping[str, Tracking],
    changed: Mapping[str, Tracking],
    rekeyed: Mapping[str, int],
    *,
    now: datetime,
) -> None:
    """The batch's UPDATEs: the changed tracking columns, then the re-keyed generations."""
    # One executemany per set of changed columns: a run of reports usually changes
    # only the sequence number and last_seen, so most rows bind two values, not eleven.
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for device_id, t in changed.items():
        before = loaded[device_id]
        names = tuple(name for name in _WRITTEN if getattr(t, name) != getattr(before, name))
        if names:
            params = {f"b_{name}": getattr(t, name) for name in names}
            params["b_id"] = device_id
            groups.setdefault(names, []).append(params)
    for names, params_list in groups.items():
        connection.execute(_update_tracking(names), params_list)
    if rekeyed:  # the same config, re-issued under a generation past the device's
        connection.execute(
            _UPDATE_REKEY,
            [
                {"b_id": device_id, "b_generation": generation, "b_updated_at": now}
                for device_id, generation in rekeyed.items()
            ],
        )


def online_event(device_id: str, *, online: bool, at: datetime, detail: str = "") -> dict[str, Any]:
    """Pure: the ``device_event`` row of one flip of ``online`` (for :func:`insert_events`)."""
    return {
        "device_id": device_id,
        "at": at,
        "kind": "online" if online else "offline",
        "deployment": None,
        "generation": None,
        "detail": detail,
    }


def insert_events(connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """One executemany INSERT of device events, then the table's bound (the newest
    ``EVENTS_KEPT`` kept, as placement's events)."""
    from hub.deployments.reconcile import EVENTS_KEPT  # reconcile imports this module

    connection.execute(insert(_EVENTS), list(rows))
    top = connection.execute(sa_select(func.max(_EVENTS.c.id))).scalar()
    if top is not None and top > EVENTS_KEPT:
        connection.execute(delete(_EVENTS).where(_EVENTS.c.id <= top - EVENTS_KEPT))


_CERTIFICATES: Table = DeviceCertificate.__table__  # type: ignore[attr-defined]


def _certificate_facts(
    connection: Connection, batch: Sequence[DeviceMessage]
) -> dict[tuple[str, str | None], CertFact]:
    """What the records say of each certificate a birth in ``batch`` names (one SELECT,
    only when a birth names one)."""
    named = {
        (m.device_id, m.cert_serial)
        for m in batch
        if isinstance(m, protocols.Birth) and m.cert_serial is not None
    }
    if not named:
        return {}
    rows = connection.execute(
        sa_select(
            _CERTIFICATES.c.serial, _CERTIFICATES.c.device_id, _CERTIFICATES.c.revoked_at
        ).where(_CERTIFICATES.c.serial.in_(sorted({serial for _, serial in named})))
    )
    on_record = {serial: (device_id, revoked_at) for serial, device_id, revoked_at in rows}
    facts: dict[tuple[str, str | None], CertFact] = {}
    for device_id, serial in named:
        owner, revoked_at = on_record.get(serial or "", (None, None))
        if owner != device_id:
            facts[(device_id, serial)] = CertFact.UNKNOWN
        else:
            facts[(device_id, serial)] = (
                CertFact.CURRENT if revoked_at is None else CertFact.REVOKED
            )
    return facts


@functools.lru_cache(maxsize=256)
def _update_tracking(names: tuple[str, ...]) -> Update:
    """The UPDATE of these tracking columns by id, for executemany (built once per set)."""
    return (
        update(_DEVICES)
        .where(_DEVICES.c.id == bindparam("b_id"))
        .values({name: bindparam(f"b_{name}") for name in names})
    )


def _write_connection(session: Session) -> Connection:
    begin_write(session)
    return session.connection()
