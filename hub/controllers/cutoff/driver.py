"""The broker cut-off's driver: ask the broker to close decommissioned devices' connections.

Rules:
- Runs on the link's session (only over TLS, ``HubSettings.cuts_off_sessions``):
  at every connect it asks again for every device whose cut-off the database says
  is unconfirmed (``decommissioned_at`` set, ``cut_off_at`` not), at most
  ``_BATCH`` at a time, in one command message; then again when woken (a desired
  change: a decommission is one) or when the planner's pause is up (:func:`.plan.plan`).
- The broker's answers arrive on ``$CONTROL/dynamic-security/v1/response``, routed
  to this controller by the session: each confirmation is committed
  (``cut_off_at``, ``online`` false) in one transaction per answer, and then
  acknowledged; refusals are counted by the broker's error text and logged, and
  asked again after the pause.
- What the controller remembers in memory (when it last asked whom) is only
  pacing: a restarted hub, or a new connection, asks again for everything the
  database says is pending.
- Time is the hub's clock (the context's ``now``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import Engine

from hub.context import Clock
from hub.controllers.cutoff.plan import (
    DYNSEC_RESPONSE_TOPIC,
    DYNSEC_TOPIC,
    commands,
    plan,
    read_answer,
)
from hub.controllers.loop import ControllerLoop
from hub.db import new_session
from hub.devices import store
from hub.mqtt.session import Incoming, MqttSession, Publish
from hub.settings import HubSettings
from hub.stats import LinkStats

log = logging.getLogger(__name__)

_MAX_PAUSE_S = 300.0
_BATCH = 100


class CutoffController:
    """Asks the broker to cut off decommissioned devices until it confirms."""

    def __init__(
        self, *, engine: Engine, settings: HubSettings, stats: LinkStats, clock: Clock
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._stats = stats
        self._clock = clock
        self._asked: dict[str, float] = {}  # device -> when last asked (hub clock, seconds)
        self._pause_s = settings.broker_cutoff_retry_s
        self._loop = ControllerLoop(self._step)
        self._send: Publish | None = None

    def attach(self, session: MqttSession) -> None:
        self._send = session.publish
        session.route([DYNSEC_RESPONSE_TOPIC], self._on_answers)
        session.while_connected("broker-cutoff", self._run)

    def wake(self) -> None:
        self._loop.wake()

    async def _run(self) -> None:
        self._asked.clear()  # a new connection: ask again for everything pending
        self._pause_s = self._settings.broker_cutoff_retry_s
        await self._loop.run()

    async def _step(self) -> float | None:
        assert self._send is not None
        pending = await asyncio.to_thread(self._pending)
        now = self._clock().timestamp()
        decided = plan(
            pending,
            self._asked,
            now=now,
            pause_s=self._pause_s,
            first_pause_s=self._settings.broker_cutoff_retry_s,
            max_pause_s=_MAX_PAUSE_S,
        )
        self._pause_s = decided.pause_s
        if decided.ask:
            for device_id in decided.ask:
                self._asked[device_id] = now
            await self._send(DYNSEC_TOPIC, commands(decided.ask))
            self._stats.cutoffs_requested += len(decided.ask)
            log.info(
                "asked the broker to cut off decommissioned devices",
                extra={"devices": list(decided.ask)},
            )
        return decided.wait_s

    def _pending(self) -> list[str]:
        with new_session(self._engine) as session:
            return store.pending_cut_offs(session, limit=_BATCH)

    async def _on_answers(self, batch: Sequence[Incoming]) -> None:
        for message in batch:
            await self._on_answer(message.payload)

    async def _on_answer(self, payload: bytes) -> None:
        """Record what the broker confirmed; count and log what it refused."""
        try:
            answer = read_answer(payload)
        except ValueError as exc:
            self._stats.rejected["bad_control_response"] += 1
            log.warning("broker control answer not understood", extra={"error": str(exc)})
            return
        for device_id, error in answer.failed.items():
            self._stats.cutoff_errors[error] += 1
            log.warning(
                "broker refused to cut off a device; will ask again",
                extra={"device": device_id, "error": error},
            )
        if not answer.cut_off:
            return
        confirmed = await asyncio.to_thread(self._confirm, answer.cut_off, self._clock())
        self._stats.cutoffs_confirmed += len(confirmed)
        for device_id in confirmed:
            self._asked.pop(device_id, None)
            log.info(
                "broker closed the decommissioned device's connections", extra={"device": device_id}
            )

    def _confirm(self, device_ids: list[str], now: datetime) -> list[str]:
        with new_session(self._engine) as session:
            return store.confirm_cut_offs(session, device_ids=device_ids, now=now)
