"""Deployments: tables and API models (SQLModel model family).

Rules:
- A ``Deployment`` row holds the operator's spec as validated JSON and a
  ``version`` that grows by one with every change; rows are written only by
  :mod:`hub.deployments.store`.
- What the placement controller decided is in the database, never only in memory
  (a restarted hub plans from it and changes nothing): ``DeploymentInstance`` (one
  row per replica of a ``placed`` deployment, with its reschedule history),
  ``Unplaced`` (every device a deployment matched but could not be placed on, with
  the reasons), the device's ``assignments`` and ``contributions`` columns, and
  ``DeviceEvent`` (each device's history).
- The spec's shape is declared here once (the API schema, and ``ctl``'s JSON Schema
  mirrors it; a test keeps them in step); its meaning (selector syntax, constraint
  attributes) is checked by :func:`hub.deployments.spec_io.to_spec`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, StringConstraints
from pydantic import Field as PydanticField
from sqlalchemy import JSON, BigInteger, Column, Float, Integer, String
from sqlmodel import Field, SQLModel

from hub.db import UTCDateTime
from hub.rollouts.models import RolloutPolicyIn

DEPLOYMENT_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
DeploymentName = Annotated[str, StringConstraints(pattern=DEPLOYMENT_NAME_PATTERN)]
Kind = Literal["fleet", "placed"]
ConstraintOp = Literal["=", "!=", "in", "notin", "exists", "!exists", "<", "<=", ">", ">="]
Attribute = Annotated[
    str,
    StringConstraints(
        pattern=r"^(arch|os|agent_version|cpu_count|mem_total_bytes|disk_total_bytes"
        r"|label\.[A-Za-z0-9][A-Za-z0-9_./-]{0,62}|inventory\.[a-z_]{1,64})$"
    ),
]
Scalar = Annotated[str, StringConstraints(max_length=256)] | int | float
EVENT_KINDS = ("placed", "moved", "unplaced", "applied", "failed", "online", "offline")
EventKind = Literal["placed", "moved", "unplaced", "applied", "failed", "online", "offline"]


# ---------------------------------------------------------------- tables


class Deployment(SQLModel, table=True):
    """A deployment as the operator declared it."""

    name: str = Field(sa_column=Column(String(63), primary_key=True))
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    version: int = Field(default=1, sa_column=Column(BigInteger, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class DeploymentInstance(SQLModel, table=True):
    """One replica of a ``placed`` deployment: where it runs and how it got there."""

    __tablename__ = "deployment_instance"

    deployment: str = Field(sa_column=Column(String(63), primary_key=True))
    idx: int = Field(sa_column=Column(Integer, primary_key=True, autoincrement=False))
    device_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    placed_at: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    original_device_id: str | None = Field(
        default=None, sa_column=Column(String(64), nullable=True)
    )
    # [{"at", "from_device", "to_device", "reason"}], oldest first, capped.
    history: list[dict[str, Any]] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False)
    )
    attempts: int = Field(default=0, sa_column=Column(Integer, nullable=False))
    next_attempt_at: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    reason: str | None = Field(default=None, sa_column=Column(String(512), nullable=True))


class Unplaced(SQLModel, table=True):
    """A device a deployment's selector matched that it could not be placed on, and why."""

    deployment: str = Field(sa_column=Column(String(63), primary_key=True))
    device_id: str = Field(sa_column=Column(String(64), primary_key=True))
    reasons: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))


class DeviceEvent(SQLModel, table=True):
    """One entry of a device's orchestration history."""

    __tablename__ = "device_event"

    id: int | None = Field(default=None, sa_column=Column(Integer, primary_key=True))
    device_id: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    deployment: str | None = Field(default=None, sa_column=Column(String(63), nullable=True))
    generation: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    detail: str = Field(default="", sa_column=Column(String(1024), nullable=False))


# ---------------------------------------------------------------- the spec (API shape)


class _Strict(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]


class Constraint(_Strict):
    """A hard rule a device must meet: ``attribute op value(s)``."""

    attribute: Attribute
    op: ConstraintOp
    value: Scalar | None = None
    values: list[Annotated[str, StringConstraints(max_length=256)]] | None = PydanticField(
        default=None, max_length=64
    )


