"""The rollout controller's driver: read, step every active rollout, commit, signal.

Rules:
- One look is one write transaction: every active rollout this hub may advance (its
  lease is free, expired or this hub's), the evidence of its devices (online, the
  generations they reported applied, failed and staged, the soak evidence, their
  maintenance window), the pure planner's step (:func:`hub.controllers.rollout.plan.step`)
  for each, the rows it changed, and, when a device's version changed (handed out,
  held, restored by an abort), the fleet's documents composed again in the same
  transaction (:func:`hub.deployments.reconcile.run_in_transaction`); then delivery
  is signalled for every bumped device.
- Two hubs never both advance one rollout: the write transaction serialises the looks
  (SQLite's write lock; ``SELECT ... FOR UPDATE`` elsewhere), and each look takes the
  rollout's lease (``lease_owner``, ``lease_until``) for ``rollout_lease_s``, so
  another hub leaves it alone until this one stops renewing it.
- A scheduled rollout fixes its waves when it starts: the devices its deployment is
  assigned to then, in a stable order spread by a hash of the rollout and the device
  id (so a canary is not always the same few devices).
- Woken by the link's fan-out (a change committed, a command), by its interval while
  a rollout is active (reports arrive all the time), and by the planner's timers.
  What it keeps in memory is pacing: a restarted hub carries on from the rows.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Table, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from hub.context import Clock
from hub.controllers.loop import ControllerLoop
from hub.controllers.rollout.plan import Evidence, build_waves, step
from hub.db import begin_write, epoch, new_session
from hub.deployments import reconcile
from hub.devices.desired import DeliverySignal
from hub.devices.models import Device
from hub.mqtt.session import MqttSession
from hub.rollouts import store
from hub.rollouts.gate import TERMINAL
from hub.rollouts.models import Rollout, RolloutDevice
from hub.schedules.models import Schedule
from hub.schedules.window import WindowError, parse_window, window_states
from hub.settings import HubSettings

log = logging.getLogger(__name__)

_DEVICES: Table = Device.__table__  # type: ignore[attr-defined]
_ROLLOUTS: Table = Rollout.__table__  # type: ignore[attr-defined]
_TARGETS: Table = RolloutDevice.__table__  # type: ignore[attr-defined]
_SCHEDULES: Table = Schedule.__table__  # type: ignore[attr-defined]
# What every look reads of every device: plain columns only. The JSON ones (labels for
# windows, assignments for a starting rollout's members) are read when needed: decoding
# them for a whole fleet on every look was a third of a look's CPU (docs/benchmarks.md,
# "Rollouts").
_EVIDENCE_COLUMNS = (
    "id",
    "online",
    "decommissioned_at",
    "reported_generation",
    "failed_generation",
    "staged_generation",
    "healthy_since",
    "healthy_reports",
    "unhealthy_at",
    "report_error",
)
_ACTIVE = sa_select(_ROLLOUTS.c.state, _ROLLOUTS.c.start_at).where(
    _ROLLOUTS.c.state.notin_(TERMINAL)
)
_IDLE_LOOK_S = 60.0


def hub_identity(settings: HubSettings) -> str:
    """Who holds a lease: the hub with this MQTT client id on this host. Not the process:
    a hub restarted in its place carries on at once instead of waiting out its own
    lease (two live hubs cannot share a client id: the broker keeps one connection)."""
    return f"{socket.gethostname()}:{settings.mqtt_client_id}"[:128]


class RolloutController:
    """Advances every active rollout from the evidence its devices report."""

    def __init__(
        self,
        *,
        engine: Engine,
        settings: HubSettings,
        clock: Clock,
        delivery: DeliverySignal,
        owner: str | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._clock = clock
        self._delivery = delivery
        self._owner = owner or hub_identity(settings)
        self._loop = ControllerLoop(self._step)
        self.looks = 0
        self.advances = 0

    def attach(self, session: MqttSession) -> None:
        session.while_connected("rollouts", self._loop.run)

    def wake(self) -> None:
        self._loop.wake()

    async def _step(self) -> float | None:
        return await asyncio.to_thread(self.look)

    def look(self) -> float | None:
        """One look (module rules); returns when to look again (None: when woken)."""
        self.looks += 1
        now = self._clock()
        with new_session(self._engine) as session:
            active = session.connection().execute(_ACTIVE).all()
            session.rollback()
            if not active:
                return None
            # Only rollouts scheduled for later: nothing to read until the first is due.
            due = [start for state, start in active if state != "scheduled" or start is None]
            if not due:
                first: datetime = min(start for _, start in active)
                if first > now:
                    return min(float((first - now).total_seconds()), _IDLE_LOOK_S)
            bumped, wake_after = advance(
                session,
                now=now,
                owner=self._owner,
                lease_s=self._settings.rollout_lease_s,
                max_config_bytes=self._settings.max_config_bytes,
            )
        self.advances += 1
        if bumped:
            self._delivery.desired_changed(bumped)
        interval = self._settings.rollout_interval_s
        return interval if wake_after is None else max(0.0, min(interval, wake_after))


def advance(
    session: Session,
    *,
    now: datetime,
    owner: str,
    lease_s: float,
    max_config_bytes: int,
) -> tuple[tuple[str, ...], float | None]:
    """Step every active rollout ``owner`` may advance, in one write transaction that
    this commits; returns the devices whose generation was bumped and when the planners
    want to look again (seconds).

    A look first steps in a read transaction: when no rollout would change (the planner
    is pure, so the same rows give the same step) and no lease needs renewing, it ends
    there, without taking the write lock that ingest's reports wait for."""
    quiet, wake = _quiet(session, now=now, owner=owner, lease_s=lease_s)
    session.rollback()
    if quiet:
        return (), wake
    begin_write(session)
    try:
        bumped, wake_after = _advance(
            session, now=now, owner=owner, lease_s=lease_s, max_config_bytes=max_config_bytes
        )
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return bumped, wake_after


