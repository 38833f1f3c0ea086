"""Maintenance windows (pure): validate one, and say when it is open, per time zone.

Nothing here does I/O or reads a clock: "now" is always an argument (an aware
datetime), so every rule below is a table test (``tests/unit/test_windows.py``).

Rules:
- A window is a cron expression (when it opens), a duration (how long it stays
  open: ``0 < duration_s <= 7 days``) and a time zone: ``"UTC"``, or
  ``"label:<key>"``, meaning each device's own zone, named by its label ``<key>``.
- The cron has 5 fields (minute hour day month day-of-week, as crontab) or 6 with a
  leading second field. Day-of-week numbers are crontab's (0 or 7 = Sunday, 1 =
  Monday; names ``sun``..``sat`` work too), not APScheduler 3's (0 = Monday): the
  field is translated to names before APScheduler sees it. Restricting both the day
  of month and the day of week is refused (crontab fires when either matches,
  APScheduler when both do: an operator would get one of the two by surprise). A
  cron that never fires (``0 0 30 2 *``) is refused.
- Fires are computed on the zone's wall clock, then placed on the time line:
  a wall time that does not exist (the spring-forward gap, 02:30 in Berlin on the
  last Sunday of March) fires at the moment the clocks jump (03:00 CEST); a wall
  time that happens twice (the autumn fall-back) fires once, the first time
  (CEST). The scheduler uses these very functions (its trigger wraps
  :func:`next_fire`), so it and :func:`is_open` never disagree. (APScheduler 3's
  own ``CronTrigger`` in a DST zone can step backwards in the fall-back hour; it
  is only asked about wall-clock readings, in UTC, here.)
- A window is open at ``now`` when a fire ``f`` has ``f <= now < f + duration``:
  the interval is half-open, and fires that come before the previous opening's
  duration ran out (a duration longer than the cron's period) keep it open.
- A device's zone (:func:`zone_of`) is its label's value read as an IANA name,
  with ``/`` written ``.`` (label values cannot hold ``/``): ``Europe.Berlin``.
  ``Europe/Berlin`` is also read when the value holds one; a device without the
  label, or whose value names no known zone, uses UTC, and :func:`resolve_zone`
  says why (the API shows it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

from hub.devices.labels import LABEL_KEY_PATTERN

__all__ = [
    "MAX_DURATION_S",
    "UTC_ZONE",
    "Window",
    "WindowError",
    "ZoneChoice",
    "is_open",
    "last_fire",
    "next_change",
    "next_fire",
    "next_open",
    "parse_window",
    "resolve_zone",
    "window_states",
    "zone_of",
]

UTC_ZONE = "UTC"
LABEL_PREFIX = "label:"
MAX_DURATION_S = 7 * 24 * 3600.0
# next_change follows a chain of overlapping openings this far at most: a window
# whose fires always come before its duration runs out never closes, and the
# caller is told to look again at the end of the chain it followed.
_MAX_CHAIN = 1000
# When nothing changes within this look-ahead, next_change says "look again then".
_HORIZON = timedelta(days=8)
_REFERENCE = datetime(2000, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)


class WindowError(ValueError):
    """A window that cannot be used; the message names the field (``cron: ...``)."""


@dataclass(frozen=True, slots=True)
class Window:
    """A validated window (build it with :func:`parse_window`)."""

    cron: str
    duration_s: float
    timezone: str
    # The cron on the wall clock, evaluated in UTC (no DST): see the module rules.
    trigger: CronTrigger = field(compare=False, repr=False)

    @property
    def label_key(self) -> str | None:
        """The label naming each device's zone; None for a UTC window."""
        if self.timezone.startswith(LABEL_PREFIX):
            return self.timezone[len(LABEL_PREFIX) :]
        return None

    @property
    def duration(self) -> timedelta:
        return timedelta(seconds=self.duration_s)


@dataclass(frozen=True, slots=True)
class ZoneChoice:
    """The zone a device's window runs in, and why UTC when it fell back."""

    zone: str
    fallback: str | None = None


