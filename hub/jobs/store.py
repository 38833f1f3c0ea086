"""Jobs: data access (keyword-only, raising :mod:`hub.jobs.errors`).

Rules:
- :func:`create` resolves the job's target (one device, or every active device a
  selector matches, read under the write lock) to ``job_device`` rows in the same
  transaction that stores the job. Every row of a job takes the same ``seq``, one
  more than any before it, so each device's jobs are ordered as they were created.
- Nothing here hands a job out: that is the jobs controller's
  (``hub/controllers/jobs/``), which commits its decisions with :func:`commit_step`.
- :func:`cancel`: queued rows (handed out or not) become ``canceled``; rows the
  device already started stay and get their results. A job canceled twice, or
  after it finished, is refused (JobFinished).
- :func:`refresh_documents` changes only the ``jobs`` member of a device's
  document and bumps its generation only when a job must reach the device (a new
  hand-out) or leave it before it starts (a canceled one); finished jobs leave at
  the next composition of the document (``hub/jobs/entries.py``), never with a
  generation of their own.
- Views are built from plain rows; a job's device list is capped
  (:data:`MAX_DEVICES_SHOWN`) with the total alongside.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from hub.db import begin_write
from hub.deployments.merge import canonical
from hub.deployments.selectors import SelectorError, parse_selector
from hub.devices.errors import DeviceDecommissioned, DeviceNotFound
from hub.devices.models import Device
from hub.devices.store import next_desired_seq
from hub.jobs.entries import entry, job_entries, with_jobs
from hub.jobs.errors import InvalidJob, JobExists, JobFinished, JobNotFound
from hub.jobs.models import (
    MAX_ENTRY_BYTES,
    Job,
    JobCreate,
    JobDevice,
    JobDevicePublic,
    JobPublic,
)
from protocols import JOBS_KEY

MAX_DEVICES_SHOWN = 1000
JOB_FINAL = frozenset({"completed", "aborted", "canceled"})
DEVICE_STATES = ("queued", "in_progress", "succeeded", "failed", "timed_out", "canceled", "expired")
_JOBS: Table = Job.__table__  # type: ignore[attr-defined]
_ROWS: Table = JobDevice.__table__  # type: ignore[attr-defined]
_DEVICES: Table = Device.__table__  # type: ignore[attr-defined]


# ---------------------------------------------------------------- create, cancel


def create(session: Session, *, body: JobCreate, now: datetime) -> str:
    """Store the job and its rows (module rules); returns its id.

    Raises JobExists, DeviceNotFound, DeviceDecommissioned or InvalidJob (a bad
    selector, one that matches no active device, an entry over the size limit);
    nothing is written then.
    """
    job_id = body.id or f"job-{secrets.token_hex(6)}"
    expires_at = now + timedelta(seconds=body.expires_in_s)
    rollout = body.rollout.model_dump(mode="json", exclude_none=True) if body.rollout else {}
    values = {
        "id": job_id,
        "command": list(body.command),
        "deadline_s": float(body.deadline_s),
        "env": dict(body.env),
        "idempotent": body.idempotent,
        "device_id": body.device_id,
        "selector": body.selector,
        "policy": rollout,
        "state": "running",
        "reason": "",
        "created_at": now,
        "expires_at": expires_at,
    }
    size = len(canonical(entry(values)))
    if size > MAX_ENTRY_BYTES:
        raise InvalidJob(f"the job's document entry is {size} bytes; at most {MAX_ENTRY_BYTES}")
    selector = None
    if body.selector is not None:
        try:
            selector = parse_selector(body.selector)
        except SelectorError as exc:
            raise InvalidJob(str(exc)) from None
    begin_write(session)
    try:
        connection = session.connection()
        if connection.execute(sa_select(_JOBS.c.id).where(_JOBS.c.id == job_id)).first():
            raise JobExists(job_id)
        if body.device_id is not None:
            found = connection.execute(
                sa_select(_DEVICES.c.decommissioned_at).where(_DEVICES.c.id == body.device_id)
            ).first()
            if found is None:
                raise DeviceNotFound(body.device_id)
            if found[0] is not None:
                raise DeviceDecommissioned(body.device_id, "it gets no jobs")
            targets = [body.device_id]
        else:
            assert selector is not None
            rows = connection.execute(
                sa_select(_DEVICES.c.id, _DEVICES.c.labels)
                .where(_DEVICES.c.decommissioned_at.is_(None))
                .order_by(_DEVICES.c.id)
            )
            targets = [i for i, labels in rows if selector.matches(labels or {})]
            if not targets:
                raise InvalidJob(f"selector {body.selector!r} matches no active device")
        seq = int(connection.execute(sa_select(func.max(_ROWS.c.seq))).scalar() or 0) + 1
        connection.execute(insert(_JOBS).values(**values))
        connection.execute(
            insert(_ROWS),
            [
                {"job_id": job_id, "device_id": d, "seq": seq, "state": "queued", "queued_at": now}
                for d in targets
            ],
        )
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return job_id


def cancel(session: Session, *, job_id: str, reason: str, now: datetime) -> list[str]:
    """Cancel the job (module rules) in the caller's write transaction, which the
    caller commits; returns the devices whose document must lose the job (it was
    handed out and not started). Raises JobNotFound or JobFinished."""
    connection = session.connection()
    found = connection.execute(sa_select(_JOBS.c.state).where(_JOBS.c.id == job_id)).first()
    if found is None:
        raise JobNotFound(job_id)
    if found[0] in JOB_FINAL:
        raise JobFinished(job_id, found[0])
    connection.execute(
        update(_JOBS)
        .where(_JOBS.c.id == job_id)
        .values(
            state="canceled",
            reason=(f"canceled: {reason}" if reason else "canceled")[:512],
            canceled_at=now,
            finished_at=now,
        )
    )
    handed = [
        d
        for (d,) in connection.execute(
            sa_select(_ROWS.c.device_id).where(
                _ROWS.c.job_id == job_id,
                _ROWS.c.state == "queued",
                _ROWS.c.handed_out_at.is_not(None),
            )
        )
    ]
    connection.execute(
        update(_ROWS)
        .where(_ROWS.c.job_id == job_id, _ROWS.c.state == "queued")
        .values(state="canceled", finished_at=now, message="job canceled")
    )
    return handed


# ---------------------------------------------------------------- documents


def refresh_documents(
    session: Session, *, device_ids: Iterable[str], now: datetime, max_config_bytes: int
) -> list[str]:
    """Bring the ``jobs`` member of these devices' documents up to date in the caller's
    write transaction (module rules); returns the devices whose generation was bumped.
    A document that would exceed ``max_config_bytes`` is left as it is."""
    wanted = sorted(set(device_ids))
    if not wanted:
        return []
    connection = session.connection()
    entries = job_entries(connection, wanted)
    finals = _final_ids(connection, wanted)
    rows = connection.execute(
        sa_select(
            _DEVICES.c.id,
            _DEVICES.c.manual_config,
            _DEVICES.c.desired_config,
            _DEVICES.c.desired_generation,
            _DEVICES.c.reported_generation,
            _DEVICES.c.failed_generation,
        ).where(_DEVICES.c.id.in_(wanted), _DEVICES.c.decommissioned_at.is_(None))
    ).mappings()
    bumped: list[dict[str, Any]] = []
    for row in rows:
        document = dict(row["desired_config"] or {})
        new = with_jobs(row["manual_config"] or {}, entries.get(row["id"])).get(JOBS_KEY)
        old = document.get(JOBS_KEY)
        if not _must_change(old, new, finals.get(row["id"], set())):
            continue
        if new is None:
            document.pop(JOBS_KEY, None)
        else:
            document[JOBS_KEY] = new
        if len(canonical(document)) > max_config_bytes:
            continue
        bumped.append(
            {
                "b_id": row["id"],
                "b_config": document,
                "b_generation": max(
                    row["desired_generation"], row["reported_generation"], row["failed_generation"]
                )
                + 1,
            }
        )
    if bumped:
        seq = next_desired_seq(session)
        for params in bumped:
            params["b_now"] = now
            params["b_seq"] = seq
        connection.execute(_UPDATE_DOCUMENT, bumped)
    return [p["b_id"] for p in bumped]


_UPDATE_DOCUMENT = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("b_id"))
    .values(
        desired_config=bindparam("b_config"),
        desired_generation=bindparam("b_generation"),
        desired_updated_at=bindparam("b_now"),
        desired_seq=bindparam("b_seq"),
    )
)


def _must_change(old: Any, new: list[Any] | None, finished: set[str]) -> bool:
    """Whether the document's jobs must change: its entries, less those that finished
    on the device (they may stay until the next composition), differ from ``new``."""
    kept = [e for e in old if not (isinstance(e, Mapping) and e.get("id") in finished)] if (
        isinstance(old, list)) else old  # fmt: skip
    if not kept and not new:
        return False
    return canonical({"j": kept}) != canonical({"j": new})


def _final_ids(connection: Any, device_ids: Sequence[str]) -> dict[str, set[str]]:
    """Per device, the jobs that finished there (succeeded, failed, timed_out, expired)."""
    out: dict[str, set[str]] = {}
    for device_id, job_id in connection.execute(
        sa_select(_ROWS.c.device_id, _ROWS.c.job_id).where(
            _ROWS.c.device_id.in_(device_ids),
            _ROWS.c.state.in_(("succeeded", "failed", "timed_out", "expired")),
        )
    ):
        out.setdefault(device_id, set()).add(job_id)
    return out


# ---------------------------------------------------------------- the controller's side


@dataclass(frozen=True, slots=True)
class ActiveJobs:
    """What the jobs controller plans from: the active jobs with all their rows, and the
    devices those rows name."""

    jobs: list[dict[str, Any]]
    rows: dict[str, list[dict[str, Any]]]  # by job id
    devices: dict[str, dict[str, Any]]  # id -> online, decommissioned_at, jobs


def read_active(session: Session) -> ActiveJobs:
    """Jobs that are running or paused or have a row still queued or in progress (one
    read transaction, ended before returning)."""
    connection = session.connection()
    open_ids = sa_select(_ROWS.c.job_id).where(_ROWS.c.state.in_(("queued", "in_progress")))
    jobs = [
        dict(r)
        for r in connection.execute(
            sa_select(_JOBS).where(
                _JOBS.c.state.in_(("running", "paused")) | _JOBS.c.id.in_(open_ids)
            )
        ).mappings()
    ]
    ids = [j["id"] for j in jobs]
    rows: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
    device_ids: set[str] = set()
    if ids:
        for r in connection.execute(
            sa_select(_ROWS).where(_ROWS.c.job_id.in_(ids)).order_by(_ROWS.c.device_id)
        ).mappings():
            rows[r["job_id"]].append(dict(r))
            device_ids.add(r["device_id"])
    devices: dict[str, dict[str, Any]] = {}
    wanted = sorted(device_ids)
    for start in range(0, len(wanted), 5000):
        for d in connection.execute(
            sa_select(
                _DEVICES.c.id, _DEVICES.c.online, _DEVICES.c.decommissioned_at, _DEVICES.c.jobs
            ).where(_DEVICES.c.id.in_(wanted[start : start + 5000]))
        ).mappings():
            devices[d["id"]] = dict(d)
    session.rollback()
    return ActiveJobs(jobs, rows, devices)


@dataclass(frozen=True, slots=True)
class RowChange:
    """One ``job_device`` row to change, if it is still as it was read (``state``, and
    whether it had been handed out)."""

    job_id: str
    device_id: str
    state_was: str
    handed_out_was: bool
    values: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class JobChange:
    """One job's new state, if it is still ``state_was``; ``finished`` sets finished_at."""

    job_id: str
    state_was: str
    state: str
    reason: str
    finished: bool