def _advance(
    session: Session, *, now: datetime, owner: str, lease_s: float, max_config_bytes: int
) -> tuple[tuple[str, ...], float | None]:
    connection = session.connection()
    active = _read(connection, lock=True)
    if not active:
        return (), None
    rows = [r for r in active if _may_advance(r, owner, now)]
    if not rows:
        return (), lease_s  # another hub holds them: look again when its lease may lapse
    devices = _read_devices(connection)
    recompose = False
    wakes: list[float] = []
    for row in rows:
        changed, wake = _advance_one(
            connection, row, devices, now=now, owner=owner, lease_s=lease_s
        )
        recompose = recompose or changed
        if wake is not None:
            wakes.append(wake)
    bumped: tuple[str, ...] = ()
    if recompose:
        outcome = reconcile.run_in_transaction(session, now=now, max_config_bytes=max_config_bytes)
        bumped = outcome.bumped
    return bumped, min(wakes) if wakes else None


def _read(connection: Any, *, lock: bool) -> list[dict[str, Any]]:
    query = sa_select(_ROLLOUTS).where(_ROLLOUTS.c.state.notin_(TERMINAL)).order_by(_ROLLOUTS.c.id)
    return [
        dict(r) for r in connection.execute(query.with_for_update() if lock else query).mappings()
    ]


def _read_devices(connection: Any) -> dict[str, dict[str, Any]]:
    return {
        row[0]: dict(zip(_EVIDENCE_COLUMNS, row, strict=True))
        for row in connection.execute(
            sa_select(*(_DEVICES.c[name] for name in _EVIDENCE_COLUMNS))
        ).all()
    }


def _quiet(
    session: Session, *, now: datetime, owner: str, lease_s: float
) -> tuple[bool, float | None]:
    """Whether a look would write nothing (every rollout steps to where it is, each
    lease this hub holds has more than half its time left), and when to look again."""
    connection = session.connection()
    active = _read(connection, lock=False)
    if not active:
        return True, None
    rows = [r for r in active if _may_advance(r, owner, now)]
    if not rows:
        return True, lease_s
    wakes: list[float] = []
    devices: dict[str, dict[str, Any]] | None = None
    for row in rows:
        lease_left = (
            (row["lease_until"] - now).total_seconds() if row["lease_until"] is not None else 0
        )
        if row["lease_owner"] != owner or lease_left < lease_s / 2:
            return False, None
        starts = row["state"] == "scheduled" and not row["waves"]
        if starts and (row["start_at"] is None or row["start_at"] <= now):
            return False, None
        if devices is None:
            devices = _read_devices(connection)
        decided, _targets, _evidence = _decide(connection, row, devices, now)
        if (
            decided.targets
            or decided.abort
            or decided.notes
            or store.state_values(decided.rollout, now)
            != store.state_values(store.state_of(row), now)
        ):
            return False, None
        if decided.wake_after_s is not None:
            wakes.append(decided.wake_after_s)
    return True, min(wakes) if wakes else None


def _decide(
    connection: Any, row: Mapping[str, Any], devices: Mapping[str, Mapping[str, Any]], now: datetime
) -> tuple[Any, list[dict[str, Any]], dict[str, Evidence]]:
    """The planner's step for one rollout from its rows and its devices' evidence."""
    policy = store.policy_of(row)
    targets = store.read_targets(connection, row["id"])
    windows = _windows(connection, policy, targets, now)
    evidence = {t["device_id"]: _evidence(t, devices.get(t["device_id"]), windows) for t in targets}
    decided = step(
        policy,
        store.state_of(row),
        [store.target_of(t) for t in targets],
        evidence,
        now.timestamp(),
    )
    return decided, targets, evidence


