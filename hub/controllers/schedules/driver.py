"""The scheduler's driver: APScheduler 3 jobs rebuilt from the ``schedule`` table; each
fire recorded once, then the rollout controller woken.

Rules:
- The table is the truth. The jobs live in an in-memory job store (APScheduler's
  ``MemoryJobStore``), rebuilt from the table when the scheduler starts and whenever
  what it reads changed: the windows (polled every ``poll_s``) and the zones their
  devices are in (a label change is a desired change: the link's fan-out wakes the
  controller). The job store is this scheduler's alone: APScheduler 3 must never
  share a job store between two schedulers, and nothing here persists jobs, so a
  second hub process (or, at scale, a newly elected leader) builds its own from
  the table.
- One job per window and zone in use: UTC, or each distinct zone of the devices'
  labels for a ``label:<key>`` window. Its trigger is :func:`hub.schedules.window.next_fire`
  (the DST rules of :mod:`hub.schedules.window`, so a fire and ``is_open`` agree).
- A fire inserts a ``schedule_fire`` row (window, the SCHEDULED fire time, zone,
  recorded_at, outcome) before anything else; its primary key makes a second insert
  fail, and that fire is then skipped: two schedulers on one database (or a fire
  that is both run and caught up) never act twice. Outcome ``fired`` when it runs
  while its opening lasts (then ``wake`` is called), ``missed`` when it runs after
  the opening already ended (nothing to wake for).
- Misfires (``docs/windows.md``): fires missed while no scheduler ran are coalesced.
  Whenever a job is (re)built, the most recent fire of that window and zone since
  the later of the window's last change and its last recorded fire is recorded, if
  it has no row: ``late`` (and ``wake``) when its opening still lasts, ``missed``
  otherwise; older missed fires are not recorded. APScheduler agrees:
  ``coalesce=True`` (a backlog of run times collapses to the newest) and
  ``misfire_grace_time=None`` (a late run always reaches the driver, which decides
  ``fired`` or ``missed`` by the window, not by a grace period).
- ``wake`` is called on the event loop thread, after the row is committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger
from sqlalchemy import Engine, func
from sqlalchemy import select as sa_select
from sqlalchemy.exc import IntegrityError

from hub.context import Clock
from hub.controllers.loop import ControllerLoop
from hub.controllers.schedules import plan
from hub.db import new_session
from hub.mqtt.session import MqttSession
from hub.schedules import store
from hub.schedules.errors import InvalidWindow
from hub.schedules.models import Schedule, ScheduleFire
from hub.schedules.window import Window, next_fire

log = logging.getLogger(__name__)

DEFAULT_POLL_S = 5.0
_FIRES = ScheduleFire.__table__  # type: ignore[attr-defined]
_US = timedelta(microseconds=1)


@dataclass(frozen=True, slots=True)
class _Job:
    """One (window, zone) the scheduler runs."""

    name: str
    zone: str
    window: Window
    changed_at: datetime


class _WindowTrigger(BaseTrigger):  # type: ignore[misc]
    """APScheduler's view of a window's fires in one zone (no DST arithmetic of its own)."""

    def __init__(self, window: Window, zone: str) -> None:
        self._window = window
        self._zone = zone

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> Any:
        after = previous_fire_time if previous_fire_time is not None else now - _US
        return next_fire(self._window, self._zone, after)

    def __str__(self) -> str:
        return f"window[{self._window.cron!r} in {self._zone}]"


class _FireExecutor(BaseExecutor):  # type: ignore[misc]
    """Runs a fire's coroutine on the loop with its SCHEDULED time (``fire_time``)
    (APScheduler 3 does not pass it to the job; a custom executor is its extension point)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        coroutine: Coroutine[Any, Any, None] = job.func(*job.args, fire_time=run_times[-1])
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._tasks.discard(finished)
            error = None if finished.cancelled() else finished.exception()
            if error is None:
                self._run_job_success(job.id, [])
            else:
                self._run_job_error(job.id, error, error.__traceback__)

        task.add_done_callback(done)

    def shutdown(self, wait: bool = True) -> None:
        for task in self._tasks:
            task.cancel()


