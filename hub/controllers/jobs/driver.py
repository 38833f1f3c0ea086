"""The jobs controller's driver: read the active jobs, plan, commit with the documents.

Rules:
- One look (in a worker thread): read every active job (running or paused, or with
  a row still queued or in progress) with all its rows and the devices they name
  (online, active, what they reported of each job: ``device.jobs``), run the pure
  planner (:func:`hub.controllers.jobs.plan.step`), and commit what changed through
  :meth:`hub.devices.desired.DesiredState.apply_jobs`: the rows, the jobs and the
  documents of devices that were handed a job (or lost one before it started), in
  one transaction, then delivery is signalled.
- Woken by the link's fan-out (a desired change, a job created or canceled through
  the desired-state service), by the planner's timers (an expiry, a deadline, a
  rate slot) and, while any job is active, every ``interval_s`` (reports arrive
  through ingest, which wakes nobody); with nothing active it looks every
  ``idle_s`` (a job created by an API process of its own, ``--no-link``).
- What it keeps in memory is pacing: a restarted hub plans from the database.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine

from hub.context import Clock
from hub.controllers.jobs import plan
from hub.controllers.loop import ControllerLoop
from hub.controllers.rollout.policy import PolicyError
from hub.db import epoch, from_epoch, new_session
from hub.devices.desired import DeliverySignal, DesiredState
from hub.jobs import store
from hub.mqtt.session import MqttSession
from hub.settings import HubSettings

log = logging.getLogger(__name__)

ACTIVE_INTERVAL_S = 1.0
IDLE_INTERVAL_S = 5.0


def _device(row: Mapping[str, Any]) -> plan.Device:
    reports: dict[str, plan.Report] = {}
    for status in row["jobs"] or ():
        reports[status["id"]] = plan.Report(
            state=status["state"],
            exit_code=status.get("exit_code"),
            message=status.get("message"),
            log_tail=status.get("log_tail"),
            started_at=status.get("started_at"),
            finished_at=status.get("finished_at"),
        )
    return plan.Device(
        online=bool(row["online"]), active=row["decommissioned_at"] is None, reports=reports
    )


def _target(row: Mapping[str, Any]) -> plan.Target:
    return plan.Target(
        device_id=row["device_id"],
        seq=row["seq"],
        state=row["state"],
        handed_out_at=epoch(row["handed_out_at"]),
        started_at=epoch(row["started_at"]),
        finished_at=epoch(row["finished_at"]),
        exit_code=row["exit_code"],
        message=row["message"],
        log_tail=row["log_tail"],
    )


def planner_input(active: store.ActiveJobs) -> tuple[list[plan.JobIn], dict[str, plan.Device]]:
    """The rows :func:`hub.jobs.store.read_active` read, as the planner's input. A job
    whose stored policy cannot be read plans with none (logged)."""
    jobs: list[plan.JobIn] = []
    for job in active.jobs:
        try:
            policy = plan.policy_from_json(job["policy"])
        except PolicyError as exc:
            log.error("job policy unreadable", extra={"job": job["id"], "error": str(exc)})
            policy = plan.Policy()
        jobs.append(
            plan.JobIn(
                id=job["id"],
                state=job["state"],
                deadline_s=job["deadline_s"],
                expires_at=job["expires_at"].timestamp(),
                policy=policy,
                targets=tuple(_target(r) for r in active.rows[job["id"]]),
                reason=job["reason"],
            )
        )
    return jobs, {i: _device(r) for i, r in active.devices.items()}


def changes(decided: plan.Step) -> tuple[list[store.RowChange], list[store.JobChange]]:
    """The planner's step as the store's row and job changes."""
    rows = [
        store.RowChange(
            job_id=job_id,
            device_id=after.device_id,
            state_was=before.state,
            handed_out_was=before.handed_out_at is not None,
            values={
                "state": after.state,
                "handed_out_at": from_epoch(after.handed_out_at),
                "started_at": from_epoch(after.started_at),
                "finished_at": from_epoch(after.finished_at),
                "exit_code": after.exit_code,
                "message": after.message[:256] if after.message is not None else None,
                "log_tail": after.log_tail[-4096:] if after.log_tail is not None else None,
            },
        )
        for job_id, before, after in decided.targets
    ]
    jobs = [
        store.JobChange(
            job_id=c.id, state_was=c.before, state=c.state, reason=c.reason, finished=c.finished
        )
        for c in decided.jobs
    ]
    return rows, jobs


class JobsController:
    """Hands jobs out, follows what devices report, and finishes jobs (module rules)."""

    def __init__(
        self,
        *,
        engine: Engine,
        settings: HubSettings,
        clock: Clock,
        delivery: DeliverySignal,
        interval_s: float = ACTIVE_INTERVAL_S,
        idle_s: float = IDLE_INTERVAL_S,
        grace_s: float = plan.TIMEOUT_GRACE_S,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._desired = DesiredState(settings=settings, delivery=delivery)
        self._loop = ControllerLoop(self._step, settle_s=min(0.5, interval_s))
        self._interval_s = interval_s
        self._idle_s = idle_s
        self._grace_s = grace_s
        self.looks = 0
        self.commits = 0

    def attach(self, session: MqttSession) -> None:
        session.while_connected("jobs", self._loop.run)

    def wake(self) -> None:
        self._loop.wake()

    async def _step(self) -> float | None:
        return await asyncio.to_thread(self.look)

    def look(self) -> float:
        """One look (module rules); returns the seconds until the next one."""
        self.looks += 1
        now = self._clock()
        with new_session(self._engine) as session:
            active = store.read_active(session)
            if not active.jobs:
                return self._idle_s
            jobs, devices = planner_input(active)
            decided = plan.step(jobs, devices, now.timestamp(), grace_s=self._grace_s)
            rows, job_changes = changes(decided)
            if rows or job_changes:
                bumped = self._desired.apply_jobs(
                    session, rows=rows, jobs=job_changes, documents=decided.documents, now=now
                )
                self.commits += 1
                log.info(
                    "jobs committed",
                    extra={
                        "rows": len(rows),
                        "jobs": len(job_changes),
                        "documents": len(bumped),
                        "notes": list(decided.notes),
                    },
                )
        wait = self._interval_s
        if decided.wake_after_s is not None:
            wait = min(wait, decided.wake_after_s)
        return max(0.0, wait)