def _may_advance(row: Mapping[str, Any], owner: str, now: datetime) -> bool:
    return (
        row["lease_owner"] in (None, owner)
        or row["lease_until"] is None
        or row["lease_until"] <= now
    )


def _advance_one(
    connection: Any,
    row: dict[str, Any],
    devices: Mapping[str, Mapping[str, Any]],
    *,
    now: datetime,
    owner: str,
    lease_s: float,
) -> tuple[bool, float | None]:
    policy = store.policy_of(row)
    extra: dict[str, Any] = {}
    if row["state"] == "scheduled" and not row["waves"]:
        start_at = row["start_at"]
        if start_at is None or start_at <= now:
            members = _members(connection, row)
            waves = build_waves(policy, members)
            extra["waves"] = waves
            row["waves"] = waves
            if members:
                connection.execute(
                    insert(_TARGETS),
                    [
                        {
                            "rollout_id": row["id"],
                            "device_id": device_id,
                            "wave": index,
                            "state": "pending",
                            "detail": "",
                        }
                        for index, wave in enumerate(waves)
                        for device_id in wave
                    ],
                )
    decided, targets, evidence = _decide(connection, row, devices, now)
    values = store.state_values(decided.rollout, now)
    values.update(extra)
    values["lease_owner"] = owner
    values["lease_until"] = now + timedelta(seconds=lease_s)
    if decided.notes:
        values["notes"] = store.append_notes(row["notes"] or (), decided.notes, now)
        log.info(
            "rollout stepped",
            extra={
                "rollout": row["id"],
                "deployment": row["deployment"],
                "state": decided.rollout.state,
                "wave": decided.rollout.wave,
                "notes": list(decided.notes),
            },
        )
    connection.execute(update(_ROLLOUTS).where(_ROLLOUTS.c.id == row["id"]).values(**values))
    details = {
        t.device_id: evidence[t.device_id].detail
        for t in decided.targets
        if t.state in store.FAILED_STATES and t.device_id in evidence
    }
    recompose = store.write_targets(
        connection, row["id"], {t["device_id"]: t for t in targets}, decided.targets, details
    )
    if decided.abort:
        store.restore_deployment(connection, row, now)
        recompose = True
    return recompose, decided.wake_after_s


def _members(connection: Any, row: Mapping[str, Any]) -> list[str]:
    """The devices the deployment is assigned to, in the rollout's stable spread order."""
    name = row["deployment"]
    assigned = connection.execute(
        sa_select(_DEVICES.c.id, _DEVICES.c.assignments).where(
            _DEVICES.c.decommissioned_at.is_(None)
        )
    ).all()
    ids = [device_id for device_id, assignments in assigned if name in (assignments or ())]
    salt = str(row["id"]).encode()
    return sorted(ids, key=lambda i: hashlib.blake2b(salt + i.encode(), digest_size=8).digest())


def _windows(
    connection: Any,
    policy: Any,
    targets: Sequence[Mapping[str, Any]],
    now: datetime,
) -> Mapping[str, bool] | None:
    """Each target's maintenance window, open or not (None: the policy names none)."""
    if policy.window is None:
        return None
    schedule = (
        connection.execute(sa_select(_SCHEDULES).where(_SCHEDULES.c.name == policy.window))
        .mappings()
        .first()
    )
    if schedule is None:
        return dict.fromkeys((t["device_id"] for t in targets), False)  # no such window
    try:
        window = parse_window(schedule["cron"], schedule["duration_s"], schedule["timezone"])
    except WindowError:
        log.error("rollout window unusable", extra={"window": policy.window})
        return dict.fromkeys((t["device_id"] for t in targets), False)
    every = dict(connection.execute(sa_select(_DEVICES.c.id, _DEVICES.c.labels)).all())
    labels = {t["device_id"]: every.get(t["device_id"]) or {} for t in targets}
    return window_states(window, labels, now)


def _evidence(
    target: Mapping[str, Any],
    device: Mapping[str, Any] | None,
    windows: Mapping[str, bool] | None,
) -> Evidence:
    generation = target["generation"]
    window_open = True if windows is None else windows.get(target["device_id"], False)
    if device is None or device["decommissioned_at"] is not None:
        return Evidence(
            online=False,
            staged=False,
            applied=False,
            failed=False,
            healthy_since=None,
            healthy_reports=0,
            unhealthy_at=None,
            window_open=window_open,
            detail="device gone",
        )
    applied = generation is not None and device["reported_generation"] >= generation
    return Evidence(
        online=bool(device["online"]),
        staged=generation is not None and device["staged_generation"] >= generation,
        applied=applied,
        failed=generation is not None and device["failed_generation"] >= generation,
        healthy_since=epoch(device["healthy_since"]) if applied else None,
        healthy_reports=int(device["healthy_reports"]) if applied else 0,
        unhealthy_at=epoch(device["unhealthy_at"]) if applied else None,
        window_open=window_open,
        detail=(device["report_error"] or "")[:512],
    )