class ScheduleController:
    """Runs every window's fires (see the module rules); one per hub process that runs
    the link. Never give two of them one job store: each builds its own, in memory."""

    def __init__(
        self,
        *,
        engine: Engine,
        clock: Clock,
        wake: Callable[[], None],
        poll_s: float = DEFAULT_POLL_S,
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._wake = wake
        self._poll_s = poll_s
        self._loop = ControllerLoop(self._step, settle_s=0.1)
        self._scheduler: AsyncIOScheduler | None = None
        self._fingerprint: tuple[Any, ...] | None = None
        self.fired = 0
        self.skipped = 0
        self.late = 0
        self.missed = 0
        self.rebuilds = 0

    @property
    def jobs(self) -> list[str]:
        """The running jobs' ids (``window@zone``), sorted; empty while not running."""
        if self._scheduler is None:
            return []
        return sorted(job.id for job in self._scheduler.get_jobs())

    def attach(self, session: MqttSession) -> None:
        session.while_connected("schedules", self.run)

    def wake(self) -> None:
        self._loop.wake()

    async def run(self) -> None:
        """Until cancelled: a fresh scheduler with a fresh in-memory job store each time."""
        loop = asyncio.get_running_loop()
        scheduler = AsyncIOScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": _FireExecutor(loop)},
            job_defaults={"coalesce": True, "misfire_grace_time": None, "max_instances": 8},
            timezone=UTC,
            event_loop=loop,
        )
        scheduler.start()
        self._scheduler, self._fingerprint = scheduler, None
        try:
            await self._loop.run()
        finally:
            self._scheduler = None
            scheduler.shutdown(wait=False)

    # -- looking at the table ---------------------------------------------------------------

    async def _step(self) -> float:
        jobs, fingerprint = await asyncio.to_thread(self._read)
        if fingerprint != self._fingerprint and self._scheduler is not None:
            self._rebuild(self._scheduler, jobs)
            self._fingerprint = fingerprint
            late = await asyncio.to_thread(self._catch_up, jobs)
            if late:
                self._wake()
        return self._poll_s

    def _read(self) -> tuple[list[_Job], tuple[Any, ...]]:
        with new_session(self._engine) as session:
            rows = store.list_windows(session)
            windows: list[tuple[Schedule, Window]] = []
            for row in rows:
                try:
                    windows.append((row, store.window_of(row)))
                except InvalidWindow as exc:
                    log.warning("window not scheduled", extra={"window": row.name, "why": str(exc)})
            zones = store.zones_in_use(session, (w for _, w in windows))
        jobs = [
            _Job(row.name, zone, window, row.updated_at)
            for row, window in windows
            for zone in sorted(store.zones_of(window, zones))
        ]
        fingerprint = tuple((j.name, j.zone, j.window, j.changed_at) for j in jobs)
        return jobs, fingerprint

    def _rebuild(self, scheduler: AsyncIOScheduler, jobs: list[_Job]) -> None:
        scheduler.remove_all_jobs()
        for job in jobs:
            scheduler.add_job(
                self._fire,
                trigger=_WindowTrigger(job.window, job.zone),
                args=(job,),
                id=f"{job.name}@{job.zone}",
                name=f"window {job.name} in {job.zone}",
            )
        self.rebuilds += 1
        log.info("scheduler rebuilt", extra={"jobs": len(jobs)})

    # -- fires ------------------------------------------------------------------------------

    async def _fire(self, job: _Job, fire_time: datetime | None = None) -> None:
        """One run of a job; ``fire_time`` is always given (by :class:`_FireExecutor`)."""
        if fire_time is None:
            raise TypeError("a fire without its scheduled time")
        now = self._clock()
        outcome = plan.fire_outcome(job.window, fire_time, now)
        recorded = await asyncio.to_thread(self._record, job, fire_time, outcome, now)
        if not recorded:
            self.skipped += 1
            return
        if outcome == plan.FIRED:
            self.fired += 1
            self._wake()
        else:
            self.missed += 1

    def _record(self, job: _Job, fire_time: datetime, outcome: str, now: datetime) -> bool:
        """Insert the fire's row; False when it is already there (someone else ran it)."""
        with new_session(self._engine) as session:
            session.add(
                ScheduleFire(
                    schedule=job.name,
                    fire_time=fire_time,
                    zone=job.zone,
                    recorded_at=now,
                    outcome=outcome,
                )
            )
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                return False
        log.info(
            "window fire",
            extra={
                "window": job.name,
                "zone": job.zone,
                "fire_time": fire_time.isoformat(),
                "outcome": outcome,
            },
        )
        return True

    def _catch_up(self, jobs: list[_Job]) -> int:
        """The misfire rule (:func:`.plan.catch_up`); how many ``late`` fires it recorded."""
        with new_session(self._engine) as session:
            recorded = {
                (str(name), str(zone)): at if at.tzinfo else at.replace(tzinfo=UTC)
                for name, zone, at in session.connection().execute(
                    sa_select(
                        _FIRES.c.schedule, _FIRES.c.zone, func.max(_FIRES.c.fire_time)
                    ).group_by(_FIRES.c.schedule, _FIRES.c.zone)
                )
            }
        late = 0
        now = self._clock()
        for job in jobs:
            caught = plan.catch_up(
                job.window,
                job.zone,
                now=now,
                changed_at=job.changed_at,
                last_recorded=recorded.get((job.name, job.zone)),
            )
            if caught is None or not self._record(job, caught.fire_time, caught.outcome, now):
                continue
            if caught.wakes:
                self.late += 1
                late += 1
            else:
                self.missed += 1
        return late
