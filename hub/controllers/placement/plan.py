"""The placement planner (pure): which device runs which deployment, and failover.

Nothing here does I/O or reads a clock: the driver passes the devices, deployments and
stored instances it read, the last stored assignment (``current``) and ``now`` (unix
seconds), stores the returned :class:`Plan` and recomposes the documents that changed.

Rules (``docs/orchestration.md``, "Placement" and "Failover", says why):
- Eligible: an active device the selector matches that passes every constraint (a
  device without inventory fails constraints on inventory attributes: "no inventory
  yet") and has room. Room is the inventory's ``mem_total_bytes``/``disk_total_bytes``
  minus the requests of every deployment already assigned to it (a request of 0 needs
  no inventory). New placed instances go to online devices only; fleet deployments
  go to offline devices too (the document waits for them).
- Order: everything already assigned (``current`` for fleet, stored instances for
  placed) is kept first, deployments by priority descending then name; then new
  assignments in the same order. Nothing is preempted: a higher priority wins room
  only among new assignments.
- Placed targets: never a device already running the deployment, nor one sharing a
  ``distinct`` attribute value with another instance; then the spread value furthest
  below its target, then the highest affinity score, then devices online for at
  least ``lost_after_s`` ("settled"), then not a device this instance left before,
  then a stable hash of deployment and device id (never input order). Spread and
  affinity choose new places only; running instances are not rebalanced.
- Failover: an instance on a device offline continuously for ``lost_after_s`` is lost;
  when ``now >= next_attempt_at`` it is moved to an eligible online device (history
  appended); each such try, successful or not, sets ``attempts += 1`` and
  ``next_attempt_at = now + min(delay_s * 2**attempts_before, max_delay_s)``. Without a
  target it stays where it is. An instance whose device is gone, decommissioned, no
  longer selected, fails a constraint or lacks room moves at once (no backoff); without
  a target it is unplaced. Unplaced instances are placed as soon as a device is
  eligible; ``next_attempt_at`` then only says when to look again.
- ``keep_replacement``: a device that returns keeps nothing that moved away; flapping
  moves nothing because only continuous absence counts (``offline_since`` restarts at
  each disconnect).
- Deterministic: sorted inputs, hashes for ties; planning again with the previous
  plan's assignments and instances at the same ``now`` changes nothing.
- Cost: a plan is a few passes over the fleet, not one per device and deployment:
  selections are made once per distinct selector, each label requirement and
  constraint is decided once per distinct value (then only failing devices are
  visited), fleet assignments are set operations (``docs/benchmarks.md``, "Fleet
  orchestration": 10,000 devices and 20 deployments).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

from hub.deployments.selectors import Selector
from hub.deployments.spec import (
    Affinity,
    Constraint,
    DeploymentSpec,
    DeviceFacts,
    Instance,
    Move,
    Resources,
)

__all__ = [
    "DECOMMISSIONED",
    "DELETED",
    "DEVICE_GONE",
    "FOUND_DEVICE",
    "INSUFFICIENT_DISK",
    "INSUFFICIENT_MEMORY",
    "LOST",
    "MAX_HISTORY",
    "NEW_INSTANCE",
    "NOT_SELECTED",
    "NO_INVENTORY",
    "OFFLINE",
    "SCALED_DOWN",
    "SELECTED",
    "DeploymentSpec",
    "DeviceFacts",
    "Event",
    "Instance",
    "Move",
    "Plan",
    "constraint_reason",
    "plan",
]

# Why a selected device cannot run a deployment (Plan.unplaceable).
NO_INVENTORY = "no inventory yet"
OFFLINE = "offline"
INSUFFICIENT_MEMORY = "insufficient memory"
INSUFFICIENT_DISK = "insufficient disk"
# Why something moved, was placed or was removed (Move.reason, Event.detail).
LOST = "lost"
DECOMMISSIONED = "decommissioned"
DEVICE_GONE = "device gone"
NOT_SELECTED = "no longer selected"
SCALED_DOWN = "scaled down"
DELETED = "deployment deleted"
NEW_INSTANCE = "new instance"
FOUND_DEVICE = "found a device"  # an unplaced instance placed at last
SELECTED = "selected"
MAX_HISTORY = 50  # moves kept per instance, newest last

_NONE = object()  # an attribute of a device without inventory
# What a column holds as is (anything else, such as a list in an inventory, reads as None).
_SCALAR_TYPES = frozenset((str, int, float, bool, type(None)))


def constraint_reason(constraint: Constraint) -> str:
    """The reason a device fails ``constraint``: ``constraint not met: arch in (x86_64)``."""
    return f"constraint not met: {constraint}"


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a device, for its event history."""

    device_id: str
    kind: Literal["placed", "moved", "unplaced"]
    deployment: str
    detail: str