def parse_window(cron: str, duration_s: float, timezone: str) -> Window:
    """Validate the three parts; raises :class:`WindowError` naming the bad one."""
    if not isinstance(duration_s, int | float) or isinstance(duration_s, bool):
        raise WindowError("duration_s: a number of seconds")
    if not math.isfinite(duration_s) or not 0 < duration_s <= MAX_DURATION_S:
        raise WindowError(
            f"duration_s: must be more than 0 and at most {MAX_DURATION_S:.0f} (7 days); "
            f"got {duration_s}"
        )
    if timezone != UTC_ZONE:
        key = timezone[len(LABEL_PREFIX) :] if timezone.startswith(LABEL_PREFIX) else None
        if key is None or not _LABEL_KEY.match(key):
            raise WindowError(
                f'timezone: "UTC" or "label:<label key>" (each device\'s zone from that '
                f"label); got {timezone!r}"
            )
    return Window(
        cron=cron, duration_s=float(duration_s), timezone=timezone, trigger=_trigger(cron)
    )


def _trigger(cron: str) -> CronTrigger:
    if not isinstance(cron, str):
        raise WindowError("cron: a string")
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise WindowError(
            "cron: 5 fields (minute hour day month day-of-week), or 6 with a leading "
            f"second field; got {len(fields)}"
        )
    if len(fields) == 5:
        fields.insert(0, "0")
    second, minute, hour, day, month, dow = fields
    if day != "*" and dow != "*":
        raise WindowError(
            "cron: restrict the day of month or the day of week, not both (cron "
            "implementations disagree on what both mean)"
        )
    try:
        trigger = CronTrigger(
            second=second,
            minute=minute,
            hour=hour,
            day=day,
            month=month,
            day_of_week=_weekdays(dow),
            timezone=UTC,
        )
    except ValueError as exc:
        raise WindowError(f"cron: {exc}") from None
    if trigger.get_next_fire_time(None, _REFERENCE) is None:
        raise WindowError(f"cron: {cron!r} never fires")
    return trigger


def _weekday(token: str) -> int:
    name = token.lower()
    if name in _DAYS:
        return _DAYS.index(name)
    if token.isdigit() and int(token) <= 7:
        return int(token) % 7
    raise WindowError(f"cron: day of week {token!r}: 0-7 (0 and 7 are Sunday) or sun..sat")


def _weekdays(field_: str) -> str:
    """Crontab's day-of-week field as the names APScheduler 3 reads the same way."""
    if field_ == "*":
        return "*"
    days: set[int] = set()
    for item in field_.split(","):
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise WindowError(f"cron: day of week step {step_text!r}")
            step = int(step_text)
        if base == "*":
            first, last = 0, 6
        elif "-" in base:
            low, _, high = base.partition("-")
            first, last = _weekday(low), _weekday(high)
            if last == 0 and first > 0:
                last = 7  # "5-7", "fri-sun": up to the Sunday that ends the week
            if last < first:
                raise WindowError(f"cron: day of week range {base!r} runs backwards")
        else:
            first = _weekday(base)
            last = 6 if step_text else first
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_DAYS[d] for d in sorted(days))


# -- zones ---------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _zone(name: str) -> tzinfo | None:
    if name == UTC_ZONE:
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return None


def resolve_zone(window: Window, labels: Mapping[str, str]) -> ZoneChoice:
    """The zone this device's window runs in (pure)."""
    key = window.label_key
    if key is None:
        return ZoneChoice(UTC_ZONE)
    value = labels.get(key)
    if value is None:
        return ZoneChoice(UTC_ZONE, f"no label {key!r}")
    for name in (value.replace(".", "/"), value):
        if name and _zone(name) is not None:
            return ZoneChoice(name)
    return ZoneChoice(UTC_ZONE, f"label {key}={value!r} names no time zone")


def zone_of(window: Window, labels: Mapping[str, str]) -> str:
    """The IANA zone name this device's window runs in (``"UTC"`` when it falls back)."""
    return resolve_zone(window, labels).zone


# -- fires on the time line -------------------------------------------------------------


def _instant(wall: datetime, zone: tzinfo) -> datetime:
    """A naive wall time in ``zone`` as an aware UTC instant (the module's DST rules)."""
    first = wall.replace(tzinfo=zone, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=zone, fold=1).astimezone(UTC)
    if first <= second:  # exists (once, or twice: the first one)
        return first
    # In the spring-forward gap: fold=0 reads it with the offset before the jump, fold=1
    # with the one after; the jump itself lies in between. Find it to the microsecond.
    low, high = second, first
    after = high.astimezone(zone).utcoffset()
    while high - low > _US:
        mid = low + (high - low) / 2
        if mid.astimezone(zone).utcoffset() == after:
            high = mid
        else:
            low = mid
    return high