def commit_changes(
    session: Session,
    *,
    rows: Sequence[RowChange],
    jobs: Sequence[JobChange],
    documents: Sequence[str],
    now: datetime,
    max_config_bytes: int,
) -> list[str]:
    """Commit the jobs controller's decisions in one write transaction with the documents
    they change (``documents``: devices whose job entries change); returns the devices
    whose generation was bumped. A row or job changed meanwhile (an operator's cancel)
    keeps that change: each update applies only if it is still as the controller read
    it, and the next look plans again."""
    begin_write(session)
    try:
        connection = session.connection()
        touched: set[str] = set()
        for change in rows:
            done = connection.execute(
                update(_ROWS)
                .where(
                    _ROWS.c.job_id == change.job_id,
                    _ROWS.c.device_id == change.device_id,
                    _ROWS.c.state == change.state_was,
                    _ROWS.c.handed_out_at.is_not(None)
                    if change.handed_out_was
                    else _ROWS.c.handed_out_at.is_(None),
                )
                .values(**change.values)
            )
            if done.rowcount:
                touched.add(change.device_id)
        for job in jobs:
            values: dict[str, Any] = {"state": job.state, "reason": job.reason[:512]}
            if job.finished:
                values["finished_at"] = now
            connection.execute(
                update(_JOBS)
                .where(_JOBS.c.id == job.job_id, _JOBS.c.state == job.state_was)
                .values(**values)
            )
        bumped = refresh_documents(
            session,
            device_ids=[d for d in documents if d in touched],
            now=now,
            max_config_bytes=max_config_bytes,
        )
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return bumped