@dataclass(frozen=True, slots=True)
class Plan:
    """The new placement: assignments per device (devices that had some and now have
    none map to ``()``), every instance's new state (by deployment, then index), the
    reasons of selected devices that cannot run a deployment, what happened, and when
    to plan again (``wake_at`` unix seconds, ``wake_after_s`` from ``now``; None: only
    when something changes)."""

    assignments: Mapping[str, tuple[str, ...]]
    instances: tuple[Instance, ...]
    unplaceable: Mapping[str, Mapping[str, tuple[str, ...]]]
    events: tuple[Event, ...]
    wake_after_s: float | None
    wake_at: float | None = None


def _when(at: float) -> str:
    """A time in reasons: UTC, to the second (a formatter, not a clock)."""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hash(*parts: str) -> int:
    return zlib.crc32("\0".join(parts).encode())


class _Devices:
    """The devices by id with per-attribute columns, computed once per plan."""

    def __init__(self, devices: Sequence[DeviceFacts]) -> None:
        self.by_id: dict[str, DeviceFacts] = {}
        for device in sorted(devices, key=lambda d: d.id):
            if device.id in self.by_id:
                raise ValueError(f"device {device.id!r} given twice")
            self.by_id[device.id] = device
        self.active = [d for d in self.by_id.values() if d.active]
        self._ids = [d.id for d in self.active]
        self.offline = {d.id for d in self.active if not d.online}
        self._columns: dict[str, dict[str, object]] = {}
        self._indexes: dict[str, dict[object, list[str]]] = {}
        self._labels: dict[str, list[str | None]] = {}
        self._selected: dict[Selector, list[str]] = {}  # deployments often share selectors

    def column(self, attribute: str) -> dict[str, object]:
        """Every active device's value of ``attribute``: a text or a number, None (not
        set, or not a scalar), or _NONE (an inventory attribute of a device without one)."""
        found = self._columns.get(attribute)
        if found is None:
            if attribute.startswith("label."):
                key = attribute[6:]
                found = {d.id: d.labels.get(key) for d in self.active}
            elif attribute == "agent_version":
                found = {d.id: d.agent_version for d in self.active}
            else:
                name = attribute.removeprefix("inventory.")
                found = {
                    d.id: _NONE if d.inventory is None else d.inventory.get(name)
                    for d in self.active
                }
            odd = [k for k, v in found.items() if type(v) not in _SCALAR_TYPES and v is not _NONE]
            for device_id in odd:
                found[device_id] = None
            self._columns[attribute] = found
        return found

    def index(self, attribute: str) -> dict[object, list[str]]:
        """The active devices by their value of ``attribute`` (as :meth:`column` reads it)."""
        found = self._indexes.get(attribute)
        if found is None:
            found = self._indexes[attribute] = {}
            for device_id, value in self.column(attribute).items():
                holders = found.get(value)
                if holders is None:
                    found[value] = [device_id]
                else:
                    holders.append(device_id)
        return found

    def selected(self, spec: DeploymentSpec) -> list[str]:
        """Ids of the active devices the selector matches, sorted (a list shared by every
        deployment with this selector: read it, never change it)."""
        found = self._selected.get(spec.selector)
        if found is None:
            found = self._selected[spec.selector] = self._select(spec.selector)
        return found

    def _select(self, selector: Selector) -> list[str]:
        chosen: Iterable[int] = range(len(self.active))
        for requirement in selector.requirements:
            # Each requirement looks at one label: decide each value the fleet has once.
            values = self._labels.get(requirement.key)
            if values is None:
                values = self._labels[requirement.key] = [
                    d.labels.get(requirement.key) for d in self.active
                ]
            passing = {
                v
                for v in set(values)
                if requirement.matches({} if v is None else {requirement.key: v})
            }
            chosen = [i for i in chosen if values[i] in passing]
        return [self._ids[i] for i in chosen]


