"""Schedules: tables (SQLModel model family).

Rules:
- A ``Schedule`` is a recurring maintenance window: a cron expression (when it
  opens) and a duration, in UTC or in each device's time zone (``label:<key>``:
  the zone named by the device's label ``<key>``). The table is the source of
  truth; the scheduler's in-memory job store is rebuilt from it at start.
- ``ScheduleFire`` records each fire once: (schedule, fire time, zone) is the key,
  so a fire never runs twice, even across a restart or two schedulers.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ConfigDict
from pydantic import Field as PydanticField
from sqlalchemy import Column, Float, String
from sqlmodel import Field, SQLModel

from hub.db import UTCDateTime
from hub.devices.labels import LABEL_KEY_PATTERN
from hub.schedules.window import MAX_DURATION_S


class Schedule(SQLModel, table=True):
    """A recurring maintenance window."""

    name: str = Field(sa_column=Column(String(63), primary_key=True))
    cron: str = Field(sa_column=Column(String(128), nullable=False))
    duration_s: float = Field(sa_column=Column(Float, nullable=False))
    timezone: str = Field(sa_column=Column(String(128), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class ScheduleFire(SQLModel, table=True):
    """One fire of a schedule (in one zone), recorded once."""

    __tablename__ = "schedule_fire"

    schedule: str = Field(sa_column=Column(String(63), primary_key=True))
    fire_time: datetime = Field(sa_column=Column(UTCDateTime, primary_key=True))
    zone: str = Field(sa_column=Column(String(64), primary_key=True))
    recorded_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    outcome: str = Field(sa_column=Column(String(16), nullable=False))


# -- the API's shapes ------------------------------------------------------------------

WINDOW_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class WindowPut(SQLModel):
    """Body of ``PUT /windows/{name}``: the window, whole."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    cron: str = PydanticField(
        max_length=128,
        description="when it opens: 5 crontab fields (minute hour day month day-of-week; "
        "0 or 7 = Sunday), or 6 with a leading second field",
        examples=["0 2 * * *"],
    )
    duration_s: float = PydanticField(
        gt=0, le=MAX_DURATION_S, allow_inf_nan=False, description="how long it stays open"
    )
    timezone: str = PydanticField(
        default="UTC",
        max_length=128,
        pattern=f"^(UTC|label:{LABEL_KEY_PATTERN[1:-1]})$",
        description='"UTC", or "label:<key>": each device\'s zone from its label <key> '
        '(an IANA name with "/" written ".", e.g. Europe.Berlin)',
    )


class WindowZone(SQLModel):
    """A zone the window runs in, with how many devices are in it."""

    zone: str
    devices: int
    open_now: bool
    next_change: datetime
    next_open: datetime | None


class UnzonedDevice(SQLModel):
    device_id: str
    reason: str


class WindowPublic(SQLModel):
    """A window as the API shows it; ``open_now`` and ``next_open`` are for UTC."""

    name: str
    cron: str
    duration_s: float
    timezone: str
    created_at: datetime
    updated_at: datetime
    open_now: bool
    closes_at: datetime | None = Field(
        default=None, description="when open now (UTC): when it closes"
    )
    next_open: datetime | None
    # Only in GET /windows/{name} of a label window: the zones its devices are in, and
    # the devices that fell back to UTC (no label, or a value that names no zone).
    zones: list[WindowZone] | None = None
    unzoned_devices: int | None = None
    unzoned: list[UnzonedDevice] | None = None


class WindowPage(SQLModel):
    items: list[WindowPublic]