def counts(states: Iterable[str]) -> dict[str, int]:
    """How many rows are in each device state (every state present)."""
    listed = list(states)
    return {s: listed.count(s) for s in DEVICE_STATES}


# ---------------------------------------------------------------- views


def _public(job: Any, states: Sequence[str]) -> JobPublic:
    return JobPublic(
        id=job["id"],
        command=list(job["command"]),
        deadline_s=job["deadline_s"],
        env=dict(job["env"] or {}),
        idempotent=job["idempotent"],
        device_id=job["device_id"],
        selector=job["selector"],
        rollout=dict(job["policy"] or {}),
        state=job["state"],
        reason=job["reason"],
        created_at=job["created_at"],
        expires_at=job["expires_at"],
        canceled_at=job["canceled_at"],
        finished_at=job["finished_at"],
        targeted=len(states),
        counts=counts(states),
    )


def get_job(session: Session, *, job_id: str) -> JobPublic:
    """One job with its devices (the first :data:`MAX_DEVICES_SHOWN` by id). Raises
    JobNotFound."""
    connection = session.connection()
    job = connection.execute(sa_select(_JOBS).where(_JOBS.c.id == job_id)).mappings().first()
    if job is None:
        raise JobNotFound(job_id)
    rows = [
        dict(r)
        for r in connection.execute(
            sa_select(_ROWS).where(_ROWS.c.job_id == job_id).order_by(_ROWS.c.device_id)
        ).mappings()
    ]
    view = _public(job, [r["state"] for r in rows])
    view.devices = [
        JobDevicePublic(**{k: r[k] for k in JobDevicePublic.model_fields})
        for r in rows[:MAX_DEVICES_SHOWN]
    ]
    view.devices_total = len(rows)
    return view


def list_jobs(
    session: Session, *, state: str | None, device_id: str | None, limit: int
) -> list[JobPublic]:
    """Jobs, newest first: in ``state``, or that target ``device_id``."""
    connection = session.connection()
    query = sa_select(_JOBS)
    if state is not None:
        query = query.where(_JOBS.c.state == state)
    if device_id is not None:
        query = query.where(
            _JOBS.c.id.in_(sa_select(_ROWS.c.job_id).where(_ROWS.c.device_id == device_id))
        )
    jobs = list(
        connection.execute(query.order_by(_JOBS.c.created_at.desc(), _JOBS.c.id).limit(limit))
        .mappings()
        .all()
    )
    states: dict[str, list[str]] = {j["id"]: [] for j in jobs}
    if jobs:
        for job_id, row_state in connection.execute(
            sa_select(_ROWS.c.job_id, _ROWS.c.state).where(_ROWS.c.job_id.in_(list(states)))
        ):
            states[job_id].append(row_state)
    return [_public(j, states[j["id"]]) for j in jobs]
