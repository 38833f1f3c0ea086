"""Jobs: tables (SQLModel model family).

Rules:
- A ``Job`` is one command an operator queued for one device or a selector, with
  an expiry (never handed out after it) and a deadline the device enforces.
- ``JobDevice`` is the job on one device: ``seq`` orders a device's jobs (delivered
  in that order), ``state`` is one of queued, in_progress, succeeded, failed,
  timed_out, canceled, expired; the device's results are kept here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, Float, Integer, String
from sqlmodel import Field, SQLModel

from hub.db import UTCDateTime


class Job(SQLModel, table=True):
    """A one-shot command for a device or a selector's devices."""

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    command: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    deadline_s: float = Field(sa_column=Column(Float, nullable=False))
    env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    idempotent: bool = Field(default=False, sa_column=Column(Boolean, nullable=False))
    device_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    selector: str | None = Field(default=None, sa_column=Column(String(1024), nullable=True))
    policy: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    reason: str = Field(default="", sa_column=Column(String(512), nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    canceled_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class JobDevice(SQLModel, table=True):
    """One job on one device."""

    __tablename__ = "job_device"

    job_id: str = Field(sa_column=Column(String(64), primary_key=True))
    device_id: str = Field(sa_column=Column(String(64), primary_key=True, index=True))
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: str = Field(sa_column=Column(String(16), nullable=False))
    queued_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    handed_out_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    started_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    exit_code: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    message: str | None = Field(default=None, sa_column=Column(String(256), nullable=True))
    log_tail: str | None = Field(default=None, sa_column=Column(String(4096), nullable=True))
