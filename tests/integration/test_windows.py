"""The scheduler (hub.controllers.schedules) on a real SQLite file with real APScheduler
jobs: fires recorded once with two schedulers, the misfire rule at start, and a real
hub process recording a window's fires."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine
from sqlmodel import select

from hub.context import Clock
from hub.controllers.schedules.driver import ScheduleController
from hub.db import init_db, make_engine, new_session
from hub.devices.models import Device
from hub.schedules import store
from hub.schedules.models import ScheduleFire
from tests.support import HubProcess, wait_until


def engine_at(path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{path}", busy_timeout_ms=5000)
    init_db(engine)
    return engine


def fires(engine: Engine) -> list[ScheduleFire]:
    with new_session(engine) as session:
        return list(
            session.exec(
                select(ScheduleFire).order_by(ScheduleFire.schedule, ScheduleFire.fire_time)  # type: ignore[arg-type]
            ).all()
        )


async def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def system_clock() -> datetime:
    return datetime.now(UTC)


async def test_two_schedulers_on_one_database_record_each_fire_once(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    setup = engine_at(path)
    with new_session(setup) as session:
        store.put_window(
            session,
            name="every-second",
            cron="* * * * * *",
            duration_s=0.5,
            timezone="UTC",
            now=system_clock(),
        )
    woken: list[str] = []
    first = ScheduleController(
        engine=engine_at(path), clock=system_clock, wake=lambda: woken.append("a")
    )
    second = ScheduleController(
        engine=engine_at(path), clock=system_clock, wake=lambda: woken.append("b")
    )
    tasks = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
    try:
        await wait_for(lambda: len(fires(setup)) >= 4, 15, "four fires")
    finally:
        for task in tasks:
            await stop(task)
    rows = fires(setup)
    times = [r.fire_time for r in rows]
    assert len(times) == len(set(times))
    # The scheduled time, not the run time: whole seconds, one apart.
    assert all(t.microsecond == 0 for t in times)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(times[1:]))
    fired = [r for r in rows if r.outcome == "fired"]
    assert first.fired + second.fired == len(fired) == len(woken)
    assert first.fired > 0 or second.fired > 0
    # Both ran (nearly) every fire: one inserted, the other found the row and skipped it.
    assert first.skipped + second.skipped >= len(fired) - 2
    assert all(r.recorded_at >= r.fire_time for r in rows)


async def test_fires_missed_while_down_are_coalesced_late_or_missed(tmp_path: Path) -> None:
    now = datetime(2026, 12, 6, 10, 20, tzinfo=UTC)
    clock: Clock = lambda: now  # noqa: E731
    engine = engine_at(tmp_path / "hub.db")
    long_ago = datetime(2026, 12, 1, tzinfo=UTC)
    with new_session(engine) as session:
        for name, cron, duration_s, timezone in [
            ("still-open", "0 10 * * *", 3600, "UTC"),  # fired 10:00, open until 11:00
            ("closed", "0 9 * * *", 600, "UTC"),  # fired 09:00, closed at 09:10
            ("recorded", "0 8 * * *", 600, "UTC"),  # its 08:00 fire has a row already
            ("local", "0 11 * * *", 3600, "label:tz"),  # 11:00 Berlin = 10:00 UTC: open
        ]:
            store.put_window(
                session,
                name=name,
                cron=cron,
                duration_s=duration_s,
                timezone=timezone,
                now=long_ago,
            )
        # Created after its last fire: nothing was missed.
        store.put_window(
            session,
            name="new",
            cron="0 10 * * *",
            duration_s=3600,
            timezone="UTC",
            now=datetime(2026, 12, 6, 10, 10, tzinfo=UTC),
        )
        session.add(
            ScheduleFire(
                schedule="recorded",
                fire_time=datetime(2026, 12, 6, 8, tzinfo=UTC),
                zone="UTC",
                recorded_at=datetime(2026, 12, 6, 8, tzinfo=UTC),
                outcome="fired",
            )
        )
        for device_id, labels in [("b", {"tz": "Europe.Berlin"}), ("u", {})]:
            session.add(Device(id=device_id, labels=labels, created_at=long_ago))
        session.commit()
    woken: list[int] = []
    controller = ScheduleController(engine=engine, clock=clock, wake=lambda: woken.append(1))
    task = asyncio.create_task(controller.run())
    try:
        await wait_for(lambda: controller.rebuilds >= 1 and bool(woken), 10, "the catch-up")
    finally:
        await stop(task)
    got = {(r.schedule, r.zone, r.fire_time, r.outcome) for r in fires(engine)}
    at = lambda h: datetime(2026, 12, 6, h, tzinfo=UTC)  # noqa: E731
    assert got == {
        ("still-open", "UTC", at(10), "late"),
        ("closed", "UTC", at(9), "missed"),
        ("recorded", "UTC", at(8), "fired"),  # the row that was there; nothing added
        ("local", "Europe/Berlin", at(10), "late"),
        # The device without the label runs in UTC: 11:00 UTC last came yesterday.
        ("local", "UTC", at(11) - timedelta(days=1), "missed"),
    }
    assert controller.late == 2 and controller.missed == 2 and woken == [1]


async def test_jobs_follow_the_table_and_the_zones_of_devices(tmp_path: Path) -> None:
    engine = engine_at(tmp_path / "hub.db")
    now = system_clock()
    with new_session(engine) as session:
        store.put_window(
            session, name="local", cron="0 3 * * *", duration_s=60, timezone="label:tz", now=now
        )
        session.add(Device(id="b", labels={"tz": "Europe.Berlin"}, created_at=now))
        session.commit()
    controller = ScheduleController(engine=engine, clock=system_clock, wake=lambda: None)
    task = asyncio.create_task(controller.run())
    try:
        await wait_for(lambda: controller.jobs == ["local@Europe/Berlin"], 10, "Berlin's job")
        with new_session(engine) as session:  # a label change (the fan-out wakes it)
            session.add(Device(id="t", labels={"tz": "Asia.Tokyo"}, created_at=now))
            session.add(Device(id="u", labels={}, created_at=now))
            session.commit()
        controller.wake()
        await wait_for(
            lambda: controller.jobs == ["local@Asia/Tokyo", "local@Europe/Berlin", "local@UTC"],
            10,
            "a job per zone",
        )
        with new_session(engine) as session:  # the table changes: found by the poll
            store.put_window(
                session, name="utc", cron="0 4 * * *", duration_s=60, timezone="UTC", now=now
            )
            store.delete_window(session, name="local")
        controller.wake()
        await wait_for(lambda: controller.jobs == ["utc@UTC"], 10, "the table's windows")
    finally:
        await stop(task)
    assert controller.jobs == []


def test_a_hub_process_records_its_windows_fires(hub: HubProcess) -> None:
    answer = hub.api.put("/windows/often", json={"cron": "*/2 * * * * *", "duration_s": 1})
    assert answer.status_code == 200, answer.text

    def recorded() -> list[tuple[str, str, str]]:
        with contextlib.closing(sqlite3.connect(hub.db_path)) as db:
            return db.execute(
                "SELECT fire_time, zone, outcome FROM schedule_fire WHERE schedule = 'often'"
            ).fetchall()

    def fired() -> int:
        return sum(1 for _, _, outcome in recorded() if outcome == "fired")

    wait_until(lambda: fired() >= 2, timeout_s=30, what="two fires")
    rows = recorded()
    assert {zone for _, zone, _ in rows} == {"UTC"}
    assert len({t for t, _, _ in rows}) == len(rows)
    # The window was created between two polls of the table: the fire that came before
    # the scheduler saw it is caught up (late, or missed when its second had passed).
    assert sum(1 for _, _, outcome in rows if outcome != "fired") <= 1
    # Deleting the window stops its fires (the scheduler rebuilds from the table).
    assert hub.api.delete("/windows/often").status_code == 204
    wait_until(lambda: hub.api.get("/windows").json()["items"] == [], what="deleted")
    assert hub.api.get("/windows/often").status_code == 404
