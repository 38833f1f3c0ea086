"""``/windows``: maintenance windows over HTTP.

Rules:
- ``PUT /windows/{name}`` creates or replaces a window (``{cron, duration_s,
  timezone}``); ``GET /windows`` lists them, ``GET /windows/{name}`` shows one with,
  for a ``label:`` window, the zones its devices are in and the devices that fell
  back to UTC. ``open_now``/``closes_at``/``next_open`` are read in UTC at the
  request's "now" (the hub's clock).
- Domain errors become HTTP here: WindowNotFound -> 404, InvalidWindow -> 422,
  WindowInUse -> 409 (a rollout that has not finished names it).
- Reading needs any token; changing needs ``operator``. The scheduler
  (:mod:`hub.controllers.schedules`) notices a changed table by itself.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status
from sqlmodel import Session

from hub.api.deps import NowDep, SessionDep
from hub.api.problems import responses
from hub.api.route import HubRoute
from hub.auth.guard import require
from hub.auth.models import Role
from hub.schedules import store
from hub.schedules.errors import InvalidWindow, WindowInUse, WindowNotFound
from hub.schedules.models import (
    WINDOW_NAME_PATTERN,
    Schedule,
    UnzonedDevice,
    WindowPage,
    WindowPublic,
    WindowPut,
    WindowZone,
)
from hub.schedules.window import (
    UTC_ZONE,
    Window,
    is_open,
    next_change,
    next_open,
    resolve_zone,
)

router = APIRouter(prefix="/windows", tags=["windows"], route_class=HubRoute)

NamePath = Annotated[
    str, Path(description="window name", max_length=63, pattern=WINDOW_NAME_PATTERN)
]
_UNZONED_SHOWN = 100


def _parsed(row: Schedule) -> Window:
    try:
        return store.window_of(row)
    except InvalidWindow as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None


def _public(row: Schedule, window: Window, now: datetime) -> WindowPublic:
    open_now = is_open(window, UTC_ZONE, now)
    return WindowPublic(
        name=row.name,
        cron=row.cron,
        duration_s=row.duration_s,
        timezone=row.timezone,
        created_at=row.created_at,
        updated_at=row.updated_at,
        open_now=open_now,
        closes_at=next_change(window, UTC_ZONE, now) if open_now else None,
        next_open=next_open(window, UTC_ZONE, now),
    )


def _with_zones(session: Session, view: WindowPublic, window: Window, now: datetime) -> None:
    counts: Counter[str] = Counter()
    unzoned: list[UnzonedDevice] = []
    for device_id, labels in sorted(store.device_labels(session).items()):
        choice = resolve_zone(window, labels)
        counts[choice.zone] += 1
        if choice.fallback is not None:
            unzoned.append(UnzonedDevice(device_id=device_id, reason=choice.fallback))
    view.zones = [
        WindowZone(
            zone=zone,
            devices=n,
            open_now=is_open(window, zone, now),
            next_change=next_change(window, zone, now),
            next_open=next_open(window, zone, now),
        )
        for zone, n in sorted(counts.items())
    ]
    view.unzoned_devices = len(unzoned)
    view.unzoned = unzoned[:_UNZONED_SHOWN]


@router.get("", response_model=WindowPage)
def list_windows(session: SessionDep, now: NowDep) -> WindowPage:
    return WindowPage(
        items=[_public(row, _parsed(row), now) for row in store.list_windows(session)]
    )


@router.get("/{name}", response_model=WindowPublic, responses=responses(404))
def get_window(name: NamePath, session: SessionDep, now: NowDep) -> WindowPublic:
    try:
        row = store.get_window(session, name)
    except WindowNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    window = _parsed(row)
    view = _public(row, window, now)
    if window.label_key is not None:
        _with_zones(session, view, window, now)
    return view


@router.put(
    "/{name}",
    response_model=WindowPublic,
    responses=responses(403, 422),
    dependencies=[Depends(require(Role.operator))],
)
def put_window(name: NamePath, body: WindowPut, session: SessionDep, now: NowDep) -> WindowPublic:
    """Create or replace the window."""
    try:
        row = store.put_window(
            session,
            name=name,
            cron=body.cron,
            duration_s=body.duration_s,
            timezone=body.timezone,
            now=now,
        )
    except InvalidWindow as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return _public(row, _parsed(row), now)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=responses(403, 404, 409),
    dependencies=[Depends(require(Role.operator))],
)
def delete_window(name: NamePath, session: SessionDep) -> None:
    """Remove the window; refused (409) while a rollout that has not finished names it."""
    try:
        store.delete_window(session, name=name)
    except WindowNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except WindowInUse as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
