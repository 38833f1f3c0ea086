"""The placement controller's driver: plan the fleet when it changed, commit, signal.

Rules:
- One look: a cheap fingerprint of what placement reads (active devices, the newest
  registration, the newest online flip, the sum of connection numbers, how many are
  online, how many deployments); when it is the one of the last full look (or there
  is no deployment) and no planner timer is due, the look only records the outcomes
  devices reported since (``applied``/``failed`` events: one read, a write only when
  there is one). Otherwise the whole fleet is planned and committed
  through :meth:`hub.devices.desired.DesiredState.reconcile_fleet` (the very code a
  route's change and its preview run), which bumps every changed document and
  signals delivery. What needs no plan stays out of the fingerprint: a route's own
  change (deployments, labels) is planned in its request, a device's own document is
  merged when it is set, so the wake-up that follows them plans nothing again.
- Woken by the link's change fan-out (a desired change, the change feed), by its
  interval (``placement_interval_s``), and by the planner's own timers
  (``wake_after_s``: a lost_after or a backoff running out).
- What it keeps in memory is pacing (the last fingerprint, when the planner wants
  to look again): a restarted hub plans from the database and, with nothing
  changed, changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import Engine, case, func
from sqlalchemy import select as sa_select

from hub.context import Clock
from hub.controllers.loop import ControllerLoop
from hub.db import new_session
from hub.deployments import reconcile
from hub.deployments.models import Deployment
from hub.devices.desired import DeliverySignal, DesiredState
from hub.devices.models import Device
from hub.mqtt.session import MqttSession
from hub.settings import HubSettings

log = logging.getLogger(__name__)

_DEVICES = Device.__table__  # type: ignore[attr-defined]
_DEPLOYMENTS = Deployment.__table__  # type: ignore[attr-defined]
_FINGERPRINT = sa_select(
    func.count(),
    func.max(_DEVICES.c.created_at),
    func.max(_DEVICES.c.online_changed_at),
    func.sum(_DEVICES.c.session),
    func.sum(case((_DEVICES.c.online, 1), else_=0)),
    sa_select(func.count()).select_from(_DEPLOYMENTS).scalar_subquery(),
).where(_DEVICES.c.decommissioned_at.is_(None))


class PlacementController:
    """Keeps every device's assignments and document equal to the current plan."""

    def __init__(
        self,
        *,
        engine: Engine,
        settings: HubSettings,
        clock: Clock,
        delivery: DeliverySignal,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._desired = DesiredState(settings=settings, delivery=delivery)
        self._loop = ControllerLoop(self._step)
        self._fingerprint: tuple[Any, ...] | None = None
        self._due_at: float | None = None
        self.looks = 0
        self.plans = 0
        self.outcomes = 0

    def attach(self, session: MqttSession) -> None:
        session.while_connected("placement", self._loop.run)

    def wake(self) -> None:
        self._loop.wake()

    async def _step(self) -> float | None:
        return await asyncio.to_thread(self._look)

    def _look(self) -> float | None:
        self.looks += 1
        interval = self._settings.placement_interval_s
        now = self._clock()
        with new_session(self._engine) as session:
            fingerprint = tuple(session.connection().execute(_FINGERPRINT).one())
            session.rollback()
            due = self._due_at is not None and now.timestamp() >= self._due_at
            # No deployment: nothing to place (removing the last one already cleared
            # every assignment in the same transaction).
            if (fingerprint == self._fingerprint or fingerprint[-1] == 0) and not due:
                # Nothing placement reads changed; outcomes may have arrived.
                self.outcomes += reconcile.record_outcomes(session, now=now)
                return self._wait(now.timestamp(), interval)
            outcome = self._desired.reconcile_fleet(session, now=now)
            self._fingerprint = tuple(session.connection().execute(_FINGERPRINT).one())
            session.rollback()
        self.plans += 1
        wake_after = outcome.plan.wake_after_s
        self._due_at = now.timestamp() + wake_after if wake_after is not None else None
        if outcome.bumped or outcome.plan.events:
            log.info(
                "placement committed",
                extra={
                    "devices_changed": len(outcome.bumped),
                    "events": len(outcome.plan.events),
                    "moved": sum(1 for e in outcome.plan.events if e.kind == "moved"),
                },
            )
        return self._wait(now.timestamp(), interval)

    def _wait(self, now: float, interval: float) -> float:
        if self._due_at is None:
            return interval
        return max(0.0, min(interval, self._due_at - now))