def _failures(
    spec: DeploymentSpec, ids: list[str], devices: _Devices
) -> dict[str, tuple[str, ...]]:
    """Pure: the constraint reasons of each selected device that fails one."""
    out: dict[str, list[str]] = {}
    chosen = set(ids) if spec.constraints else set()
    for constraint in spec.constraints:
        reason = constraint_reason(constraint)
        # Decide each value the fleet has once; then visit only the devices that fail.
        for value, holders in devices.index(constraint.attribute).items():
            if value is _NONE:
                for device_id in holders:
                    if device_id in chosen:
                        found = out.setdefault(device_id, [])
                        if NO_INVENTORY not in found:
                            found.append(NO_INVENTORY)
            elif not constraint.holds(value):  # type: ignore[arg-type]
                for device_id in holders:
                    if device_id in chosen:
                        out.setdefault(device_id, []).append(reason)
    return {k: tuple(v) for k, v in out.items()}


class _Room:
    """Memory and disk requested on each device so far in this plan."""

    def __init__(self, devices: _Devices) -> None:
        self.devices = devices
        self.memory: dict[str, int] = {}
        self.disk: dict[str, int] = {}
        self.totals = {
            d.id: (
                int(d.inventory.get("mem_total_bytes") or 0),
                int(d.inventory.get("disk_total_bytes") or 0),
            )
            for d in devices.by_id.values()
            if d.inventory is not None
        }

    def lacks(self, device_id: str, wanted: Resources) -> str | None:
        """The reason ``wanted`` does not fit on the device now, or None."""
        if not wanted.memory_bytes and not wanted.disk_bytes:
            return None
        totals = self.totals.get(device_id)
        if totals is None:
            return NO_INVENTORY
        if wanted.memory_bytes and self.memory.get(device_id, 0) + wanted.memory_bytes > totals[0]:
            return INSUFFICIENT_MEMORY
        if wanted.disk_bytes and self.disk.get(device_id, 0) + wanted.disk_bytes > totals[1]:
            return INSUFFICIENT_DISK
        return None

    def take(self, device_id: str, wanted: Resources, sign: int = 1) -> None:
        if not wanted.memory_bytes and not wanted.disk_bytes:
            return
        self.memory[device_id] = self.memory.get(device_id, 0) + sign * wanted.memory_bytes
        self.disk[device_id] = self.disk.get(device_id, 0) + sign * wanted.disk_bytes


@dataclass
class _Deployment:
    """One deployment's working state during a plan."""

    spec: DeploymentSpec
    selected: list[str]
    failing: dict[str, tuple[str, ...]]
    hosts: set[str] = field(default_factory=set)
    instances: dict[int, Instance] = field(default_factory=dict)
    # (instance index, why it must leave its device, whether that is a loss)
    needs: list[tuple[int, str | None, bool]] = field(default_factory=list)
    distinct_used: dict[str, set[object]] = field(default_factory=dict)
    spread_count: dict[object, int] = field(default_factory=dict)
    pool: _Pool | None = None
    exhausted: str | None = None  # the summary once no device is left
    members: set[str] = field(default_factory=set)  # the devices it is assigned to now
    selected_set: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.selected_set = set(self.selected)
        self.distinct_used = {a: set() for a in self.spec.distinct if a != "device"}


