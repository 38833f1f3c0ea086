"""Database tables and API models for devices (SQLModel model family).

Rules:
- ``Device`` is the device table; its desired fields change only through
  :mod:`hub.devices.store` (called by :mod:`hub.devices.desired`), which bumps
  ``desired_generation`` in the same transaction (architecture rule 1).
- Device ids follow the wire contract (:func:`protocols.is_valid_device_id`), so an
  id accepted by the API is always a legal topic segment.
- Label keys and values are short, restricted strings: they end up in selectors and
  JSON-path queries, so they may not contain quotes, wildcards or spaces.
- Timestamps are stored as UTC and always come back timezone-aware.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, StringConstraints, field_validator
from pydantic import Field as PydanticField
from sqlalchemy import JSON, BigInteger, Column, Float, String
from sqlmodel import Field, SQLModel

import protocols
from hub.db import UTCDateTime
from hub.devices.labels import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_LABELS

WorkloadName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
LabelKey = Annotated[str, StringConstraints(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, StringConstraints(pattern=LABEL_VALUE_PATTERN)]
# additionalProperties false: a key outside LABEL_KEY_PATTERN is refused, and says so in the schema.
Labels = Annotated[
    dict[LabelKey, LabelValue],
    PydanticField(max_length=MAX_LABELS, json_schema_extra={"additionalProperties": False}),
]
DEVICE_ID_SCHEMA_PATTERN = f"^{protocols.DEVICE_ID_PATTERN}$"

ReportPhase = Literal["applied", "applying", "failed", "rolled_back", "staged"]


def _big(default: int) -> Any:
    return Field(default=default, sa_type=BigInteger, nullable=False)


class Device(SQLModel, table=True):
    """One registered device: its labels, desired document and last known state."""

    id: str = Field(sa_column=Column(String(64), primary_key=True))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))

    # desired state (hub -> device); written only by hub.devices.store
    desired_generation: int = _big(0)
    desired_config: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    desired_updated_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    # The device's own document (what PUT /devices/{id}/desired or /fleet/desired set):
    # the base layer; desired_config is it merged with the deployments assigned to the
    # device (hub.deployments.merge). Both written only by hub.devices.store.
    manual_config: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    # The deployments the placement controller assigned to the device (names, sorted), and
    # which source each workload of desired_config came from ({name: "deployment:X" |
    # "device"}).
    assignments: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    contributions: dict[str, str] = Field(
        default_factory=dict, sa_column=Column(JSON, nullable=False)
    )
    # The newest generation whose outcome (applied or failed) is in the device's event
    # history (hub.deployments: the placement controller records it).
    events_generation: int = _big(0)
    # A fleet-wide counter of desired changes (every transaction that changes desired
    # state takes the next value): the change feed a hub's link polls when other
    # processes serve the API (``hub serve --no-link``).
    desired_seq: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, index=True))

    # reported state (device -> hub); written only by hub.devices.rules (ingest)
    reported_generation: int = _big(0)
    failed_generation: int = _big(0)
    report_phase: str | None = Field(default=None, max_length=16)
    report_error: str | None = Field(default=None, max_length=2048)
    report_generation: int = _big(0)
    last_report_epoch: int = _big(-1)
    last_report_seq: int = _big(-1)

    # liveness
    session: int = _big(-1)
    online: bool = False
    last_seen: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    agent_version: str | None = Field(default=None, max_length=64)
    # When ``online`` last changed (ingest rules): failover counts continuous absence.
    online_changed_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    # The newest birth's inventory (protocols.Inventory as JSON); None until one arrives.
    inventory: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # The newest report's per-workload states (protocols.WorkloadStatus as JSON), and how
    # many events the device's outbox had to drop (its newest birth's count).
    workloads: list[dict[str, Any]] | None = Field(
        default=None, sa_column=Column(JSON, nullable=True)
    )
    events_dropped: int = _big(0)
    # Liveness and the rollout soak (ingest rules): the heartbeat interval the newest
    # birth announced; since when, and for how many reports in a row, the applied
    # generation's workloads were all healthy; the newest report that showed one of them
    # not healthy (or restarted); the newest generation the device staged (downloaded
    # and verified, not switched).
    heartbeat_s: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    healthy_since: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    healthy_reports: int = _big(0)
    unhealthy_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    staged_generation: int = _big(0)
    # Update locks held (protocols.LockStatus as JSON) as last reported, and the last
    # state of each one-shot job (protocols.JobStatus as JSON, newest 100 ids).
    locks: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    jobs: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))

    # decommissioning (hub.enrollment): the row stays visible until an operator purges it.
    # Set: the device's certificates are revoked and every message from it is refused.
    decommissioned_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    # When the broker confirmed it closed the device's live connections (the hub asks
    # Mosquitto's dynamic security plugin); None while that is pending.
    cut_off_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    # Set when a decommissioned id is enrolled again: nothing from the device counts until
    # a birth names one of its current certificates (the old unit's queued or still
    # delivered messages must not pass for the replacement's).
    awaiting_birth: bool = Field(default=False, nullable=False)


class DeviceDeletion(SQLModel, table=True):
    """A deleted device in the change feed: the link clears its retained desired document.

    Its ``seq`` is the feed's next value, as a desired change's is. Kept (a row per
    deletion, an operator's action): the newest feed value must survive the device
    row, or the next change would take the same value and a poller past it skip it.
    """

    __tablename__ = "device_deletion"

    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    device_id: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    deleted_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class DeviceCreate(SQLModel):
    """Body of ``POST /devices``."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    id: str = PydanticField(max_length=64, json_schema_extra={"pattern": DEVICE_ID_SCHEMA_PATTERN})
    labels: Labels = PydanticField(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _legal_id(cls, value: str) -> str:
        if not protocols.is_valid_device_id(value):
            raise ValueError(
                f"device id must match {protocols.DEVICE_ID_PATTERN} "
                "(1-64 characters; letters, digits, '_', '.', '-'; no '/', '+' or '#')"
            )
        return value


MAX_BATCH_DEVICES = 10_000


class DeviceBatchCreate(SQLModel):
    """Body of ``POST /devices/batch``: up to 10,000 devices in one transaction."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    devices: list[DeviceCreate] = PydanticField(min_length=1, max_length=MAX_BATCH_DEVICES)


class DeviceBatchResult(SQLModel):
    """What ``POST /devices/batch`` did: new ids, and ids that were already registered."""

    created: list[str]
    existing: list[str]


class ReportStatus(SQLModel):
    """The device's last report: what it was doing, for which generation, and why it failed."""

    phase: ReportPhase | None
    generation: int
    error: str | None


class InventoryPublic(SQLModel):
    """What the device said it is and has left, at its last connect (bytes)."""

    arch: str
    os: str
    cpu_count: int
    mem_total_bytes: int
    mem_free_bytes: int
    disk_total_bytes: int
    disk_free_bytes: int
    firmware_slot: str | None = None
    firmware_version: str | None = None
    cgroups: str | None = None


class WorkloadPublic(SQLModel):
    """One workload as the device last reported it."""

    name: str
    state: str
    restarts: int
    last_exit_code: int | None
    last_exit_at: float | None


class LockPublic(SQLModel):
    """An update lock held on the device: by whom, until when (device clock, unix s),
    and whether the hub's override lifts it."""

    workload: str
    holder: str
    until: float
    overridden: bool


class JobPublic(SQLModel):
    """A one-shot job's last reported state."""

    id: str
    state: str
    progress: int | None
    message: str | None
    exit_code: int | None
    log_tail: str | None
    started_at: float | None
    finished_at: float | None


MAX_OVERRIDE_S = 24 * 3600


class LockOverrideCreate(SQLModel):
    """Body of ``POST /devices/{id}/lock-override``: lift update locks for a while."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    # The workloads whose locks are lifted; null: every workload's.
    workloads: list[WorkloadName] | None = PydanticField(default=None, max_length=256)
    duration_s: int = PydanticField(ge=1, le=MAX_OVERRIDE_S)


_PHASES = frozenset({"applied", "applying", "failed", "rolled_back", "staged"})

DeviceState = Literal["active", "decommissioned"]


class DevicePublic(SQLModel):
    """A device as the API shows it."""

    id: str
    labels: dict[str, str]
    created_at: datetime
    desired_generation: int
    desired_config: dict[str, Any]
    desired_updated_at: datetime | None
    # Which deployments the device is assigned, and the source of each workload of
    # desired_config ("deployment:NAME" or "device", its own document).
    assignments: list[str]
    contributions: dict[str, str]
    reported_generation: int
    failed_generation: int
    report_phase: ReportPhase | None
    report_error: str | None
    report_generation: int
    last_report_epoch: int
    last_report_seq: int
    session: int
    online: bool
    last_seen: datetime | None
    online_changed_at: datetime | None
    agent_version: str | None
    inventory: InventoryPublic | None
    # Per workload: name, state, restarts, last exit (code and time); None until reported.
    workloads: list[WorkloadPublic] | None
    events_dropped: int
    # Liveness and the rollout soak: the heartbeat interval its birth announced; since
    # when and for how many reports in a row its applied generation was healthy; the
    # newest report that was not; the newest generation it staged (a held document).
    heartbeat_s: float | None
    healthy_since: datetime | None
    healthy_reports: int
    unhealthy_at: datetime | None
    staged_generation: int
    # Update locks held on the device now (as last reported); None until reported.
    locks: list[LockPublic] | None
    # The last state of each one-shot job, the most recently updated last.
    jobs: list[JobPublic] | None
    in_sync: bool
    status: ReportStatus
    # "decommissioned": revoked, refused, kept visible until purged (DELETE ?purge=true).
    state: DeviceState
    decommissioned_at: datetime | None
    # When the broker confirmed the decommissioned device's live connections closed.
    broker_cut_off_at: datetime | None

    @classmethod
    def from_row(cls, row: Device) -> DevicePublic:
        """Pure: the public view of a row (``in_sync`` and ``status`` are derived)."""
        columns = Device.__table__.columns  # type: ignore[attr-defined]
        return cls.model_validate(public_device({c.key: getattr(row, c.key) for c in columns}))


def public_device(row: Mapping[Any, Any]) -> dict[str, Any]:
    """Pure: the public view of a device row as plain values (``in_sync``, ``status`` derived).

    The one definition of :class:`DevicePublic`'s content: the API's fast reads
    encode it directly, :meth:`DevicePublic.from_row` validates it.
    """
    phase = row["report_phase"] if row["report_phase"] in _PHASES else None
    inventory = row["inventory"]
    return {
        "id": row["id"],
        "labels": row["labels"],
        "created_at": row["created_at"],
        "desired_generation": row["desired_generation"],
        "desired_config": row["desired_config"],
        "desired_updated_at": row["desired_updated_at"],
        "assignments": row["assignments"],
        "contributions": row["contributions"],
        "reported_generation": row["reported_generation"],
        "failed_generation": row["failed_generation"],
        "report_phase": phase,
        "report_error": row["report_error"],
        "report_generation": row["report_generation"],
        "last_report_epoch": row["last_report_epoch"],
        "last_report_seq": row["last_report_seq"],
        "session": row["session"],
        "online": row["online"],
        "last_seen": row["last_seen"],
        "online_changed_at": row["online_changed_at"],
        "agent_version": row["agent_version"],
        "inventory": (
            # .get: a birth from before a field was added (firmware slot, cgroups) lacks it
            {key: inventory.get(key) for key in InventoryPublic.model_fields} if inventory else None
        ),
        "workloads": row["workloads"],
        "events_dropped": row["events_dropped"],
        "heartbeat_s": row["heartbeat_s"],
        "healthy_since": row["healthy_since"],
        "healthy_reports": row["healthy_reports"],
        "unhealthy_at": row["unhealthy_at"],
        "staged_generation": row["staged_generation"],
        "locks": row["locks"],
        "jobs": row["jobs"],
        "in_sync": row["reported_generation"] == row["desired_generation"],
        "status": {
            "phase": phase,
            "generation": row["report_generation"],
            "error": row["report_error"],
        },
        "state": "active" if row["decommissioned_at"] is None else "decommissioned",
        "decommissioned_at": row["decommissioned_at"],
        "broker_cut_off_at": row["cut_off_at"],
    }


class DevicePage(SQLModel):
    """One page of ``GET /devices``."""

    items: list[DevicePublic]
    total: int
    limit: int
    offset: int


class DesiredUpdate(SQLModel):
    """Body of ``PUT /devices/{id}/desired``: the whole document, never a delta."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    config: dict[str, Any]


class Selector(SQLModel):
    """Which devices a bulk change targets: all whose labels include every pair given.

    An empty ``labels`` mapping matches every device.
    """

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    labels: Labels = PydanticField(default_factory=dict)


class FleetDesiredUpdate(SQLModel):
    """Body of ``PUT /fleet/desired``; no selector means every device."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    selector: Selector | None = None
    config: dict[str, Any]


class LabelsUpdate(SQLModel):
    """Body of ``PUT /devices/{id}/labels``: the whole label set."""

    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    labels: Labels


LabelsPatch = Annotated[
    dict[LabelKey, LabelValue | None],
    PydanticField(max_length=MAX_LABELS, json_schema_extra={"additionalProperties": False}),
]
"""Body of ``PATCH /devices/{id}/labels``: an RFC 7386 merge patch (null removes a key)."""


class DeviceGeneration(SQLModel):
    id: str
    generation: int


class FleetDesiredResult(SQLModel):
    updated: int
    devices: list[DeviceGeneration]


class FleetSummary(SQLModel):
    """Counts over active devices; decommissioned ones are counted apart."""

    total: int
    online: int
    in_sync: int
    out_of_sync: int
    failed: int
    by_generation: dict[int, int]
    decommissioned: int
