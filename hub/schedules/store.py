"""Windows in the database: the one place that writes the ``schedule`` table.

Rules:
- A window is validated (:func:`hub.schedules.window.parse_window`) before it is
  stored; a stored row that no longer parses (a zone database that lost a name)
  raises :class:`InvalidWindow` where it is read, never silently means "closed".
- ``PUT`` replaces the whole window; ``updated_at`` moves only when something
  changed (the scheduler rebuilds its jobs from the table when it does).
- A window cannot be deleted while a rollout that has not finished (state not in
  ``succeeded``, ``aborted``, ``superseded``) names it in its policy (``window``):
  :class:`WindowInUse` lists them.
- Functions take the session and commit what they change; they raise domain errors
  (:mod:`hub.schedules.errors`), never HTTP ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from hub.db import begin_write
from hub.devices.models import Device
from hub.rollouts.gate import TERMINAL
from hub.rollouts.models import Rollout
from hub.schedules.errors import InvalidWindow, WindowInUse, WindowNotFound
from hub.schedules.models import Schedule
from hub.schedules.window import UTC_ZONE, Window, WindowError, parse_window, zone_of

_DEVICES = Device.__table__  # type: ignore[attr-defined]
_ROLLOUTS = Rollout.__table__  # type: ignore[attr-defined]


def window_of(row: Schedule) -> Window:
    """The stored window, parsed; raises :class:`InvalidWindow` if it no longer parses."""
    try:
        return parse_window(row.cron, row.duration_s, row.timezone)
    except WindowError as exc:
        raise InvalidWindow(row.name, str(exc)) from None


def put_window(
    session: Session, *, name: str, cron: str, duration_s: float, timezone: str, now: datetime
) -> Schedule:
    """Create or replace the window; raises :class:`InvalidWindow`."""
    try:
        window = parse_window(cron, duration_s, timezone)
    except WindowError as exc:
        raise InvalidWindow(name, str(exc)) from None
    begin_write(session)  # read and write under the write lock (SQLite: no upgrade deadlock)
    row = session.get(Schedule, name)
    if row is None:
        row = Schedule(
            name=name,
            cron=window.cron,
            duration_s=window.duration_s,
            timezone=window.timezone,
            created_at=now,
            updated_at=now,
        )
        session.add(row)
    elif (row.cron, row.duration_s, row.timezone) != (cron, window.duration_s, timezone):
        row.cron, row.duration_s, row.timezone = window.cron, window.duration_s, timezone
        row.updated_at = now
    session.commit()
    session.refresh(row)
    return row


def get_window(session: Session, name: str) -> Schedule:
    row = session.get(Schedule, name)
    if row is None:
        raise WindowNotFound(name)
    return row


def list_windows(session: Session) -> list[Schedule]:
    return list(session.exec(select(Schedule).order_by(col(Schedule.name))).all())


def rollouts_naming(session: Session, name: str) -> list[int]:
    """Ids of the rollouts that have not finished and name this window."""
    rows = session.connection().execute(
        sa_select(_ROLLOUTS.c.id)
        .where(_ROLLOUTS.c.policy["window"].as_string() == name)
        .where(_ROLLOUTS.c.state.not_in(TERMINAL))
        .order_by(_ROLLOUTS.c.id)
    )
    return [int(r[0]) for r in rows]


def delete_window(session: Session, *, name: str) -> None:
    """Remove it; raises :class:`WindowNotFound`, or :class:`WindowInUse`."""
    begin_write(session)
    row = get_window(session, name)
    in_use = rollouts_naming(session, name)
    if in_use:
        session.rollback()
        raise WindowInUse(name, in_use)
    session.delete(row)
    session.commit()


def device_labels(session: Session) -> dict[str, dict[str, str]]:
    """Every active device's labels, by id (what zones and window states are made of)."""
    rows = session.connection().execute(
        sa_select(_DEVICES.c.id, _DEVICES.c.labels).where(_DEVICES.c.decommissioned_at.is_(None))
    )
    return {str(r[0]): dict(r[1] or {}) for r in rows}


def zones_in_use(session: Session, windows: Iterable[Window]) -> dict[str, set[str]]:
    """For each label key the windows name, the zones its active devices run in (one
    distinct-values read per key); a UTC window's zone is UTC."""
    zones: dict[str, set[str]] = {}
    for window in windows:
        key = window.label_key
        if key is None or key in zones:
            continue
        values = session.connection().execute(
            sa_select(_DEVICES.c.labels[key].as_string())
            .where(_DEVICES.c.decommissioned_at.is_(None))
            .distinct()
        )
        zones[key] = {zone_of(window, {} if value is None else {key: value}) for (value,) in values}
    return zones


def zones_of(window: Window, by_key: dict[str, set[str]]) -> set[str]:
    """The zones one window runs in, from :func:`zones_in_use`'s answer."""
    key = window.label_key
    return {UTC_ZONE} if key is None else by_key.get(key, set())
