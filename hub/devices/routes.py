"""``/devices`` and ``/fleet``: the device resource over HTTP.

``/devices``: register, list, read, delete devices and set one device's desired
state. ``/fleet``: bulk desired changes by label selector, and fleet-wide counts.

Rules:
- Domain errors from :mod:`hub.devices.store` become HTTP errors here and only here:
  DeviceNotFound -> 404, DeviceExists/DeviceDecommissioned/DeviceActive/
  CutOffPending -> 409, ConfigTooLarge -> 413, UnknownBundles -> 422 (a config
  naming a bundle the store does not hold).
- ``DELETE`` decommissions: certificates revoked, the broker asked to close the
  device's connections, the row kept (``state: decommissioned``) so an operator
  sees it; ``DELETE ?purge=true`` forgets a decommissioned device.
- Every desired change (one device, a selector, decommission, purge) goes through
  the desired-state service (:mod:`hub.devices.desired`), which commits it and then
  signals delivery; no route touches the MQTT link. A change is accepted once
  committed, whether or not the broker is up (the DB is the truth, the sweep
  delivers it).
- Reads answer from plain rows (``hub.devices.views``), not ORM objects and models:
  they are the hot path under load; ``response_model`` still documents them.
- Handlers are sync: FastAPI runs them in its threadpool (the service's signal is
  thread-safe).
- A bulk change is one transaction; every targeted device's generation grows
  by exactly 1 (ConfigTooLarge -> 413, nothing written).
- Reading needs any token (``viewer``); setting desired state (one device or by
  selector) needs ``operator``; registering and deleting devices and lifting a
  device's update locks (``POST /devices/{id}/lock-override``) need ``admin``.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from pydantic import StringConstraints

from hub.api.deps import ContextDep, DesiredDep, NowDep, SessionDep, SettingsDep
from hub.api.problems import responses
from hub.api.route import HubRoute
from hub.auth.guard import require
from hub.auth.models import Role
from hub.db import begin_write
from hub.deployments.errors import InvalidSpec
from hub.deployments.selectors import MAX_SELECTOR_CHARS, SelectorError, parse_selector
from hub.devices import store, views
from hub.devices.errors import (
    ConfigTooLarge,
    CutOffPending,
    DeviceActive,
    DeviceDecommissioned,
    DeviceExists,
    DeviceNotFound,
    UnknownBundles,
)
from hub.devices.labels import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS
from hub.devices.models import (
    DEVICE_ID_SCHEMA_PATTERN,
    DesiredUpdate,
    DeviceBatchCreate,
    DeviceBatchResult,
    DeviceCreate,
    DeviceGeneration,
    DevicePage,
    DevicePublic,
    DeviceState,
    FleetDesiredResult,
    FleetDesiredUpdate,
    FleetSummary,
    LabelsPatch,
    LabelsUpdate,
    LockOverrideCreate,
)
from hub.settings import API_MAX_OFFSET, API_MAX_PAGE_SIZE

router = APIRouter(prefix="/devices", tags=["devices"], route_class=HubRoute)
fleet_router = APIRouter(prefix="/fleet", tags=["fleet"], route_class=HubRoute)
LABEL_FILTER_PATTERN = f"{LABEL_KEY_PATTERN[:-1]}={LABEL_VALUE_PATTERN[1:]}"

DeviceIdPath = Annotated[
    str, Path(description="device id", max_length=64, pattern=DEVICE_ID_SCHEMA_PATTERN)
]


def parse_label_filters(values: list[str]) -> dict[str, str]:
    """Pure: ``["site=lab", "role=gw"]`` -> ``{"site": "lab", "role": "gw"}``; raises ValueError."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or re.fullmatch(LABEL_KEY_PATTERN, key) is None:
            raise ValueError(f"label filter {item[:80]!r} must be KEY=VALUE with a valid key")
        if re.fullmatch(LABEL_VALUE_PATTERN, value) is None:
            raise ValueError(f"label filter {item[:80]!r} has an invalid value")
        out[key] = value
    return out


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DevicePublic,
    dependencies=[Depends(require(Role.admin))],
    responses=responses(403, 409),
)
def register_device(
    body: DeviceCreate, session: SessionDep, desired: DesiredDep, now: NowDep
) -> DevicePublic:
    try:
        row = store.register_device(session, device_id=body.id, labels=body.labels, now=now)
    except (DeviceExists, DeviceDecommissioned) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    desired.devices_registered()
    return DevicePublic.from_row(row)


