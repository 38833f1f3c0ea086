"""Jobs: tables and API models (SQLModel model family).

Rules:
- A ``Job`` is one command an operator queued for one device or a selector, with
  an expiry (never handed out after it) and a deadline the device enforces.
- ``JobDevice`` is the job on one device: ``seq`` orders a device's jobs (delivered
  in that order), ``state`` is one of queued, in_progress, succeeded, failed,
  timed_out, canceled, expired; the device's results are kept here.
- ``Job.state``: running, paused, completed, aborted, canceled
  (``hub/controllers/jobs/plan.py`` says when each happens).
- The API's body is strict (unknown members refused); the agent's own rules for an
  entry (``edge_agent/jobs.py``: id, command, deadline, env names) are checked here
  too, so a job the agent would refuse is refused at the door.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, StringConstraints, model_validator
from pydantic import Field as PydanticField
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


# ---------------------------------------------------------------- the API (docs/jobs.md)

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
"""The agent's job id rule (``edge_agent.jobs.JOB_ID``)."""
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
MAX_DEADLINE_S = 7 * 24 * 3600.0
MAX_EXPIRES_IN_S = 30 * 24 * 3600.0
MAX_ENTRY_BYTES = 16 * 1024
"""A job's document entry at most (a device's document carries up to 8 open jobs)."""
JobId = Annotated[str, StringConstraints(pattern=JOB_ID_PATTERN)]
Arg = Annotated[str, StringConstraints(max_length=4096)]
EnvName = Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]
EnvValue = Annotated[str, StringConstraints(max_length=4096)]
JobState = Literal["running", "paused", "completed", "aborted", "canceled"]
DeviceJobState = Literal[
    "queued", "in_progress", "succeeded", "failed", "timed_out", "canceled", "expired"
]


class _Strict(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]


class JobRate(_Strict):
    """Hand-outs per minute, growing by ``growth_factor`` after every ``growth_after``
    devices succeeded."""

    per_minute: int = PydanticField(ge=1, le=1_000_000)
    growth_factor: float = PydanticField(default=1.0, ge=1.0, le=100.0)
    growth_after: int = PydanticField(default=0, ge=0, le=1_000_000)


class JobFailureThreshold(_Strict):
    """Stop the job when ``count`` devices, or ``percent`` of those that reported,
    failed (failed + timed_out), once ``min_reported`` reported; default 20 percent."""

    count: int | None = PydanticField(default=None, ge=1, le=1_000_000)
    percent: float | None = PydanticField(default=None, gt=0, le=100)
    min_reported: int = PydanticField(default=1, ge=1, le=1_000_000)
    action: Literal["abort", "pause"] = "abort"

    @model_validator(mode="after")
    def _one_measure(self) -> JobFailureThreshold:
        if self.count is not None and self.percent is not None:
            raise ValueError("failure_threshold takes count or percent, not both")
        return self


class JobRollout(_Strict):
    """How a job spreads over its devices (the shapes of a deployment's ``rollout``)."""

    max_in_flight: int | None = PydanticField(default=None, ge=1, le=1_000_000)
    rate: JobRate | None = None
    failure_threshold: JobFailureThreshold | None = None


class JobCreate(_Strict):
    """Body of ``POST /jobs``: one command for ``device_id`` or a ``selector``'s devices."""

    id: JobId | None = None
    command: list[Arg] = PydanticField(min_length=1, max_length=256)
    deadline_s: float = PydanticField(gt=0, le=MAX_DEADLINE_S)
    env: dict[EnvName, EnvValue] = PydanticField(default_factory=dict, max_length=64)
    idempotent: bool = False
    device_id: str | None = PydanticField(default=None, max_length=64)
    selector: str | None = PydanticField(default=None, max_length=1024)
    expires_in_s: float = PydanticField(default=86400.0, gt=0, le=MAX_EXPIRES_IN_S)
    rollout: JobRollout | None = None

    @model_validator(mode="after")
    def _one_target(self) -> JobCreate:
        if (self.device_id is None) == (self.selector is None):
            raise ValueError("give exactly one of device_id and selector")
        if not self.command[0]:
            raise ValueError("command: the program (the first element) must not be empty")
        return self


class JobDevicePublic(SQLModel):
    """The job on one device: its state and, once it finished, its result."""

    device_id: str
    seq: int
    state: DeviceJobState
    queued_at: datetime
    handed_out_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    message: str | None
    log_tail: str | None


class JobPublic(SQLModel):
    """A job, its counts per device state and (one job's view) its devices."""

    id: str
    command: list[str]
    deadline_s: float
    env: dict[str, str]
    idempotent: bool
    device_id: str | None
    selector: str | None
    rollout: dict[str, Any]
    state: JobState
    reason: str
    created_at: datetime
    expires_at: datetime
    canceled_at: datetime | None
    finished_at: datetime | None
    targeted: int
    counts: dict[str, int]
    devices: list[JobDevicePublic] | None = None
    devices_total: int | None = None


class JobList(SQLModel):
    items: list[JobPublic]


class JobCancel(_Strict):
    """Optional body of ``POST /jobs/{id}/cancel``."""

    reason: str = PydanticField(default="", max_length=256)
