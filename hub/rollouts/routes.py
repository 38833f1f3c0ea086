"""``/deployments/{name}/rollout`` and ``/rollouts``: rollouts over HTTP.

Rules:
- A rollout is created by a deployment change (``PUT /deployments/{name}`` with a
  ``rollout`` policy), never here; here it is read and steered: pause, resume,
  abort, promote, retry-failed. Each command is one write transaction
  (:func:`hub.rollouts.store.apply_command`); the rollout controller, woken by the
  commit, carries it out (hands out, restores).
- Domain errors become HTTP here: RolloutNotFound -> 404, RolloutRefused -> 409.
- Reading needs any token; commands need ``operator``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, status

from hub.api.deps import DesiredDep, NowDep, SessionDep
from hub.api.problems import responses
from hub.api.route import HubRoute
from hub.auth.guard import require
from hub.auth.models import Role
from hub.controllers.rollout.plan import DEVICE_STATES, ROLLOUT_STATES
from hub.deployments.models import DEPLOYMENT_NAME_PATTERN
from hub.rollouts import store
from hub.rollouts.errors import RolloutNotFound, RolloutRefused
from hub.rollouts.models import (
    RolloutAction,
    RolloutCommand,
    RolloutDevicePage,
    RolloutList,
    RolloutPublic,
)
from hub.settings import API_MAX_OFFSET, API_MAX_PAGE_SIZE

router = APIRouter(prefix="/deployments", tags=["rollouts"], route_class=HubRoute)
list_router = APIRouter(prefix="/rollouts", tags=["rollouts"], route_class=HubRoute)
NamePath = Annotated[
    str, Path(description="deployment name", max_length=63, pattern=DEPLOYMENT_NAME_PATTERN)
]
StateQuery = Annotated[
    str | None,
    Query(pattern="^(" + "|".join(ROLLOUT_STATES) + ")$", description="only this state"),
]


def _not_found(error: RolloutNotFound) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, str(error))


@router.get("/{name}/rollout", response_model=RolloutPublic, responses=responses(404))
def get_rollout(name: NamePath, session: SessionDep) -> RolloutPublic:
    """The deployment's newest rollout, with its progress."""
    try:
        return store.view(session, store.newest(session, name))
    except RolloutNotFound as error:
        raise _not_found(error) from None


@router.post(
    "/{name}/rollout/{action}",
    response_model=RolloutPublic,
    responses=responses(403, 404, 409),
    dependencies=[Depends(require(Role.operator))],
)
def command_rollout(
    name: NamePath,
    action: Annotated[RolloutAction, Path(description="what to do")],
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
    body: Annotated[RolloutCommand | None, Body()] = None,
) -> RolloutPublic:
    """Pause, resume, abort (restore the previous version), promote (end a pause that
    waits for it), or retry the failed devices."""
    try:
        row = desired.rollout_command(
            session,
            deployment=name,
            action=action,
            reason=body.reason if body is not None else "",
            now=now,
        )
    except RolloutNotFound as error:
        raise _not_found(error) from None
    except RolloutRefused as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return store.view(session, row)


@list_router.get("", response_model=RolloutList)
def list_rollouts(
    session: SessionDep,
    deployment: Annotated[str | None, Query(max_length=63, pattern=DEPLOYMENT_NAME_PATTERN)] = None,
    state: StateQuery = None,
    limit: Annotated[int, Query(ge=1, le=API_MAX_PAGE_SIZE)] = 50,
) -> RolloutList:
    """Rollouts, newest first."""
    rows = store.listing(session, deployment=deployment, state=state, limit=limit)
    return RolloutList(items=[store.view(session, row) for row in rows])


@list_router.get("/{rollout_id}", response_model=RolloutPublic, responses=responses(404))
def get_rollout_by_id(
    rollout_id: Annotated[int, Path(ge=1, le=2**62)], session: SessionDep
) -> RolloutPublic:
    try:
        return store.view(session, store.by_id(session, rollout_id))
    except RolloutNotFound as error:
        raise _not_found(error) from None


@list_router.get(
    "/{rollout_id}/devices", response_model=RolloutDevicePage, responses=responses(404)
)
def rollout_devices(
    rollout_id: Annotated[int, Path(ge=1, le=2**62)],
    session: SessionDep,
    state: Annotated[
        str | None,
        Query(pattern="^(" + "|".join(DEVICE_STATES) + ")$", description="only this state"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=API_MAX_PAGE_SIZE)] = 100,
    offset: Annotated[int, Query(ge=0, le=API_MAX_OFFSET)] = 0,
) -> RolloutDevicePage:
    """The rollout's devices, where each stands (``waiting_window``: waiting for its
    maintenance window, with the new version downloaded). Under ``/rollouts/{id}``, not
    ``/deployments/{name}/rollout/…``, where ``{action}`` names the commands."""
    try:
        store.by_id(session, rollout_id)
    except RolloutNotFound as error:
        raise _not_found(error) from None
    return store.devices_page(session, rollout_id, state=state, limit=limit, offset=offset)
