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
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, StringConstraints
from pydantic import Field as PydanticField
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
    # The planner's notes, newest last, capped ("wave 2 started", "threshold crossed ...").
    notes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # Failures an operator resumed past: the threshold counts only failures beyond them.
    accepted_failures: int = Field(default=0, sa_column=Column(Integer, nullable=False))
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


# ---------------------------------------------------------------- the policy (API shape)
# The shape of a deployment spec's ``rollout`` member; its meaning (a percent of a
# wave, activate_at only with prestage, ...) is checked by
# :func:`hub.controllers.rollout.policy.parse_policy`, which the store calls.

Percent = Annotated[str, StringConstraints(pattern=r"^(100|[1-9][0-9]?)(\.[0-9]+)?%$")]
WindowName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]


class _Strict(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]


class CanaryIn(_Strict):
    count: int | None = PydanticField(default=None, ge=1, le=100_000)
    percent: float | None = PydanticField(default=None, gt=0, le=100)


class RateIn(_Strict):
    per_minute: float = PydanticField(gt=0, le=1_000_000)
    growth_factor: float = PydanticField(default=1.0, ge=1.0, le=100.0)
    growth_after: int = PydanticField(default=0, ge=0, le=1_000_000)


class SoakIn(_Strict):
    seconds: float = PydanticField(default=0.0, ge=0, le=7 * 86400)
    reports: int = PydanticField(default=0, ge=0, le=10_000)


class ThresholdIn(_Strict):
    count: int | None = PydanticField(default=None, ge=1, le=1_000_000)
    percent: float | None = PydanticField(default=None, gt=0, le=100)
    min_reported: int = PydanticField(default=1, ge=1, le=1_000_000)
    action: Literal["abort", "pause"] = "abort"


class QuorumIn(_Strict):
    percent: float = PydanticField(gt=0, le=100)
    within_s: float = PydanticField(gt=0, le=30 * 86400)


class RolloutPolicyIn(_Strict):
    """How a change of the deployment's workloads reaches its devices (docs/rollouts.md)."""

    strategy: Literal["all-at-once", "canary", "waves"] = "all-at-once"
    canary: CanaryIn | None = None
    pause_s: float | None = PydanticField(default=None, ge=0, le=30 * 86400)
    waves: list[Annotated[int, PydanticField(ge=1, le=1_000_000)] | Percent] | None = PydanticField(
        default=None, min_length=1, max_length=100
    )
    max_in_flight: int | None = PydanticField(default=None, ge=1, le=1_000_000)
    rate: RateIn | None = None
    soak: SoakIn | None = None
    failure_threshold: ThresholdIn | None = None
    quorum: QuorumIn | None = None
    apply_deadline_s: float = PydanticField(default=600.0, gt=0, le=30 * 86400)
    progress_deadline_s: float = PydanticField(default=1800.0, gt=0, le=30 * 86400)
    on_progress_deadline: Literal["pause", "abort"] = "pause"
    prestage: bool = False
    activate_at: datetime | None = None
    start_at: datetime | None = None
    window: WindowName | None = None


# ---------------------------------------------------------------- views (API shape)

RolloutAction = Literal["pause", "resume", "abort", "promote", "retry-failed"]


class RolloutCommand(_Strict):
    """Body of ``POST /deployments/{name}/rollout/{action}`` (optional)."""

    reason: str = PydanticField(default="", max_length=256)


class RolloutWave(SQLModel):
    index: int
    size: int
    counts: dict[str, int]


class FailedDevice(SQLModel):
    device_id: str
    state: str
    detail: str


class RolloutPublic(SQLModel):
    """A rollout as the API shows it (docs/rollouts.md, "Status")."""

    id: int
    deployment: str
    from_version: int | None
    to_version: int
    state: str
    reason: str
    wave: int
    waves: list[RolloutWave]
    counts: dict[str, int]
    targeted: int
    staged: int
    policy: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress_deadline_at: datetime | None
    failed_devices: list[FailedDevice]
    unknown_devices: list[str]
    notes: list[str]


class RolloutList(SQLModel):
    items: list[RolloutPublic]


class RolloutDevicePublic(SQLModel):
    """One device of a rollout: its wave, where it stands (``waiting_window``: its
    maintenance window is closed; it has the held document), what it was handed."""

    device_id: str
    wave: int
    state: str
    generation: int | None
    handed_out_at: datetime | None
    staged_at: datetime | None
    outcome_at: datetime | None
    detail: str


class RolloutDevicePage(SQLModel):
    items: list[RolloutDevicePublic]
    total: int
    limit: int
    offset: int
