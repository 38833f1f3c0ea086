"""The loop a controller's driver runs: look, decide, act; again when woken or when due.

Rules:
- One step reads the database, runs the controller's planner (pure), carries out
  its decisions (committed in one transaction, or sent to the broker) and says
  when it wants to look again (seconds; None: only when woken).
- What wakes a controller: database changes (the link's change fan-out: a desired
  change committed in this process, or found in the change feed), reports (a
  handler the controller registered on the session) and its own timer. Never a
  route: a route commits, and the commit is what wakes it.
- A burst of wake-ups costs one look, not one each: after every look the loop
  settles for ``settle_s`` before the next.
- :meth:`ControllerLoop.wake` belongs to the event loop thread (the link marshals
  other threads' signals there).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from hub.mqtt.session import MqttSession

Step = Callable[[], Awaitable[float | None]]


class Controller(Protocol):
    """What the link needs of a controller: where it runs, and how to wake it."""

    def attach(self, session: MqttSession) -> None:
        """Register its handlers (reports) and its loop (``while_connected``) on ``session``."""

    def wake(self) -> None:
        """Something it reads changed in the database: look again soon (event loop thread)."""


class ControllerLoop:
    """Runs one step again and again: when woken, when the step's timer says."""

    def __init__(self, step: Step, *, settle_s: float = 0.5) -> None:
        self._step = step
        self._settle_s = settle_s
        self._event: asyncio.Event | None = None

    def wake(self) -> None:
        if self._event is not None:
            self._event.set()

    async def run(self) -> None:
        """Until cancelled (the connection ends); a step that raises ends it too."""
        self._event = event = asyncio.Event()
        while True:
            event.clear()
            wait_s = await self._step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait_s)
            await asyncio.sleep(self._settle_s)
