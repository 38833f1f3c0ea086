"""The scheduler's planner (pure): what a fire's row says, and which missed fire a
(re)built job catches up.

Nothing here does I/O or reads a clock: the driver (:mod:`.driver`) passes the
window, the fire's scheduled time or what the table says, and ``now``.

Rules (``docs/windows.md``, "The misfire rule"):
- A fire that runs while the opening it starts still lasts (``now < fire +
  duration``) is ``fired``, and the controllers are woken; one that runs after its
  opening ended is ``missed`` (nothing to wake for).
- When a job is (re)built, the fires missed since the later of the window's last
  change and the job's last recorded fire are coalesced into the most recent one:
  ``late`` (wake) if its opening still lasts, ``missed`` otherwise; older ones are
  not recorded. A window changed after its last fire, or whose last fire has a row,
  has nothing to catch up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from hub.schedules.window import Window, last_fire

FIRED = "fired"
LATE = "late"
MISSED = "missed"


@dataclass(frozen=True, slots=True)
class CatchUp:
    """The one missed fire to record for a job, and its outcome."""

    fire_time: datetime
    outcome: str

    @property
    def wakes(self) -> bool:
        return self.outcome == LATE


def fire_outcome(window: Window, fire_time: datetime, now: datetime) -> str:
    """The outcome of a fire scheduled at ``fire_time`` that runs at ``now``."""
    return FIRED if now < fire_time + window.duration else MISSED


def catch_up(
    window: Window,
    zone: str,
    *,
    now: datetime,
    changed_at: datetime,
    last_recorded: datetime | None,
) -> CatchUp | None:
    """The missed fire a (re)built job records, if any (see the module rules)."""
    since = changed_at if last_recorded is None else max(changed_at, last_recorded)
    fire = last_fire(window, zone, now, since=since)
    if fire is None:
        return None
    return CatchUp(fire, LATE if now < fire + window.duration else MISSED)
