"""The liveness controller's driver: mark devices offline that went silent without a Will.

Rules:
- Runs on the link's session (:meth:`~hub.mqtt.session.MqttSession.while_connected`):
  it counts silence only from the moment this connection began
  (``listening_since``, see :mod:`.plan`), so a hub that was away does not take
  the fleet for gone.
- One look: read the online, active devices (``last_seen``, ``heartbeat_s``) in a
  worker thread, run the planner, and commit the flips in one transaction under a
  re-check: the chosen rows are read again locked, planned again with the same
  ``now``, and only those still silent are written (``online`` false,
  ``online_changed_at``) with one ``offline`` device event each. A message that
  arrived meanwhile keeps its device online.
- Looks again when the planner's next deadline comes (``wake_after_s``), or after
  one default heartbeat interval when nobody is online (a birth does not wake
  controllers); woken also by the link's change fan-out, which is harmless.
- A device marked offline comes back with its next message (the ingest rules); both
  flips are device events, readable at ``GET /api/v1/devices/{id}/events``.
- Time is the hub's clock (the context's ``now``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Engine, Table, bindparam, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from hub.context import Clock
from hub.controllers.liveness.plan import Plan, Seen, plan
from hub.controllers.loop import ControllerLoop
from hub.db import begin_write, new_session
from hub.devices.models import Device
from hub.devices.store import insert_events, online_event
from hub.mqtt.session import MqttSession
from hub.settings import HubSettings

log = logging.getLogger(__name__)

_DEVICES: Table = Device.__table__  # type: ignore[attr-defined]
_ONLINE = sa_select(_DEVICES.c.id, _DEVICES.c.last_seen, _DEVICES.c.heartbeat_s).where(
    _DEVICES.c.online.is_(True), _DEVICES.c.decommissioned_at.is_(None)
)
_MARK_OFFLINE = (
    update(_DEVICES)
    .where(_DEVICES.c.id == bindparam("b_id"))
    .values(online=False, online_changed_at=bindparam("b_at"))
)


def _seen(rows: Sequence[tuple[str, datetime | None, float | None]]) -> list[Seen]:
    return [
        Seen(device_id, last_seen.timestamp() if last_seen else None, heartbeat_s)
        for device_id, last_seen, heartbeat_s in rows
    ]


class LivenessController:
    """Marks online devices offline once they missed their heartbeats."""

    def __init__(self, *, engine: Engine, settings: HubSettings, clock: Clock) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._loop = ControllerLoop(self._step)
        self._since: float | None = None
        self.marked = 0  # devices marked offline by this process (tests, stats)

    def attach(self, session: MqttSession) -> None:
        session.while_connected("liveness", self._run)

    def wake(self) -> None:
        self._loop.wake()

    async def _run(self) -> None:
        self._since = self._clock().timestamp()
        await self._loop.run()

    async def _step(self) -> float | None:
        return await asyncio.to_thread(self._look)

    def _plan(self, seen: list[Seen], now: float) -> Plan:
        assert self._since is not None
        return plan(
            seen,
            now=now,
            listening_since=self._since,
            default_heartbeat_s=self._settings.heartbeat_s,
            missed=self._settings.offline_after_missed,
        )

    def _look(self) -> float | None:
        now = self._clock()
        with new_session(self._engine) as session:
            rows = session.connection().execute(_ONLINE).all()
            session.rollback()
            decided = self._plan(_seen(rows), now.timestamp())
            if decided.offline:
                marked = self._mark(session, decided.offline, now)
                self.marked += len(marked)
                if marked:
                    log.info(
                        "devices marked offline: heartbeats missed",
                        extra={"devices": marked[:100], "count": len(marked)},
                    )
        if decided.wake_after_s is None:
            return self._settings.heartbeat_s
        return decided.wake_after_s

    def _mark(self, session: Session, device_ids: Sequence[str], now: datetime) -> list[str]:
        """Write the flips of those still silent under the row locks; returns them."""
        begin_write(session)
        connection = session.connection()
        rows = connection.execute(
            _ONLINE.where(_DEVICES.c.id.in_(sorted(device_ids))).with_for_update()
        ).all()
        decided = self._plan(_seen(rows), now.timestamp())
        if decided.offline:
            connection.execute(_MARK_OFFLINE, [{"b_id": d, "b_at": now} for d in decided.offline])
            insert_events(
                connection,
                [
                    online_event(d, online=False, at=now, detail=decided.reasons[d])
                    for d in decided.offline
                ],
            )
        session.commit()
        return list(decided.offline)
