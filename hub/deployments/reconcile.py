"""Plan the fleet and commit it, or only show what it would change: one code path.

Called through :class:`hub.devices.desired.DesiredState` by the deployment and label
routes (a change, or its dry run) and by the placement controller (devices came,
went or changed; timers). Each call is one write transaction: read the fleet, apply
the requested deployment changes, run the pure planner
(:func:`hub.controllers.placement.plan.plan`) and the merge
(:func:`hub.deployments.merge.compose`) for every device, then either roll back
(a dry run: the preview) or commit, in the same transaction, the decisions and every
changed document.

Rules:
- The preview of a change is the diff between each device's stored document and the
  document this very run composes, so what a dry run shows is what the real run then
  commits (given the same database).
- A device's generation is bumped only when its composed document changes
  (canonical JSON); assignments and contributions are kept current either way.
- A composed document over the size limit is not sent: the device keeps its current
  document and every deployment newly assigned to it is listed as unplaceable
  ("merged document too large").
- The outcome of each generation that carries a deployment's workloads is recorded
  once in the device's event history (``applied`` or ``failed``).
- A run is :func:`read_fleet` (the rows), :func:`decide` (pure: the plan and every
  device's document) and the commit; ``simulator/bench/placement.py`` times the
  first two apart. :func:`decide` pauses the cyclic garbage collector: it allocates
  a few hundred thousand containers next to the fleet's rows, which would otherwise
  set off full collections over all of them (a third of its time at 10,000
  devices); what it builds is freed by reference counting, or collected once the
  collector runs again.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from sqlalchemy import String, Table, bindparam, cast, delete, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from hub.controllers.placement.plan import Plan, plan
from hub.controllers.rollout.policy import PolicyError, parse_policy
from hub.db import begin_write, epoch
from hub.deployments.errors import DeploymentNotFound, InvalidSpec
from hub.deployments.layers import layer_of
from hub.deployments.merge import Composed, DocumentDiff, canonical, diff
from hub.deployments.models import Deployment, DeploymentInstance, DeviceEvent, Unplaced
from hub.deployments.spec import (
    DeploymentSpec,
    DeviceFacts,
    Instance,
    Move,
    SpecError,
    spec_from_json,
)
from hub.devices.models import Device
from hub.devices.store import check_bundles, next_desired_seq
from hub.jobs.entries import job_entries, with_jobs
from hub.rollouts import gate
from hub.rollouts.gate import Gating

TOO_LARGE = "merged document too large"
HISTORY_KEPT = 50
EVENTS_KEPT = 200_000
"""Device events kept fleet-wide (the oldest are dropped first)."""

_DEVICES: Table = Device.__table__  # type: ignore[attr-defined]
_DEPLOYMENTS: Table = Deployment.__table__  # type: ignore[attr-defined]
_INSTANCES: Table = DeploymentInstance.__table__  # type: ignore[attr-defined]
_UNPLACED: Table = Unplaced.__table__  # type: ignore[attr-defined]
_EVENTS: Table = DeviceEvent.__table__  # type: ignore[attr-defined]

_DEVICE_COLUMNS = (
    "id",
    "labels",
    "decommissioned_at",
    "online",
    "online_changed_at",
    "last_seen",
    "created_at",
    "inventory",
    "agent_version",
    "manual_config",
    "desired_config",
    "assignments",
    "contributions",
    "desired_generation",
    "reported_generation",
    "failed_generation",
    "events_generation",
)


@dataclass(frozen=True, slots=True)
class DeviceDiff:
    """One device whose document a run changes (or would)."""

    device_id: str
    diff: DocumentDiff
    contributions: dict[str, str]
    ties: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FleetRows:
    """What a run plans from: every device's row (by id; the columns of
    ``_DEVICE_COLUMNS``) and every stored instance."""

    devices: list[dict[str, Any]]
    instances: list[Instance]


@dataclass(frozen=True, slots=True)
class Decision:
    """What :func:`decide` found: the plan, the devices whose document changes (a diff
    and the row update bumping each), the bookkeeping-only updates, how many devices
    stay as they are, and the unplaceable devices (the plan's, plus "too large")."""

    plan: Plan
    changed: list[DeviceDiff]
    documents: list[dict[str, Any]]
    bookkeeping: list[dict[str, Any]]
    unchanged: int
    unplaceable: dict[str, dict[str, tuple[str, ...]]]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run decided (and, unless a dry run, committed)."""

    changed: tuple[DeviceDiff, ...]
    unchanged: int
    unplaceable: dict[str, dict[str, tuple[str, ...]]]
    bumped: tuple[str, ...]
    """Devices whose generation was bumped (empty for a dry run)."""
    plan: Plan
    rollouts_created: tuple[str, ...] = ()
    """Deployments whose change this run made a rollout of (the rollout controller
    starts them)."""


def _facts(row: Mapping[str, Any]) -> DeviceFacts:
    online = bool(row["online"])
    changed = epoch(row["online_changed_at"])
    seen = epoch(row["last_seen"])
    created = epoch(row["created_at"])
    return DeviceFacts(
        id=row["id"],
        labels=row["labels"] or {},
        active=row["decommissioned_at"] is None,
        online=online,
        # Absence counts from the flip to offline; a device never flipped (an older row)
        # from when it was last seen, or registered.
        offline_since=None if online else (changed or seen or created),
        online_since=(changed or seen) if online else None,
        inventory=row["inventory"],
        agent_version=row["agent_version"],
    )


def _instance(row: Mapping[str, Any]) -> Instance:
    return Instance(
        deployment=row["deployment"],
        index=row["idx"],
        device_id=row["device_id"],
        placed_at=row["placed_at"],
        original_device_id=row["original_device_id"],
        history=tuple(
            Move(m["at"], m.get("from_device"), m.get("to_device"), m.get("reason", ""))
            for m in row["history"] or ()
        ),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        reason=row["reason"],
    )


def _instance_row(instance: Instance) -> dict[str, Any]:
    return {
        "deployment": instance.deployment,
        "idx": instance.index,
        "device_id": instance.device_id,
        "placed_at": instance.placed_at,
        "original_device_id": instance.original_device_id,
        "history": [
            {"at": m.at, "from_device": m.from_device, "to_device": m.to_device, "reason": m.reason}
            for m in instance.history[-HISTORY_KEPT:]
        ],
        "attempts": instance.attempts,
        "next_attempt_at": instance.next_attempt_at,
        "reason": (instance.reason or "")[:512] or None,
    }


def spec_of(name: str, spec: Mapping[str, Any]) -> DeploymentSpec:
    """A stored or proposed spec as the planner's; raises InvalidSpec."""
    try:
        return spec_from_json(name, spec)
    except SpecError as error:
        raise InvalidSpec(name, str(error)) from None


def run(
    session: Session,
    *,
    now: datetime,
    max_config_bytes: int,
    put: Mapping[str, Mapping[str, Any]] | None = None,
    remove: Iterable[str] = (),
    labels: Mapping[str, Mapping[str, str]] | None = None,
    dry_run: bool = False,
) -> Outcome:
    """Plan the whole fleet in one write transaction, with ``put`` (name -> spec),
    ``remove`` (names) and ``labels`` (device id -> its new labels) applied first, and
    commit it unless ``dry_run``. ``next_seq(session)`` gives the change feed's next
    value. Raises DeploymentNotFound (a removed name that does not exist), InvalidSpec.
    """
    begin_write(session)
    try:
        outcome = _run(
            session,
            now=now,
            max_config_bytes=max_config_bytes,
            put=put or {},
            remove=set(remove),
            labels=labels or {},
            dry_run=dry_run,
        )
    except BaseException:
        session.rollback()
        raise
    if dry_run:
        session.rollback()
    else:
        session.commit()
    return outcome


def run_in_transaction(session: Session, *, now: datetime, max_config_bytes: int) -> Outcome:
    """Plan and compose the fleet inside the caller's write transaction, which the
    caller commits (the rollout controller: its decisions and the documents they
    change in one transaction)."""
    return _run(
        session,
        now=now,
        max_config_bytes=max_config_bytes,
        put={},
        remove=set(),
        labels={},
        dry_run=False,
    )


def _run(
    session: Session,
    *,
    now: datetime,
    max_config_bytes: int,
    put: Mapping[str, Mapping[str, Any]],
    remove: set[str],
    labels: Mapping[str, Mapping[str, str]],
    dry_run: bool,
) -> Outcome:
    connection = session.connection()
    stored = read_deployments(connection)
    for name in remove:
        if name not in stored:
            raise DeploymentNotFound(name)
    specs_json: dict[str, Mapping[str, Any]] = {
        name: spec for name, (spec, _, _) in stored.items() if name not in remove
    }
    specs_json.update(put)
    specs = {name: spec_of(name, spec) for name, spec in sorted(specs_json.items())}
    _check_puts(session, put)
    created: list[str] = []
    if not dry_run:
        created = gate.create_rollouts(connection, stored=stored, put=put, remove=remove, now=now)
        _store_deployments(connection, stored, put, remove, now)
    if not stored and not specs_json:
        # No deployment before or after: nothing to place or merge (a label change on a
        # fleet without deployments costs one UPDATE, not a read of every device).
        if labels and not dry_run:
            connection.execute(
                _UPDATE_LABELS, [{"b_id": i, "b_labels": dict(v)} for i, v in labels.items()]
            )
        empty = Plan(assignments={}, instances=(), unplaceable={}, events=(), wake_after_s=None)
        return Outcome((), 0, {}, (), empty)

    fleet = read_fleet(connection)
    for row in fleet.devices:
        if row["id"] in labels:
            row["labels"] = dict(labels[row["id"]])
    gating = gate.read_gating(connection, ungated=put if dry_run else ())
    decision = decide(
        fleet,
        specs=specs,
        specs_json=specs_json,
        now=now,
        max_config_bytes=max_config_bytes,
        gating=gating,
    )
    bumped: tuple[str, ...] = ()
    if not dry_run:
        bumped = _commit(
            connection,
            rows=fleet.devices,
            decided=decision.plan,
            unplaceable=decision.unplaceable,
            documents=decision.documents,
            bookkeeping=decision.bookkeeping,
            labels=labels,
            now=now,
            seq=next_desired_seq(session) if decision.documents else 0,
        )
        if gating:
            gate.record_generations(
                connection,
                gating,
                fleet.devices,
                {p["b_id"]: p["b_generation"] for p in decision.documents},
            )
    return Outcome(
        changed=tuple(decision.changed),
        unchanged=decision.unchanged,
        unplaceable=decision.unplaceable,
        bumped=bumped,
        plan=decision.plan,
        rollouts_created=tuple(created),
    )


def _check_puts(session: Session, put: Mapping[str, Mapping[str, Any]]) -> None:
    """What the specs' shapes cannot say: bundles that exist, a usable rollout policy."""
    for name, spec in put.items():
        check_bundles(session, {"workloads": list(spec.get("workloads") or ())})
        if spec.get("rollout"):
            try:
                parse_policy(spec["rollout"])
            except PolicyError as error:
                raise InvalidSpec(name, f"rollout: {error}") from None


def read_deployments(connection: Any) -> dict[str, tuple[dict[str, Any], int, datetime]]:
    """The stored deployments: name -> (spec, version, created_at), in the caller's
    transaction."""
    return {
        r.name: (r.spec, r.version, r.created_at)
        for r in connection.execute(sa_select(_DEPLOYMENTS)).mappings()
    }


def read_fleet(connection: Any) -> FleetRows:
    """Every device's row (by id) and every stored instance, in the caller's transaction."""
    devices = [
        dict(r)
        for r in connection.execute(
            sa_select(*(_DEVICES.c[name] for name in _DEVICE_COLUMNS)).order_by(_DEVICES.c.id)
        ).mappings()
    ]
    instances = [_instance(r) for r in connection.execute(sa_select(_INSTANCES)).mappings()]
    _with_job_entries(connection, devices)
    return FleetRows(devices, instances)


def _with_job_entries(connection: Any, devices: list[dict[str, Any]]) -> None:
    """The jobs handed out to each device join its own document (the base layer) for
    the composition, so a recomposed document keeps them (:mod:`hub.jobs.entries`)."""
    entries = job_entries(connection)
    for row in devices:
        if row["id"] in entries:
            row["manual_config"] = with_jobs(row["manual_config"] or {}, entries[row["id"]])


@contextmanager
def _collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a burst of allocation (module rules)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def decide(
    fleet: FleetRows,
    *,
    specs: Mapping[str, DeploymentSpec],
    specs_json: Mapping[str, Mapping[str, Any]],
    now: datetime,
    max_config_bytes: int,
    gating: Mapping[str, Gating] | None = None,
) -> Decision:
    """Plan ``fleet`` against the deployments (``specs``, and ``specs_json`` their stored
    form, for the merge layers) at ``now`` and compose every active device's document,
    each deployment with an active rollout in ``gating`` at the version the rollout has
    the device at (:mod:`hub.rollouts.gate`); no I/O, no clock. Raises ValueError for
    inconsistent input (the planner's)."""
    gating = gating or {}
    rows = fleet.devices
    current = {row["id"]: frozenset(row["assignments"] or ()) for row in rows if row["assignments"]}
    with _collector_paused():
        decided = plan(
            devices=[_facts(row) for row in rows],
            deployments=list(specs.values()),
            instances=fleet.instances,
            current=current,
            now=now.timestamp(),
        )
        layers = {name: layer_of(name, spec) for name, spec in specs_json.items()}
        unplaceable = {d: dict(by_device) for d, by_device in decided.unplaceable.items()}
        changed, documents, bookkeeping, unchanged = _compose_all(
            rows,
            decided,
            layers,
            unplaceable,
            max_config_bytes,
            gate.Versions(layers, gating, gate.forced(gating, rows)),
        )
    return Decision(decided, changed, documents, bookkeeping, unchanged, unplaceable)


def _compose_all(
    rows: Sequence[Mapping[str, Any]],
    decided: Plan,
    layers: Mapping[str, Any],
    unplaceable: dict[str, dict[str, tuple[str, ...]]],
    max_config_bytes: int,
    versions: gate.Versions | None = None,
) -> tuple[list[DeviceDiff], list[dict[str, Any]], list[dict[str, Any]], int]:
    """Every active device's merged document: the changed ones (a diff each, and the
    row update bumping them), the bookkeeping-only updates, and how many stay as they are."""
    changed: list[DeviceDiff] = []
    documents: list[dict[str, Any]] = []  # rows whose generation is bumped
    bookkeeping: list[dict[str, Any]] = []  # assignments/contributions only
    unchanged = 0
    # Devices with the same assignments and the same own document get the same document:
    # compose (and encode) each combination once. The results are shared, never mutated.
    versions = versions or gate.Versions(layers, {}, set())
    memo: dict[tuple[Any, ...], tuple[Composed, bytes]] = {}
    for row in rows:
        if row["decommissioned_at"] is not None:
            continue
        names = decided.assignments.get(row["id"])  # sorted
        if names is None:
            names = tuple(sorted(row["assignments"] or ()))
        base = row["manual_config"] or {}
        modes = versions.modes(row["id"], names)
        key = (names, canonical(base) if base else None, modes)
        found = memo.get(key)
        if found is None:
            composed = versions.compose(base, names, modes)
            found = memo[key] = (composed, canonical(composed.document))
        composed, encoded = found
        document = composed.document
        same = encoded == canonical(row["desired_config"] or {}) and row["id"] not in versions.force
        if not same and names and _too_large(document, max_config_bytes):
            kept = tuple(sorted(row["assignments"] or ()))
            for name in set(names) - set(kept):
                unplaceable.setdefault(name, {})[row["id"]] = (TOO_LARGE,)
            names = kept
            composed = versions.compose(
                row["manual_config"] or {}, names, versions.modes(row["id"], names)
            )
            document = composed.document
            same = canonical(document) == canonical(row["desired_config"] or {})
        if same:
            unchanged += 1
            if list(names) != list(row["assignments"] or ()) or composed.contributions != (
                row["contributions"] or {}
            ):
                bookkeeping.append(
                    {
                        "b_id": row["id"],
                        "b_assignments": list(names),
                        "b_contributions": composed.contributions,
                    }
                )
            continue
        ties = tuple(sorted({s.workload for s in composed.shadowed if s.tie}))
        changed.append(
            DeviceDiff(
                row["id"],
                diff(row["desired_config"] or {}, document),
                composed.contributions,
                ties,
            )
        )
        documents.append(
            {
                "b_id": row["id"],
                "b_assignments": list(names),
                "b_contributions": composed.contributions,
                "b_config": document,
                "b_generation": max(
                    row["desired_generation"], row["reported_generation"], row["failed_generation"]
                )
                + 1,
            }
        )

    return changed, documents, bookkeeping, unchanged


def _too_large(document: Mapping[str, Any], limit: int) -> bool:
    return len(canonical(document)) > limit


def _store_deployments(
    connection: Any,
    stored: Mapping[str, tuple[Mapping[str, Any], int, datetime]],
    put: Mapping[str, Mapping[str, Any]],
    remove: set[str],
    now: datetime,
) -> None:
    for name, spec in put.items():
        if name in stored:
            old_spec, version, _ = stored[name]
            if canonical(old_spec) == canonical(spec):
                continue  # an unchanged spec keeps its version
            connection.execute(
                update(_DEPLOYMENTS)
                .where(_DEPLOYMENTS.c.name == name)
                .values(spec=dict(spec), version=version + 1, updated_at=now)
            )
        else:
            connection.execute(
                insert(_DEPLOYMENTS).values(
                    name=name, spec=dict(spec), version=1, created_at=now, updated_at=now
                )
            )
    if remove:
        connection.execute(delete(_DEPLOYMENTS).where(_DEPLOYMENTS.c.name.in_(sorted(remove))))


_UPDATE_DOCUMENT = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("b_id"))
    .values(
        assignments=bindparam("b_assignments"),
        contributions=bindparam("b_contributions"),
        desired_config=bindparam("b_config"),
        desired_generation=bindparam("b_generation"),
        desired_updated_at=bindparam("b_now"),
        desired_seq=bindparam("b_seq"),
    )
)
_UPDATE_BOOKKEEPING = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("b_id"))
    .values(assignments=bindparam("b_assignments"), contributions=bindparam("b_contributions"))
)
_UPDATE_EVENTS_GENERATION = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("b_id"))
    .values(events_generation=bindparam("b_generation"))
)
_UPDATE_LABELS = (
    update(_DEVICES).where(_DEVICES.c.id == bindparam("b_id")).values(labels=bindparam("b_labels"))
)