def next_fire(window: Window, zone: str, after: datetime) -> datetime | None:
    """The first fire strictly after ``after`` in ``zone`` (aware UTC), None if none."""
    tz = _zone(zone) or UTC
    if tz is UTC:
        fire = window.trigger.get_next_fire_time(None, after.astimezone(UTC) + _US)
        return None if fire is None else fire.astimezone(UTC)
    # Walk the wall clock from the wall reading of ``after``: no earlier wall time can
    # land after it (the mapping never goes backwards), a few later ones may not
    # (the second pass through a fall-back hour).
    wall = after.astimezone(tz).replace(tzinfo=UTC, fold=0)
    while True:
        candidate = window.trigger.get_next_fire_time(None, wall + _US)
        if candidate is None:
            return None
        instant = _instant(candidate.replace(tzinfo=None), tz)
        if instant > after:
            return instant
        wall = candidate


def last_fire(window: Window, zone: str, now: datetime, *, since: datetime) -> datetime | None:
    """The most recent fire in ``(since, now]`` (aware UTC), None if there was none."""
    if since >= now:
        return None
    span = timedelta(seconds=1)
    while True:
        start = max(since, now - span)
        fire = next_fire(window, zone, start)
        if fire is not None and fire <= now:
            while (following := next_fire(window, zone, fire)) is not None and following <= now:
                fire = following
            return fire
        if start == since:
            return None
        span *= 2


def is_open(window: Window, zone: str, now: datetime) -> bool:
    """Whether the window is open at ``now`` in ``zone``: a fire in ``(now - duration, now]``."""
    fire = next_fire(window, zone, now - window.duration)
    return fire is not None and fire <= now


def _close(window: Window, zone: str, opened: datetime) -> tuple[datetime, bool]:
    """When the opening that began with fire ``opened`` closes, following overlapping
    fires; ``False`` when the chain was cut off (still open then)."""
    close = opened + window.duration
    fire = opened
    end = opened + _HORIZON
    for _ in range(_MAX_CHAIN):
        if close > end:
            break
        fire_next = next_fire(window, zone, fire)
        if fire_next is None or fire_next > close:
            return close, True
        fire = fire_next
        close = fire + window.duration
    return close, False


def next_change(window: Window, zone: str, now: datetime) -> datetime:
    """When :func:`is_open` next changes after ``now`` (aware UTC), for a controller's
    wake-up; a "look again" time at most ``_HORIZON`` (8 days) ahead when it does not
    change by then (a window kept open by fires that always overlap)."""
    opened = next_fire(window, zone, now - window.duration)
    if opened is not None and opened <= now:
        return min(_close(window, zone, opened)[0], now + _HORIZON)
    fire = next_fire(window, zone, now)
    horizon = now + _HORIZON
    return horizon if fire is None else min(fire, horizon)


def next_open(window: Window, zone: str, now: datetime) -> datetime | None:
    """The next opening after ``now``: the next fire when closed; when open, the first
    fire after the current opening closes (None if there is none, or none in sight)."""
    opened = next_fire(window, zone, now - window.duration)
    if opened is None or opened > now:
        return next_fire(window, zone, now)
    close, closes = _close(window, zone, opened)
    return next_fire(window, zone, close) if closes else None


def window_states(
    window: Window, device_labels: Mapping[str, Mapping[str, str]], now: datetime
) -> dict[str, bool]:
    """Open or not, per device id: one :func:`is_open` per zone in use, not per device."""
    key = window.label_key
    if key is None:
        state = is_open(window, UTC_ZONE, now)
        return dict.fromkeys(device_labels, state)
    by_value: dict[str | None, bool] = {}
    states: dict[str, bool] = {}
    for device_id, labels in device_labels.items():
        value = labels.get(key)
        if value not in by_value:
            by_value[value] = is_open(window, zone_of(window, labels), now)
        states[device_id] = by_value[value]
    return states