class Affinity(_Strict):
    """A soft preference: devices meeting it score ``weight`` (-100..100) more."""

    attribute: Attribute
    op: ConstraintOp
    value: Scalar | None = None
    values: list[Annotated[str, StringConstraints(max_length=256)]] | None = PydanticField(
        default=None, max_length=64
    )
    weight: int = PydanticField(ge=-100, le=100)


class Resources(_Strict):
    """What each device that runs the deployment must have room for."""

    memory_bytes: int = PydanticField(default=0, ge=0, le=2**50)
    disk_bytes: int = PydanticField(default=0, ge=0, le=2**53)


class Spread(_Strict):
    """Spread a placed deployment's instances over the values of an attribute."""

    attribute: Attribute
    targets: dict[Annotated[str, StringConstraints(max_length=63)], int] | None = PydanticField(
        default=None, max_length=64
    )


class Reschedule(_Strict):
    """Capped exponential backoff between moves of one instance."""

    delay_s: float = PydanticField(default=30.0, ge=0, le=86400)
    max_delay_s: float = PydanticField(default=3600.0, ge=0, le=7 * 86400)


class DeploymentSpecIn(_Strict):
    """What runs where: the body's ``spec`` (and a YAML document's ``spec:``)."""

    selector: str = PydanticField(default="", max_length=1024)
    priority: int = PydanticField(default=0, ge=-1000, le=1000)
    kind: Kind = "fleet"
    replicas: int | None = PydanticField(default=None, ge=0, le=10000)
    workloads: list[dict[str, Any]] = PydanticField(max_length=64)
    constraints: list[Constraint] = PydanticField(default_factory=list, max_length=64)
    resources: Resources = PydanticField(default_factory=Resources)
    spread: Spread | None = None
    distinct: list[Attribute] = PydanticField(default_factory=list, max_length=8)
    affinities: list[Affinity] = PydanticField(default_factory=list, max_length=64)
    lost_after_s: float = PydanticField(default=300.0, ge=0, le=30 * 86400)
    reschedule: Reschedule = PydanticField(default_factory=Reschedule)
    reconcile: Literal["keep_replacement"] = "keep_replacement"
    rollout: RolloutPolicyIn | None = None


class DeploymentPut(_Strict):
    """Body of ``PUT /deployments/{name}``."""

    spec: DeploymentSpecIn


class DeploymentStatus(SQLModel):
    """Counts over a deployment's devices (docs/orchestration.md, "Status")."""

    targeted: int
    placed: int
    unplaceable: int
    in_sync: int
    failed: int
    offline: int
    reasons: dict[str, int]
    instances: list[dict[str, Any]]


class DeploymentPublic(SQLModel):
    name: str
    spec: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime
    status: DeploymentStatus | None = None


class DeploymentPage(SQLModel):
    items: list[DeploymentPublic]
    total: int
    limit: int
    offset: int


class PreviewDevice(SQLModel):
    device_id: str
    generation_bump: bool
    added: list[str]
    removed: list[str]
    changed: list[str]
    before: dict[str, Any]
    after: dict[str, Any]
    contributions: dict[str, str]
    ties: list[str]


class PreviewUnplaceable(SQLModel):
    device_id: str
    reasons: list[str]


class PreviewSummary(SQLModel):
    changed: int
    unchanged: int
    unplaceable: int


class Preview(SQLModel):
    """What a deployment change would do, device by device, before it is made."""

    devices: list[PreviewDevice]
    unplaceable: list[PreviewUnplaceable]
    summary: PreviewSummary


class DeploymentChange(SQLModel):
    """Answer of ``PUT /deployments/{name}`` (with or without ``dry_run``)."""

    deployment: DeploymentPublic
    preview: Preview
    dry_run: bool


class DeploymentRemoval(SQLModel):
    preview: Preview
    dry_run: bool


class DeviceEventPublic(SQLModel):
    at: datetime
    kind: EventKind
    deployment: str | None
    generation: int | None
    detail: str


class DeviceEventPage(SQLModel):
    items: list[DeviceEventPublic]
    total: int
    limit: int
    offset: int
