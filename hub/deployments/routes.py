"""``/deployments`` and ``/devices/{id}/events``: deployments over HTTP.

Rules:
- ``PUT /deployments/{name}`` creates or updates; ``?dry_run=true`` answers the
  same body (the deployment as it would be, and the per-device preview) and writes
  nothing. Both run the one code path, :meth:`DesiredState.reconcile_fleet`, so the
  preview is what the change does. ``DELETE`` likewise.
- A changed deployment reaches devices in the same transaction that stores it (their
  generations bumped, delivery signalled); devices that come later, failover and
  timers are the placement controller's.
- Domain errors become HTTP here: DeploymentNotFound -> 404, InvalidSpec and
  UnknownBundles -> 422.
- Reading needs any token; changing needs ``operator``.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, status
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, func, select

from hub.api.deps import DesiredDep, NowDep, SessionDep, SettingsDep
from hub.api.problems import responses
from hub.api.route import HubRoute
from hub.auth.guard import require
from hub.auth.models import Role
from hub.deployments.errors import DeploymentNotFound, InvalidSpec
from hub.deployments.models import (
    DEPLOYMENT_NAME_PATTERN,
    Deployment,
    DeploymentChange,
    DeploymentInstance,
    DeploymentPage,
    DeploymentPublic,
    DeploymentPut,
    DeploymentRemoval,
    DeploymentStatus,
    DeviceEvent,
    DeviceEventPage,
    DeviceEventPublic,
    Preview,
    PreviewDevice,
    PreviewSummary,
    PreviewUnplaceable,
    Unplaced,
)
from hub.deployments.reconcile import Outcome
from hub.devices.errors import DeviceNotFound, UnknownBundles
from hub.devices.models import Device
from hub.devices.routes import DeviceIdPath
from hub.settings import API_MAX_OFFSET, API_MAX_PAGE_SIZE

router = APIRouter(prefix="/deployments", tags=["deployments"], route_class=HubRoute)
events_router = APIRouter(prefix="/devices", tags=["devices"], route_class=HubRoute)

NamePath = Annotated[
    str, Path(description="deployment name", max_length=63, pattern=DEPLOYMENT_NAME_PATTERN)
]
DryRun = Annotated[bool, Query(description="show what would change; change nothing")]
Limit = Annotated[int | None, Query(ge=1, le=API_MAX_PAGE_SIZE, description="page size")]
Offset = Annotated[int, Query(ge=0, le=API_MAX_OFFSET)]


def _preview(outcome: Outcome, *, only: str | None = None) -> Preview:
    """The per-device diff of a run; unplaceable devices of ``only`` (or of all)."""
    devices = [
        PreviewDevice(
            device_id=c.device_id,
            generation_bump=True,
            added=list(c.diff.added),
            removed=list(c.diff.removed),
            changed=list(c.diff.changed),
            before=c.diff.before,
            after=c.diff.after,
            contributions=c.contributions,
            ties=list(c.ties),
        )
        for c in outcome.changed
    ]
    unplaceable = sorted(
        {
            (device_id, reasons)
            for name, by_device in outcome.unplaceable.items()
            if only is None or name == only
            for device_id, reasons in by_device.items()
        }
    )
    return Preview(
        devices=devices,
        unplaceable=[PreviewUnplaceable(device_id=d, reasons=list(r)) for d, r in unplaceable],
        summary=PreviewSummary(
            changed=len(devices), unchanged=outcome.unchanged, unplaceable=len(unplaceable)
        ),
    )


def _status(session: Session, name: str) -> DeploymentStatus:
    table = Device.__table__  # type: ignore[attr-defined]
    devices = (
        session.connection()
        .execute(
            sa_select(
                table.c.id,
                table.c.assignments,
                table.c.online,
                table.c.desired_generation,
                table.c.reported_generation,
                table.c.failed_generation,
            ).where(table.c.decommissioned_at.is_(None))
        )
        .all()
    )
    unplaced = session.exec(select(Unplaced).where(Unplaced.deployment == name)).all()
    placed = [d for d in devices if name in (d[1] or ())]
    reasons: Counter[str] = Counter(r for u in unplaced for r in u.reasons)
    instances = session.exec(
        select(DeploymentInstance)
        .where(DeploymentInstance.deployment == name)
        .order_by(col(DeploymentInstance.idx))
    ).all()
    return DeploymentStatus(
        targeted=len(placed) + len(unplaced),
        placed=len(placed),
        unplaceable=len(unplaced),
        in_sync=sum(1 for d in placed if d[4] >= d[3]),
        failed=sum(1 for d in placed if d[5] >= d[3] > d[4]),
        offline=sum(1 for d in placed if not d[2]),
        reasons=dict(reasons.most_common()),
        instances=[
            {
                "index": i.idx,
                "device_id": i.device_id,
                "placed_at": i.placed_at,
                "original_device_id": i.original_device_id,
                "attempts": i.attempts,
                "next_attempt_at": i.next_attempt_at,
                "reason": i.reason,
                "history": i.history,
            }
            for i in instances
        ],
    )


def _public(row: Deployment, status_: DeploymentStatus | None = None) -> DeploymentPublic:
    return DeploymentPublic(
        name=row.name,
        spec=row.spec,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        status=status_,
    )


def _get(session: Session, name: str) -> Deployment:
    row = session.get(Deployment, name)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(DeploymentNotFound(name)))
    return row


@router.get("", response_model=DeploymentPage)
def list_deployments(
    session: SessionDep, settings: SettingsDep, limit: Limit = None, offset: Offset = 0
) -> DeploymentPage:
    page = min(settings.page_size_default if limit is None else limit, settings.page_size_max)
    total = session.exec(select(func.count()).select_from(Deployment)).one()
    rows = session.exec(
        select(Deployment).order_by(col(Deployment.name)).limit(page).offset(offset)
    ).all()
    return DeploymentPage(
        items=[_public(r) for r in rows], total=int(total), limit=page, offset=offset
    )


@router.get("/{name}", response_model=DeploymentPublic, responses=responses(404))
def get_deployment(name: NamePath, session: SessionDep) -> DeploymentPublic:
    row = _get(session, name)
    return _public(row, _status(session, name))


@router.get("/{name}/status", response_model=DeploymentStatus, responses=responses(404))
def deployment_status(name: NamePath, session: SessionDep) -> DeploymentStatus:
    _get(session, name)  # 404 for an unknown name
    return _status(session, name)


@router.put(
    "/{name}",
    response_model=DeploymentChange,
    responses=responses(403, 422),
    dependencies=[Depends(require(Role.operator))],
)
def put_deployment(
    name: NamePath,
    body: DeploymentPut,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
    dry_run: DryRun = False,
) -> DeploymentChange:
    """Create or update; what changes on which device is in ``preview``."""
    spec = body.spec.model_dump(mode="json", exclude_none=True)
    existed = session.get(Deployment, name)
    before = (existed.spec, existed.version, existed.created_at) if existed else None
    session.rollback()
    try:
        outcome = desired.reconcile_fleet(session, now=now, put={name: spec}, dry_run=dry_run)
    except (InvalidSpec, UnknownBundles) as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    if dry_run:
        version = 1 if before is None else before[1] + (0 if before[0] == spec else 1)
        shown = Deployment(
            name=name,
            spec=spec,
            version=version,
            created_at=before[2] if before else now,
            updated_at=now,
        )
    else:
        shown = _get(session, name)
    return DeploymentChange(
        deployment=_public(shown), preview=_preview(outcome, only=name), dry_run=dry_run
    )


@router.delete(
    "/{name}",
    response_model=DeploymentRemoval,
    responses=responses(403, 404),
    dependencies=[Depends(require(Role.operator))],
)
def delete_deployment(
    name: NamePath,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
    dry_run: DryRun = False,
) -> DeploymentRemoval:
    """Remove the deployment: its workloads leave every device it contributed to."""
    try:
        outcome = desired.reconcile_fleet(session, now=now, remove=[name], dry_run=dry_run)
    except DeploymentNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except InvalidSpec as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return DeploymentRemoval(preview=_preview(outcome, only=name), dry_run=dry_run)


@events_router.get("/{device_id}/events", response_model=DeviceEventPage, responses=responses(404))
def device_events(
    device_id: DeviceIdPath,
    session: SessionDep,
    settings: SettingsDep,
    limit: Limit = None,
    offset: Offset = 0,
) -> DeviceEventPage:
    """The device's orchestration history, newest first: placed, moved, unplaced,
    applied, failed."""
    if session.get(Device, device_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(DeviceNotFound(device_id)))
    page = min(settings.page_size_default if limit is None else limit, settings.page_size_max)
    where = DeviceEvent.device_id == device_id
    total = session.exec(select(func.count()).select_from(DeviceEvent).where(where)).one()
    rows = session.exec(
        select(DeviceEvent)
        .where(where)
        .order_by(col(DeviceEvent.id).desc())
        .limit(page)
        .offset(offset)
    ).all()
    return DeviceEventPage(
        items=[
            DeviceEventPublic(
                at=r.at,
                kind=r.kind,  # type: ignore[arg-type]
                deployment=r.deployment,
                generation=r.generation,
                detail=r.detail,
            )
            for r in rows
        ],
        total=int(total),
        limit=page,
        offset=offset,
    )
