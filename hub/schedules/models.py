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

from sqlalchemy import Column, Float, String
from sqlmodel import Field, SQLModel

from hub.db import UTCDateTime


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
