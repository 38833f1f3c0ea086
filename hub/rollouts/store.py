"""Rollouts: data access for the routes and the rollout controller.

Rules:
- Rows change in write transactions only; a command reads the rollout and its
  devices under the write lock, asks the pure planner
  (:func:`hub.controllers.rollout.plan.command`) what it means, and writes that.
- Times go to the planner as epoch seconds and come back as aware UTC datetimes.
- What the API shows is built here from the rows (:func:`view`); device lists are
  capped at :data:`LIST_CAP`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, bindparam, delete, func, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from hub.controllers.rollout.plan import (
    FAILED,
    TIMED_OUT,
    CommandRefused,
    RolloutState,
    Target,
    command,
    progress_deadline_at,
    summarize,
)
from hub.controllers.rollout.policy import Policy, PolicyError, parse_policy
from hub.db import begin_write, epoch, from_epoch
from hub.deployments import reconcile
from hub.deployments.models import Deployment
from hub.rollouts.errors import RolloutNotFound, RolloutRefused
from hub.rollouts.gate import HANDED_OUT_STATES, NOTES_KEPT, mode_of
from hub.rollouts.models import (
    FailedDevice,
    Rollout,
    RolloutDevice,
    RolloutDevicePage,
    RolloutDevicePublic,
    RolloutPublic,
    RolloutWave,
)

LIST_CAP = 100
_ROLLOUTS: Table = Rollout.__table__  # type: ignore[attr-defined]
_TARGETS: Table = RolloutDevice.__table__  # type: ignore[attr-defined]
_DEPLOYMENTS: Table = Deployment.__table__  # type: ignore[attr-defined]
FAILED_STATES = (FAILED, TIMED_OUT)


def policy_of(row: Mapping[str, Any]) -> Policy:
    """The stored policy (valid when stored; a stored one that no longer parses is a bug
    worth a loud error rather than a guess)."""
    try:
        return parse_policy(row["policy"])
    except PolicyError as error:  # pragma: no cover - stored policies were checked
        raise RuntimeError(f"rollout {row['id']}: stored policy invalid: {error}") from error


def state_of(row: Mapping[str, Any]) -> RolloutState:
    return RolloutState(
        state=row["state"],
        reason=row["reason"],
        wave=row["wave"],
        promoted=row["promoted"],
        started_at=epoch(row["started_at"]),
        wave_started_at=epoch(row["wave_started_at"]),
        progress_at=epoch(row["progress_at"]),
        finished_at=epoch(row["finished_at"]),
        start_at=epoch(row["start_at"]),
        activate_at=epoch(row["activate_at"]),
        accepted_failures=row["accepted_failures"],
    )


def state_values(state: RolloutState, now: datetime) -> dict[str, Any]:
    """A planner's RolloutState as the row's columns."""
    return {
        "state": state.state,
        "reason": state.reason[:512],
        "wave": state.wave,
        "promoted": state.promoted,
        "started_at": from_epoch(state.started_at),
        "wave_started_at": from_epoch(state.wave_started_at),
        "progress_at": from_epoch(state.progress_at),
        "finished_at": from_epoch(state.finished_at),
        "start_at": from_epoch(state.start_at),
        "activate_at": from_epoch(state.activate_at),
        "accepted_failures": state.accepted_failures,
        "updated_at": now,
    }


def target_of(row: Mapping[str, Any]) -> Target:
    return Target(
        device_id=row["device_id"],
        wave=row["wave"],
        state=row["state"],
        handed_out_at=epoch(row["handed_out_at"]),
        staged_at=epoch(row["staged_at"]),
        outcome_at=epoch(row["outcome_at"]),
        detail=row["detail"],
    )


def read_targets(connection: Any, rollout_id: int) -> list[dict[str, Any]]:
    """Every device row of the rollout, in wave order (rows zipped with the column
    names: building them through ``.mappings()`` cost twice as much at 5,000)."""
    result = connection.execute(
        sa_select(_TARGETS)
        .where(_TARGETS.c.rollout_id == rollout_id)
        .order_by(_TARGETS.c.wave, _TARGETS.c.device_id)
    )
    names = tuple(result.keys())
    return [dict(zip(names, row, strict=True)) for row in result.all()]


_UPDATE_TARGET = (
    update(_TARGETS)
    .where(_TARGETS.c.rollout_id == bindparam("b_rollout"))
    .where(_TARGETS.c.device_id == bindparam("b_device"))
    .values(
        state=bindparam("b_state"),
        handed_out_at=bindparam("b_handed_out_at"),
        staged_at=bindparam("b_staged_at"),
        outcome_at=bindparam("b_outcome_at"),
        detail=bindparam("b_detail"),
        generation=bindparam("b_generation"),
    )
)


def write_targets(
    connection: Any,
    rollout_id: int,
    before: Mapping[str, Mapping[str, Any]],
    changed: Sequence[Target],
    details: Mapping[str, str] | None = None,
) -> bool:
    """Write the planner's changed targets; returns whether the fleet's documents must be
    composed again (a device's version changed, or it was handed out anew).

    A device handed out anew has its generation cleared (the compose records what it
    got); a failed device put back to pending (retry) keeps its generation, and with it
    the new version, until it is handed out again as a new generation."""
    params = []
    recompose = False
    for target in changed:
        old = before[target.device_id]
        generation = old["generation"]
        anew = (
            target.state in HANDED_OUT_STATES
            and target.state != old["state"]
            and (old["state"] == "pending" or mode_of(old["state"], 0) != mode_of(target.state, 0))
        )
        if anew:
            generation = None
        if anew or mode_of(old["state"], old["generation"]) != mode_of(target.state, generation):
            recompose = True
        params.append(
            {
                "b_rollout": rollout_id,
                "b_device": target.device_id,
                "b_state": target.state,
                "b_handed_out_at": from_epoch(target.handed_out_at),
                "b_staged_at": from_epoch(target.staged_at),
                "b_outcome_at": from_epoch(target.outcome_at),
                "b_detail": (
                    target.detail or (details or {}).get(target.device_id) or old["detail"] or ""
                )[:512],
                "b_generation": generation,
            }
        )
    if params:
        connection.execute(_UPDATE_TARGET, params)
    return recompose


def append_notes(old: Sequence[str], notes: Sequence[str], now: datetime) -> list[str]:
    stamp = now.strftime("%H:%M:%S")
    return [*old, *(f"{stamp} {n}" for n in notes)][-NOTES_KEPT:]


# ---------------------------------------------------------------- reads


def newest(session: Session, deployment: str) -> dict[str, Any]:
    row = (
        session.connection()
        .execute(
            sa_select(_ROLLOUTS)
            .where(_ROLLOUTS.c.deployment == deployment)
            .order_by(_ROLLOUTS.c.id.desc())
            .limit(1)
        )
        .mappings()
        .first()
    )
    if row is None:
        raise RolloutNotFound(f"deployment {deployment!r} has no rollout")
    return dict(row)


def by_id(session: Session, rollout_id: int) -> dict[str, Any]:
    row = (
        session.connection()
        .execute(sa_select(_ROLLOUTS).where(_ROLLOUTS.c.id == rollout_id))
        .mappings()
        .first()
    )
    if row is None:
        raise RolloutNotFound(f"rollout {rollout_id} not found")
    return dict(row)


def listing(
    session: Session, *, deployment: str | None, state: str | None, limit: int
) -> list[dict[str, Any]]:
    query = sa_select(_ROLLOUTS).order_by(_ROLLOUTS.c.id.desc()).limit(limit)
    if deployment is not None:
        query = query.where(_ROLLOUTS.c.deployment == deployment)
    if state is not None:
        query = query.where(_ROLLOUTS.c.state == state)
    return [dict(r) for r in session.connection().execute(query).mappings()]


def devices_page(
    session: Session, rollout_id: int, *, state: str | None, limit: int, offset: int
) -> RolloutDevicePage:
    """A page of the rollout's devices (by wave, then id), optionally in one state."""
    where = [_TARGETS.c.rollout_id == rollout_id]
    if state is not None:
        where.append(_TARGETS.c.state == state)
    connection = session.connection()
    total = connection.execute(
        sa_select(func.count()).select_from(_TARGETS).where(*where)
    ).scalar_one()
    rows = connection.execute(
        sa_select(_TARGETS)
        .where(*where)
        .order_by(_TARGETS.c.wave, _TARGETS.c.device_id)
        .limit(limit)
        .offset(offset)
    ).mappings()
    return RolloutDevicePage(
        items=[
            RolloutDevicePublic(**{k: r[k] for k in RolloutDevicePublic.model_fields}) for r in rows
        ],
        total=int(total),
        limit=limit,
        offset=offset,
    )


def view(session: Session, row: Mapping[str, Any]) -> RolloutPublic:
    """The rollout as the API shows it."""
    targets = read_targets(session.connection(), row["id"])
    planned = [target_of(t) for t in targets]
    summary = summarize(planned, len(row["waves"] or ()), cap=LIST_CAP).as_json()
    policy = policy_of(row)
    deadline = progress_deadline_at(policy, state_of(row))
    return RolloutPublic(
        id=row["id"],
        deployment=row["deployment"],
        from_version=row["from_version"],
        to_version=row["to_version"],
        state=row["state"],
        reason=row["reason"],
        wave=row["wave"],
        waves=[RolloutWave(**w) for w in summary["waves"]],
        counts=summary["counts"],
        targeted=summary["targeted"],
        staged=summary["staged"],
        policy=policy.as_json(),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        progress_deadline_at=from_epoch(deadline),
        failed_devices=[FailedDevice(**d) for d in summary["failed_devices"]],
        unknown_devices=summary["unknown_devices"],
        notes=list(row["notes"] or ()),
    )


# ---------------------------------------------------------------- commands


def apply_command(
    session: Session,
    *,
    deployment: str,
    action: str,
    reason: str,
    now: datetime,
    max_config_bytes: int,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Carry out an operator's command on the deployment's newest rollout, in one write
    transaction: the rows, and, when a device's version changes (an abort's restore, a
    retry), the fleet's documents composed again. Returns the row as committed and the
    devices whose generation was bumped. Raises RolloutNotFound, RolloutRefused."""

    begin_write(session)
    try:
        row = newest(session, deployment)
        connection = session.connection()
        targets = read_targets(connection, row["id"])
        try:
            decided = command(
                policy_of(row),
                state_of(row),
                [target_of(t) for t in targets],
                action,
                now.timestamp(),
                reason,
            )
        except CommandRefused as refused:
            raise RolloutRefused(str(refused)) from None
        values = state_values(decided.rollout, now)
        values["notes"] = append_notes(row["notes"] or (), decided.notes, now)
        connection.execute(update(_ROLLOUTS).where(_ROLLOUTS.c.id == row["id"]).values(**values))
        recompose = write_targets(
            connection, row["id"], {t["device_id"]: t for t in targets}, decided.targets
        )
        if decided.abort:
            restore_deployment(connection, row, now)
            recompose = True
        bumped: tuple[str, ...] = ()
        if recompose:
            bumped = reconcile.run_in_transaction(
                session, now=now, max_config_bytes=max_config_bytes
            ).bumped
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return by_id(session, row["id"]), bumped


def restore_deployment(connection: Any, row: Mapping[str, Any], now: datetime) -> None:
    """An abort: the deployment goes back to the rollout's previous spec (a new version)
    or, if the deployment was new, away; the compose that follows gives every touched
    device its previous document as a new generation."""
    table = _DEPLOYMENTS
    name = row["deployment"]
    current = connection.execute(sa_select(table.c.version).where(table.c.name == name)).scalar()
    if current is None:
        return
    if row["from_spec"] is None:
        connection.execute(delete(table).where(table.c.name == name))
        return
    connection.execute(
        update(table)
        .where(table.c.name == name)
        .values(spec=dict(row["from_spec"]), version=current + 1, updated_at=now)
    )
