"""Rollouts: tables (SQLModel model family).

Rules:
- A ``Rollout`` is one change of one deployment (``from_version`` -> ``to_version``,
  with both specs kept whole, so an abort can restore the previous one exactly).
- Everything the rollout controller decides is in these rows; a restarted hub
  carries on from them. ``lease_owner``/``lease_until`` say which hub process may
  advance the rollout now (two never both do).
- ``RolloutDevice`` is one touched (or still to be touched) device: its wave, its
  state and the generation handed out to it, and when.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Integer, String
from sqlmodel import Field, SQLModel

from hub.db import UTCDateTime


def _at(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UTCDateTime, nullable=nullable))


class Rollout(SQLModel, table=True):
    """One deployment change rolling out (or rolled out, aborted, superseded)."""

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    deployment: str = Field(sa_column=Column(String(63), nullable=False, index=True))
    from_version: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    to_version: int = Field(sa_column=Column(BigInteger, nullable=False))
    from_spec: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    to_spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    policy: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(sa_column=Column(String(24), nullable=False, index=True))
    reason: str = Field(default="", sa_column=Column(String(512), nullable=False))
    wave: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    # [[device id, ...], ...]: fixed when the rollout starts.
    waves: list[list[str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # The highest wave index an operator promoted past a pause (-1: none).
    promoted: int = Field(default=-1, sa_column=Column(Integer, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    started_at: datetime | None = _at()
    wave_started_at: datetime | None = _at()
    progress_at: datetime | None = _at()
    finished_at: datetime | None = _at()
    start_at: datetime | None = _at()
    activate_at: datetime | None = _at()
    lease_owner: str | None = Field(default=None, sa_column=Column(String(128), nullable=True))
    lease_until: datetime | None = _at()


class RolloutDevice(SQLModel, table=True):
    """One device of a rollout: where it stands and what it was handed."""

    __tablename__ = "rollout_device"

    rollout_id: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    wave: int = Field(sa_column=Column(Integer, nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    generation: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    handed_out_at: datetime | None = _at()
    staged_at: datetime | None = _at()
    outcome_at: datetime | None = _at()
    detail: str = Field(default="", sa_column=Column(String(512), nullable=False))