def _commit(
    connection: Any,
    *,
    rows: Sequence[Mapping[str, Any]],
    decided: Plan,
    unplaceable: Mapping[str, Mapping[str, tuple[str, ...]]],
    documents: list[dict[str, Any]],
    bookkeeping: list[dict[str, Any]],
    labels: Mapping[str, Mapping[str, str]],
    now: datetime,
    seq: int,
) -> tuple[str, ...]:
    if labels:
        connection.execute(
            _UPDATE_LABELS, [{"b_id": i, "b_labels": dict(v)} for i, v in labels.items()]
        )
    if documents:
        for params in documents:
            params["b_now"] = now
            params["b_seq"] = seq
        connection.execute(_UPDATE_DOCUMENT, documents)
    if bookkeeping:
        connection.execute(_UPDATE_BOOKKEEPING, bookkeeping)

    _commit_instances(connection, decided)
    _commit_unplaced(connection, unplaceable)
    _commit_events(connection, rows, decided, now)
    return tuple(p["b_id"] for p in documents)


def _commit_instances(connection: Any, decided: Plan) -> None:
    # Instances: the plan holds every instance of every placed deployment.
    stored = {
        (r["deployment"], r["idx"]): dict(r)
        for r in connection.execute(sa_select(_INSTANCES)).mappings()
    }
    wanted = {(i.deployment, i.index): _instance_row(i) for i in decided.instances}
    gone = stored.keys() - wanted.keys()
    for deployment, idx in gone:
        connection.execute(
            delete(_INSTANCES).where(_INSTANCES.c.deployment == deployment, _INSTANCES.c.idx == idx)
        )
    for key, row in wanted.items():
        before = stored.get(key)
        if before == row:
            continue
        if before is not None:
            connection.execute(
                delete(_INSTANCES).where(
                    _INSTANCES.c.deployment == key[0], _INSTANCES.c.idx == key[1]
                )
            )
        connection.execute(insert(_INSTANCES).values(**row))


