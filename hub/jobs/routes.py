"""``/jobs``: one-shot commands for a device or a selector's devices (``docs/jobs.md``).

Rules:
- ``POST /jobs`` stores the job and one row per targeted device (queued) and
  answers 201 with the job; handing it out is the jobs controller's, which the
  commit wakes (:meth:`DesiredState.jobs_queued`).
- ``POST /jobs/{id}/cancel`` goes through the desired-state service: devices that
  were handed the job and did not start it lose it from their documents in the
  same transaction.
- Domain errors become HTTP here: JobNotFound and DeviceNotFound -> 404, JobExists,
  JobFinished and DeviceDecommissioned -> 409, InvalidJob -> 422 (a bad body is
  422 from its model).
- Reading needs any token; creating and canceling need ``operator``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query, status

from hub.api.deps import DesiredDep, NowDep, SessionDep
from hub.api.problems import responses
from hub.api.route import HubRoute
from hub.auth.guard import require
from hub.auth.models import Role
from hub.devices.errors import DeviceDecommissioned, DeviceNotFound
from hub.jobs import store
from hub.jobs.errors import InvalidJob, JobExists, JobFinished, JobNotFound
from hub.jobs.models import (
    JOB_ID_PATTERN,
    JobCancel,
    JobCreate,
    JobList,
    JobPublic,
    JobState,
)

router = APIRouter(prefix="/jobs", tags=["jobs"], route_class=HubRoute)

JobIdPath = Annotated[str, Path(description="job id", max_length=64, pattern=JOB_ID_PATTERN)]


@router.post(
    "",
    response_model=JobPublic,
    status_code=status.HTTP_201_CREATED,
    responses=responses(403, 404, 409, 422),
    dependencies=[Depends(require(Role.operator))],
)
def create_job(body: JobCreate, session: SessionDep, desired: DesiredDep, now: NowDep) -> JobPublic:
    """Queue a command for ``device_id`` or every active device ``selector`` matches."""
    try:
        job_id = store.create(session, body=body, now=now)
    except DeviceNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except (JobExists, DeviceDecommissioned) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    except InvalidJob as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    desired.jobs_queued()
    return store.get_job(session, job_id=job_id)


@router.get("", response_model=JobList, responses=responses(422))
def list_jobs(
    session: SessionDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    device_id: Annotated[
        str | None, Query(max_length=64, description="only jobs that target this device")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="at most this many")] = 100,
) -> JobList:
    """Jobs, newest first, with their counts per device state."""
    return JobList(items=store.list_jobs(session, state=state, device_id=device_id, limit=limit))


@router.get("/{job_id}", response_model=JobPublic, responses=responses(404))
def get_job(job_id: JobIdPath, session: SessionDep) -> JobPublic:
    """One job with each device's state and result."""
    try:
        return store.get_job(session, job_id=job_id)
    except JobNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses=responses(403, 404, 409),
    dependencies=[Depends(require(Role.operator))],
)
def cancel_job(
    job_id: JobIdPath,
    session: SessionDep,
    desired: DesiredDep,
    now: NowDep,
    body: Annotated[JobCancel | None, Body()] = None,
) -> JobPublic:
    """Cancel: queued devices never get it; devices that started it finish it."""
    try:
        desired.cancel_job(
            session, job_id=job_id, reason=body.reason if body is not None else "", now=now
        )
    except JobNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except JobFinished as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return store.get_job(session, job_id=job_id)