class _Pool:
    """Candidate devices of one placed deployment in preference order, per spread value,
    each with a cursor: a device that cannot take an instance now never can in this plan
    (its room only shrinks, hosts and distinct values only fill), so scanning is linear."""

    def __init__(self, work: _Deployment, devices: _Devices, room: _Room, now: float) -> None:
        spec = work.spec
        self.work, self.devices, self.room = work, devices, room
        online = [i for i in work.selected if i not in work.failing and devices.by_id[i].online]
        score = _affinity_scores(spec.affinities, online, devices)

        def key(device_id: str) -> tuple[int, int, int]:
            since = devices.by_id[device_id].online_since
            settled = since is not None and now - since >= spec.lost_after_s
            return (-score.get(device_id, 0), 0 if settled else 1, _hash(spec.name, device_id))

        spread_column = devices.column(spec.spread.attribute) if spec.spread else {}
        self.buckets: dict[object, list[str]] = {}
        for device_id in sorted(online, key=key):
            value = spread_column.get(device_id) if spec.spread else None
            self.buckets.setdefault(None if value is _NONE else value, []).append(device_id)
        self.cursor = dict.fromkeys(self.buckets, 0)
        self.desired = _desired(spec, self.buckets, work.spread_count)
        self.distinct_columns = {a: devices.column(a) for a in spec.distinct if a != "device"}

    def usable(self, device_id: str) -> bool:
        work = self.work
        if device_id in work.hosts or self.room.lacks(device_id, work.spec.resources):
            return False
        for attribute, column in self.distinct_columns.items():
            value = column[device_id]
            if value is None or value is _NONE or value in work.distinct_used[attribute]:
                return False
        return True

    def pick(self, avoid: set[str]) -> str | None:
        """The best usable device, preferring ones not in ``avoid``; None if none is."""
        order = sorted(
            (b for b in self.buckets if self.cursor[b] < len(self.buckets[b])),
            key=lambda b: (
                -(self.desired.get(b, 0.0) - self.work.spread_count.get(b, 0)),
                b is None,
                str(b),
            ),
        )
        for bucket in order:
            found = self._scan(bucket, avoid)
            if found is not None:
                return found
        return None

    def _scan(self, bucket: object, avoid: set[str]) -> str | None:
        items, fallback = self.buckets[bucket], None
        position = self.cursor[bucket]
        while position < len(items):
            device_id = items[position]
            if not self.usable(device_id):
                if position == self.cursor[bucket]:
                    self.cursor[bucket] += 1
            elif device_id not in avoid:
                return device_id
            elif fallback is None:
                fallback = device_id
            position += 1
        return fallback


def _affinity_scores(
    affinities: Sequence[Affinity], ids: Iterable[str], devices: _Devices
) -> dict[str, int]:
    scores: dict[str, int] = {}
    for affinity in affinities:
        column = devices.column(affinity.condition.attribute)
        for device_id in ids:
            value = column[device_id]
            if value is not _NONE and affinity.condition.holds(
                value if isinstance(value, str | int | float) else None
            ):
                scores[device_id] = scores.get(device_id, 0) + affinity.weight
    return scores


def _desired(
    spec: DeploymentSpec, buckets: Mapping[object, list[str]], counts: Mapping[object, int]
) -> dict[object, float]:
    """How many instances each spread value should hold (missing attribute: 0)."""
    replicas = spec.replicas or 0
    if spec.spread is None:
        return {None: float(replicas)}
    if spec.spread.targets:
        return {v: replicas * p / 100 for v, p in spec.spread.targets.items()}
    values = {v for v in (*buckets, *counts) if v is not None}
    return {v: replicas / len(values) for v in values} if values else {}