@router.post(
    "/batch",
    response_model=DeviceBatchResult,
    dependencies=[Depends(require(Role.admin))],
    responses=responses(403),
)
def register_devices(
    body: DeviceBatchCreate, session: SessionDep, desired: DesiredDep, now: NowDep
) -> DeviceBatchResult:
    """Register many devices at once (fleet provisioning, the simulator); idempotent."""
    created, existing = store.register_devices(
        session, devices=[(d.id, d.labels) for d in body.devices], now=now
    )
    if created:
        desired.devices_registered()
    return DeviceBatchResult(created=created, existing=existing)


@router.get("", response_model=DevicePage, responses=responses(422))
def list_devices(
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=1, le=API_MAX_PAGE_SIZE, description="page size")] = None,
    offset: Annotated[int, Query(ge=0, le=API_MAX_OFFSET)] = 0,
    label: Annotated[
        list[Annotated[str, StringConstraints(pattern=LABEL_FILTER_PATTERN)]],
        Query(description="KEY=VALUE; repeat to AND"),
    ] = [],  # noqa: B006
    state: Annotated[DeviceState | None, Query(description="only devices in this state")] = None,
    selector: Annotated[
        str | None,
        Query(
            max_length=MAX_SELECTOR_CHARS,
            description="a label selector: env=prod,region in (eu,us),!legacy",
        ),
    ] = None,
) -> Response:
    page = settings.page_size_default if limit is None else limit
    if page > settings.page_size_max:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"limit {page} exceeds the maximum page size {settings.page_size_max}",
        )
    try:
        labels = parse_label_filters(label)
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    try:
        parsed = parse_selector(selector) if selector else None
    except SelectorError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    rows, total = store.device_page(
        session,
        limit=page,
        offset=offset,
        labels=labels,
        state=state,
        matches=parsed.matches if parsed is not None else None,
    )
    return views.device_page(rows, total=total, limit=page, offset=offset)


@router.get("/{device_id}", response_model=DevicePublic, responses=responses(404))
def get_device(device_id: DeviceIdPath, session: SessionDep) -> Response:
    try:
        return views.json_response(views.device(store.device_row(session, device_id=device_id)))
    except DeviceNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require(Role.admin))],
    responses=responses(403, 404, 409),
)
def delete_device(
    device_id: DeviceIdPath,
    context: ContextDep,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
    purge: Annotated[
        bool, Query(description="forget a decommissioned device (its row) instead")
    ] = False,
) -> Response:
    """Decommission: the device's certificates are revoked, its live connections closed by
    the broker, its desired document cleared; it stays listed as ``decommissioned``.
    Again: asks the broker again. ``purge=true``: forget a decommissioned device, once the
    broker confirmed it cut the device off."""
    try:
        if purge:
            desired.purge(session, device_id=device_id, now=now)
        else:
            desired.decommission(session, ca=context.ca, device_id=device_id, now=now)
    except DeviceNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except (DeviceActive, CutOffPending) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _relabel(
    session: SessionDep, desired: DesiredDep, now: NowDep, device_id: str, labels: dict[str, str]
) -> Response:
    # The device's deployments follow its labels in the same transaction.
    try:
        desired.reconcile_fleet(session, now=now, labels={device_id: labels})
    except InvalidSpec as exc:  # a stored deployment no longer valid: the operator's to fix
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return views.json_response(views.device(store.device_row(session, device_id=device_id)))