_UNPLACED_REASONS = sa_select(
    _UNPLACED.c.deployment, _UNPLACED.c.device_id, cast(_UNPLACED.c.reasons, String)
)
_DELETE_UNPLACED = delete(_UNPLACED).where(
    _UNPLACED.c.deployment == bindparam("b_deployment"),
    _UNPLACED.c.device_id == bindparam("b_device"),
)
_decode_json = msgspec.json.Decoder().decode


def _commit_unplaced(
    connection: Any, unplaceable: Mapping[str, Mapping[str, tuple[str, ...]]]
) -> None:
    # Unplaced: replace what differs. Tens of thousands of rows at rest: their reasons
    # are read as text and decoded by msgspec (a third of the time of the JSON type's).
    old_unplaced = {
        (deployment, device_id): _decode_json(text)
        for deployment, device_id, text in connection.execute(_UNPLACED_REASONS)
    }
    new_unplaced = {
        (deployment, device_id): list(reasons)
        for deployment, by_device in unplaceable.items()
        for device_id, reasons in by_device.items()
    }
    stale = [
        {"b_deployment": d, "b_device": i}
        for (d, i), v in old_unplaced.items()
        if new_unplaced.get((d, i)) != v
    ]
    if stale:
        connection.execute(_DELETE_UNPLACED, stale)
    fresh = [
        {"deployment": d, "device_id": i, "reasons": v}
        for (d, i), v in new_unplaced.items()
        if old_unplaced.get((d, i)) != v
    ]
    if fresh:
        connection.execute(insert(_UNPLACED), fresh)