def _attribute_values(work: _Deployment, devices: _Devices, device_id: str) -> dict[str, object]:
    spec = work.spec
    wanted = [a for a in spec.distinct if a != "device"]
    if spec.spread:
        wanted.append(spec.spread.attribute)
    out: dict[str, object] = {}
    for attribute in wanted:
        value = devices.column(attribute).get(device_id)  # None for an inactive device
        out[attribute] = None if value is _NONE else value
    return out


def _count(work: _Deployment, devices: _Devices, device_id: str, sign: int) -> None:
    """Add (sign 1) or remove (-1) an instance on ``device_id`` in the distinct and spread
    tallies of ``work``."""
    values = _attribute_values(work, devices, device_id)
    for attribute in work.spec.distinct:
        if attribute == "device":
            continue
        used = work.distinct_used.setdefault(attribute, set())
        if sign > 0 and values[attribute] is not None:
            used.add(values[attribute])
        else:
            used.discard(values[attribute])
    if work.spec.spread:
        value = values[work.spec.spread.attribute]
        work.spread_count[value] = work.spread_count.get(value, 0) + sign
    if sign > 0:
        work.hosts.add(device_id)
    else:
        work.hosts.discard(device_id)


class _Planner:
    """One run of :func:`plan`; the methods are its phases, in order."""

    def __init__(
        self,
        devices: Sequence[DeviceFacts],
        deployments: Sequence[DeploymentSpec],
        instances: Sequence[Instance],
        current: Mapping[str, frozenset[str]],
        now: float,
    ) -> None:
        self.now = now
        self.devices = _Devices(devices)
        self.current = current
        self.room = _Room(self.devices)
        names = [d.name for d in deployments]
        if len(set(names)) != len(names):
            raise ValueError("a deployment name is given twice")
        self.order: list[_Deployment] = []
        for spec in sorted(deployments, key=lambda d: (-d.priority, d.name)):
            selected = self.devices.selected(spec)
            failing = _failures(spec, selected, self.devices)
            self.order.append(_Deployment(spec, selected, failing))
        self.by_name = {w.spec.name: w for w in self.order}
        self.stored: dict[str, list[Instance]] = {}
        seen: set[tuple[str, int]] = set()
        for instance in sorted(instances, key=lambda i: (i.deployment, i.index)):
            if (instance.deployment, instance.index) in seen:
                raise ValueError(f"instance {instance.deployment}/{instance.index} given twice")
            seen.add((instance.deployment, instance.index))
            self.stored.setdefault(instance.deployment, []).append(instance)
        self.assigned: dict[str, set[str]] = {}
        # Deployment name -> the devices ``current`` assigns it to.
        self.holding: dict[str, set[str]] = {}
        for device_id, held in current.items():
            for name in held:
                self.holding.setdefault(name, set()).add(device_id)
        self.unplaceable: dict[str, dict[str, tuple[str, ...]]] = {}
        self.events: list[Event] = []
        self.noted: set[tuple[str, str]] = set()  # (device, deployment) with an event
        self.wake: list[float] = []

    def event(self, device_id: str, kind: str, deployment: str, detail: str) -> None:
        assert kind in ("placed", "moved", "unplaced")
        self.events.append(Event(device_id, kind, deployment, detail))  # type: ignore[arg-type]
        self.noted.add((device_id, deployment))

    def assign(self, device_id: str, work: _Deployment) -> None:
        self.assigned.setdefault(device_id, set()).add(work.spec.name)
        work.members.add(device_id)
        self.room.take(device_id, work.spec.resources)

    def unassign(self, device_id: str, work: _Deployment) -> None:
        self.assigned.get(device_id, set()).discard(work.spec.name)
        work.members.discard(device_id)
        self.room.take(device_id, work.spec.resources, -1)

    def assign_fitting(self, device_ids: set[str], work: _Deployment) -> None:
        """Assign ``work`` to each of ``device_ids`` that has room for it then, in id order
        (the order of ``selected``)."""
        wanted = work.spec.resources
        if wanted.memory_bytes or wanted.disk_bytes:
            for device_id in sorted(device_ids):
                if self.room.lacks(device_id, wanted) is None:
                    self.assign(device_id, work)
            return
        name, assigned = work.spec.name, self.assigned  # nothing requested: room is no matter
        work.members.update(device_ids)
        for device_id in device_ids:
            found = assigned.get(device_id)
            if found is None:
                assigned[device_id] = {name}
            else:
                found.add(name)

    # -- phase 1: keep what is assigned and still fits ----------------------------------

    def keep_fleet(self, work: _Deployment) -> None:
        kept = self.holding.get(work.spec.name, set()) & work.selected_set
        kept.difference_update(work.failing)
        self.assign_fitting(kept, work)

    def keep_placed(self, work: _Deployment) -> None:
        spec, stored = work.spec, self.stored.get(work.spec.name, [])
        replicas = spec.replicas or 0
        surplus = len(stored) - replicas
        if surplus > 0:  # scale down: unplaced ones first, then the highest indexes
            ranked = sorted(stored, key=lambda i: (i.device_id is not None, -i.index))
            for instance in ranked[:surplus]:
                if instance.device_id is not None:
                    self.event(
                        instance.device_id, "unplaced", spec.name,
                        f"instance {instance.index}: {SCALED_DOWN}",
                    )  # fmt: skip
            stored = sorted(ranked[surplus:], key=lambda i: i.index)
        used = {i.index for i in stored}
        fresh = [i for i in range(replicas + len(stored)) if i not in used][
            : replicas - len(stored)
        ]
        for index in fresh:
            work.instances[index] = Instance(spec.name, index)
            work.needs.append((index, None, False))
        for instance in stored:
            work.instances[instance.index] = instance
            self.keep_instance(work, instance)

    def keep_instance(self, work: _Deployment, instance: Instance) -> None:
        """Keep ``instance`` where it is, or note why and how it must move."""
        index, spec = instance.index, work.spec
        if instance.device_id is None:
            work.needs.append((index, None, False))
            return
        device = self.devices.by_id.get(instance.device_id)
        why: str | None
        if device is None:
            why = DEVICE_GONE
        elif not device.active:
            why = DECOMMISSIONED
        elif device.id not in work.selected_set:
            why = NOT_SELECTED
        elif device.id in work.failing:
            why = work.failing[device.id][0]
        else:
            why = self.room.lacks(device.id, spec.resources)
        if why is not None or device is None:
            work.needs.append((index, why, False))
            return
        self.assign(device.id, work)
        _count(work, self.devices, device.id, 1)
        if device.online:
            work.instances[index] = replace(instance, reason=None)
            return
        since = device.offline_since
        since = since if since is not None else instance.placed_at
        if since is None:  # offline for an unknown time: never counted as lost
            work.instances[index] = replace(instance, reason=OFFLINE)
            return
        lost_at = since + spec.lost_after_s
        if self.now < lost_at:
            work.instances[index] = replace(instance, reason=f"offline since {_when(since)}")
            self.wake.append(lost_at)
        elif instance.next_attempt_at is not None and self.now < instance.next_attempt_at:
            kept = instance.reason if (instance.reason or "").startswith(LOST) else None
            work.instances[index] = replace(  # the last try's reason stands until the next
                instance, reason=kept or f"{LOST}; next try at {_when(instance.next_attempt_at)}"
            )
            self.wake.append(instance.next_attempt_at)
        else:
            work.needs.append((index, LOST, True))

    # -- phase 2: new assignments --------------------------------------------------------

    def place_fleet(self, work: _Deployment) -> None:
        fresh = work.selected_set - work.members
        fresh.difference_update(work.failing)
        self.assign_fitting(fresh, work)

    def place_placed(self, work: _Deployment) -> None:
        # Losses first, each releasing its device's distinct and spread values, so the
        # cursors in _Pool only ever move forward.
        needs = sorted(work.needs, key=lambda n: (not n[2], n[0]))
        for index, _why, lost in needs:
            device_id = work.instances[index].device_id
            if lost and device_id is not None:
                _count(work, self.devices, device_id, -1)
        for index, why, lost in needs:
            self.place_one(work, work.instances[index], why, lost)

    def place_one(self, work: _Deployment, instance: Instance, why: str | None, lost: bool) -> None:
        spec, now = work.spec, self.now
        old = instance.device_id
        avoid = {m.from_device for m in instance.history if m.from_device is not None}
        if old is not None:
            avoid.add(old)
        target = None if work.exhausted else self.pool(work).pick(avoid)
        due = instance.next_attempt_at is None or now >= instance.next_attempt_at
        attempts, next_at = instance.attempts, instance.next_attempt_at
        if lost or (target is None and due):
            attempts, next_at = attempts + 1, now + spec.reschedule.delay_after(attempts)
        if target is None:
            summary = work.exhausted = work.exhausted or self.summary(work)
            if next_at is not None and next_at > now:
                self.wake.append(next_at)
            if lost and old is not None and next_at is not None:  # stays on the lost device
                _count(work, self.devices, old, 1)
                work.instances[instance.index] = replace(
                    instance, attempts=attempts, next_attempt_at=next_at,
                    reason=f"{LOST}; {summary}; next try at {_when(next_at)}",
                )  # fmt: skip
                return
            history = instance.history
            if old is not None:
                history = (*history, Move(now, old, None, why or ""))[-MAX_HISTORY:]
                self.event(old, "unplaced", spec.name, f"instance {instance.index}: {why}")
            work.instances[instance.index] = replace(
                instance, device_id=None, placed_at=None, history=history,
                attempts=attempts, next_attempt_at=next_at,
                reason=f"{why}; {summary}" if old is not None else summary,
            )  # fmt: skip
            return
        if lost and old is not None:
            self.unassign(old, work)
        why = why or (NEW_INSTANCE if not instance.history else FOUND_DEVICE)
        detail = why
        if old is not None:
            self.event(old, "moved", spec.name, f"instance {instance.index} to {target}: {why}")
            detail = f"from {old}: {why}"
        self.event(target, "placed", spec.name, f"instance {instance.index}: {detail}")
        self.assign(target, work)
        _count(work, self.devices, target, 1)
        work.instances[instance.index] = replace(
            instance, device_id=target, placed_at=now, reason=None,
            original_device_id=instance.original_device_id or target,
            history=(*instance.history, Move(now, old, target, why))[-MAX_HISTORY:],
            attempts=attempts, next_attempt_at=next_at,
        )  # fmt: skip

    def pool(self, work: _Deployment) -> _Pool:
        if work.pool is None:
            work.pool = _Pool(work, self.devices, self.room, self.now)
        return work.pool

    def device_reasons(self, work: _Deployment, device_id: str) -> tuple[str, ...]:
        """Why a selected device cannot take ``work`` (one more instance if placed), or ()."""
        if device_id in work.failing:
            return work.failing[device_id]
        if work.spec.kind == "placed" and not self.devices.by_id[device_id].online:
            return (OFFLINE,)
        lacking = self.room.lacks(device_id, work.spec.resources)
        return (lacking,) if lacking else ()

    def summary(self, work: _Deployment) -> str:
        """One line for an instance without a device: how many selected devices, why not."""
        if not work.selected:
            return "no eligible device: no active device is selected"
        tally: dict[str, int] = {}
        for device_id in work.selected:
            if device_id in work.hosts:
                continue
            reasons = self.device_reasons(work, device_id)
            label = reasons[0] if reasons else "taken (distinct or spread)"
            label = "constraint not met" if label.startswith("constraint not met") else label
            tally[label] = tally.get(label, 0) + 1
        tally["already running it"] = len(work.hosts)
        parts = ", ".join(f"{n} {label}" for label, n in sorted(tally.items()) if n)
        return f"no eligible device: {len(work.selected)} selected ({parts})"

    def note_unplaceable(self, work: _Deployment) -> None:
        """Reasons of the selected devices without ``work``, once all room is taken (so
        planning again, which keeps everything first, finds the same reasons)."""
        reasons = self.unplaceable.setdefault(work.spec.name, {})
        without = work.selected_set - work.members
        wanted = work.spec.resources
        if not (wanted.memory_bytes or wanted.disk_bytes):
            # Nothing requested: only a failed constraint or (placed) being offline is a reason.
            some = without & work.failing.keys()
            if work.spec.kind == "placed":
                some |= without & self.devices.offline
            without = some
        for device_id in without:
            found = self.device_reasons(work, device_id)
            if found:
                reasons[device_id] = found

    # -- the result ---------------------------------------------------------------------

    def run(self) -> Plan:
        for work in self.order:
            if work.spec.kind == "fleet":
                self.keep_fleet(work)
            else:
                self.keep_placed(work)
        for work in self.order:
            if work.spec.kind == "fleet":
                self.place_fleet(work)
            else:
                self.place_placed(work)
        for work in self.order:
            self.note_unplaceable(work)
        self.note_differences()
        wake_at = min((t for t in self.wake if t > self.now), default=None)
        instances = tuple(
            work.instances[i]
            for work in sorted(self.order, key=lambda w: w.spec.name)
            for i in sorted(work.instances)
        )
        assignments = {
            device_id: tuple(sorted(self.assigned.get(device_id, ())))
            for device_id in sorted({*self.assigned, *self.current})
            if self.assigned.get(device_id) or self.current.get(device_id)
        }
        return Plan(
            assignments=assignments,
            instances=instances,
            unplaceable={
                name: {device_id: found[device_id] for device_id in sorted(found)}
                for name, found in sorted(self.unplaceable.items())
                if found
            },
            events=tuple(self.events),
            wake_after_s=None if wake_at is None else wake_at - self.now,
            wake_at=wake_at,
        )

    def note_differences(self) -> None:
        """Events for assignments gained or lost that no instance event explains."""
        for device_id in sorted({*self.assigned, *self.current}):
            before = self.current.get(device_id, frozenset())
            after = self.assigned.get(device_id, set())
            if before == after:
                continue
            for name in sorted(after - before):
                if (device_id, name) not in self.noted:
                    self.event(device_id, "placed", name, SELECTED)
            for name in sorted(before - after):
                if (device_id, name) not in self.noted:
                    self.event(device_id, "unplaced", name, self.why_not(device_id, name))

    def why_not(self, device_id: str, name: str) -> str:
        work, device = self.by_name.get(name), self.devices.by_id.get(device_id)
        if work is None:
            return DELETED
        if device is None:
            return DEVICE_GONE
        if not device.active:
            return DECOMMISSIONED
        if device_id not in work.selected_set:
            return NOT_SELECTED
        found = self.unplaceable.get(name, {}).get(device_id)
        return "; ".join(found) if found else "not chosen"


def plan(
    *,
    devices: Sequence[DeviceFacts],
    deployments: Sequence[DeploymentSpec],
    instances: Sequence[Instance],
    current: Mapping[str, frozenset[str]],
    now: float,
) -> Plan:
    """Pure: the placement of ``deployments`` on ``devices`` at ``now`` (see the module
    rules). Raises ValueError for a device id, deployment name or instance given twice;
    instances of deployments not given are dropped (their devices get "unplaced" events).
    """
    return _Planner(devices, deployments, instances, current, now).run()