def _labels_of(session: SessionDep, device_id: str) -> dict[str, str]:
    """The device's labels, read inside the relabel's write transaction: a snapshot read
    first could not be upgraded to a write once a device report committed meanwhile
    ("database is locked"), and a patch applied to it could undo a concurrent one."""
    session.rollback()  # whatever the request read so far (its token): not a write
    begin_write(session)
    try:
        row = store.device_row(session, device_id=device_id)
    except DeviceNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    if row["decommissioned_at"] is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"device {device_id!r} is decommissioned")
    return dict(row["labels"] or {})


@router.put(
    "/{device_id}/labels",
    response_model=DevicePublic,
    responses=responses(403, 404, 409),
    dependencies=[Depends(require(Role.operator))],
)
def put_labels(
    device_id: DeviceIdPath,
    body: LabelsUpdate,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
) -> Response:
    """Replace the device's labels; deployments that now select it (or no longer do)
    change its document at once."""
    _labels_of(session, device_id)
    return _relabel(session, desired, now, device_id, dict(body.labels))


@router.patch(
    "/{device_id}/labels",
    response_model=DevicePublic,
    responses=responses(403, 404, 409, 422),
    dependencies=[Depends(require(Role.operator))],
)
def patch_labels(
    device_id: DeviceIdPath,
    body: LabelsPatch,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
) -> Response:
    """RFC 7386 merge patch of the labels: ``{"site": "b", "legacy": null}`` sets one and
    removes the other."""
    labels = _labels_of(session, device_id)
    for key, value in body.items():
        if value is None:
            labels.pop(key, None)
        else:
            labels[key] = value
    if len(labels) > MAX_LABELS:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"a device has at most {MAX_LABELS} labels"
        )
    return _relabel(session, desired, now, device_id, labels)


@router.put(
    "/{device_id}/desired",
    response_model=DevicePublic,
    responses=responses(403, 404, 409, 413),
    dependencies=[Depends(require(Role.operator))],
)
def set_desired(
    *,
    device_id: DeviceIdPath,
    body: DesiredUpdate,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
) -> DevicePublic:
    """Replace the device's whole desired config; its desired_generation grows by 1."""
    try:
        row = desired.set_device(session, device_id=device_id, config=body.config, now=now)
    except DeviceNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except DeviceDecommissioned as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except ConfigTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except UnknownBundles as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return DevicePublic.from_row(row)


@router.post(
    "/{device_id}/lock-override",
    response_model=DevicePublic,
    responses=responses(403, 404, 409, 413),
    dependencies=[Depends(require(Role.admin))],
)
def override_locks(
    *,
    device_id: DeviceIdPath,
    body: LockOverrideCreate,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
) -> DevicePublic:
    """Lift the device's update locks (the workloads named, or all) for ``duration_s``:
    a signed ``lock_override`` in its desired document, as a new generation."""
    try:
        row = desired.override_locks(
            session,
            device_id=device_id,
            workloads=body.workloads,
            until=now + timedelta(seconds=body.duration_s),
            now=now,
        )
    except DeviceNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except DeviceDecommissioned as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except ConfigTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    return DevicePublic.from_row(row)


# -- /fleet ------------------------------------------------------------------------------


@fleet_router.put(
    "/desired",
    response_model=FleetDesiredResult,
    responses=responses(403, 413),
    dependencies=[Depends(require(Role.operator))],
)
def set_fleet_desired(
    body: FleetDesiredUpdate,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
) -> FleetDesiredResult:
    """Set the same desired config on every device matching the selector (all if omitted)."""
    labels = body.selector.labels if body.selector is not None else None
    try:
        updated = desired.set_selector(session, labels=labels, config=body.config, now=now)
    except ConfigTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except UnknownBundles as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return FleetDesiredResult(
        updated=len(updated),
        devices=[DeviceGeneration(id=i, generation=g) for i, g in updated],
    )


@fleet_router.get("/summary", response_model=FleetSummary)
def fleet_summary(session: SessionDep) -> FleetSummary:
    s = store.fleet_summary(session)
    return FleetSummary(
        total=s.total,
        online=s.online,
        in_sync=s.in_sync,
        out_of_sync=s.out_of_sync,
        failed=s.failed,
        by_generation=s.by_generation,
        decommissioned=s.decommissioned,
    )