def _commit_events(
    connection: Any, rows: Sequence[Mapping[str, Any]], decided: Plan, now: datetime
) -> None:
    # History: the planner's events, and each generation's outcome once.
    events = [
        {
            "device_id": e.device_id,
            "at": now,
            "kind": e.kind,
            "deployment": e.deployment,
            "generation": None,
            "detail": e.detail[:1024],
        }
        for e in decided.events
    ]
    outcome_events, outcomes = _outcomes(rows, now)
    events += outcome_events
    if outcomes:
        connection.execute(_UPDATE_EVENTS_GENERATION, outcomes)
    if events:
        connection.execute(insert(_EVENTS), events)
        _prune_events(connection)


def _outcomes(
    rows: Iterable[Mapping[str, Any]], now: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each newest generation's outcome once: an ``applied``/``failed`` event for a device
    with deployments, and every such device's ``events_generation`` moved up to it."""
    events: list[dict[str, Any]] = []
    outcomes: list[dict[str, Any]] = []
    for row in rows:
        generation = row["desired_generation"]
        if generation <= row["events_generation"]:
            continue
        if row["reported_generation"] >= generation:
            kind = "applied"
        elif row["failed_generation"] >= generation:
            kind = "failed"
        else:
            continue
        outcomes.append({"b_id": row["id"], "b_generation": generation})
        if not row["assignments"]:
            continue
        sources = sorted(set(row["contributions"].values()) - {"device"})
        events.append(
            {
                "device_id": row["id"],
                "at": now,
                "kind": kind,
                "deployment": None,
                "generation": generation,
                "detail": f"generation {generation} {kind}"
                + (f" ({', '.join(sources)})" if sources else ""),
            }
        )
    return events, outcomes


_OUTCOME_COLUMNS = (
    "id",
    "assignments",
    "contributions",
    "desired_generation",
    "reported_generation",
    "failed_generation",
    "events_generation",
)
_OUTCOMES_DUE = (
    sa_select(*(_DEVICES.c[name] for name in _OUTCOME_COLUMNS))
    .where(_DEVICES.c.decommissioned_at.is_(None))
    .where(_DEVICES.c.desired_generation > _DEVICES.c.events_generation)
    .where(
        (_DEVICES.c.reported_generation >= _DEVICES.c.desired_generation)
        | (_DEVICES.c.failed_generation >= _DEVICES.c.desired_generation)
    )
)


def record_outcomes(session: Session, *, now: datetime) -> int:
    """Record the outcomes devices reported since the last look, without planning: one
    read, and a write transaction only when there is something to write. Returns how
    many events it wrote."""
    due = [dict(r) for r in session.connection().execute(_OUTCOMES_DUE).mappings()]
    session.rollback()
    if not due:
        return 0
    begin_write(session)
    # Read again under the write lock: a plan may have recorded them meanwhile.
    due = [dict(r) for r in session.connection().execute(_OUTCOMES_DUE).mappings()]
    events, outcomes = _outcomes(due, now)
    connection = session.connection()
    if outcomes:
        connection.execute(_UPDATE_EVENTS_GENERATION, outcomes)
    if events:
        connection.execute(insert(_EVENTS), events)
        _prune_events(connection)
    session.commit()
    return len(events)


def _prune_events(connection: Any) -> None:
    newest = connection.execute(sa_select(_EVENTS.c.id).order_by(_EVENTS.c.id.desc()).limit(1))
    top = newest.scalar()
    if top is not None and top > EVENTS_KEPT:
        connection.execute(delete(_EVENTS).where(_EVENTS.c.id <= top - EVENTS_KEPT))
