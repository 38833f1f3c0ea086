"""What the placement planner takes (pure): deployment specs, device facts, instances.

Rules:
- Every type is a frozen dataclass, checked when it is built: a spec that cannot be
  planned raises :class:`SpecError` (a ``ValueError`` naming the field and why), so
  the planner never meets one. The API's pydantic model converts to these (or calls
  :func:`spec_from_json` with the JSON ``spec`` object); nothing here imports pydantic.
- Attributes (constraints, affinities, spread, distinct): ``arch``, ``os``,
  ``cpu_count``, ``mem_total_bytes``, ``disk_total_bytes`` and ``inventory.<field>``
  (any field of :class:`protocols.Inventory`) come from the device's inventory;
  ``agent_version`` from its birth and compares as a version; ``label.<key>`` from its
  labels. ``distinct`` may also name ``device`` (always implied).
- Constraint values: ``in``/``notin`` take ``values`` (one or more); ``exists`` and
  ``!exists`` take none; ``<``, ``<=``, ``>``, ``>=`` take a number (a version string
  for ``agent_version``); ``=``/``!=`` take one value. Equality compares text, so
  ``cpu_count = 4`` and ``label.cores = "4"`` both work.
- Placed-only fields (``replicas``, ``spread``, ``distinct``) on a fleet deployment
  are an error rather than silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from hub.deployments.selectors import Selector, SelectorError, parse_selector
from hub.devices.labels import LABEL_KEY_PATTERN
from protocols import Inventory

__all__ = [
    "CONSTRAINT_OPS",
    "DEPLOYMENT_NAME_PATTERN",
    "INVENTORY_ATTRIBUTES",
    "MAX_PRIORITY",
    "MAX_REPLICAS",
    "Affinity",
    "Constraint",
    "ConstraintOp",
    "DeploymentSpec",
    "DeviceFacts",
    "Instance",
    "Kind",
    "Move",
    "Reschedule",
    "Resources",
    "SpecError",
    "Spread",
    "check_attribute",
    "spec_from_json",
    "version_key",
]

DEPLOYMENT_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
MAX_PRIORITY = 1000
MAX_REPLICAS = 10_000
MAX_WEIGHT = 100

Kind = Literal["fleet", "placed"]
ConstraintOp = Literal["=", "!=", "in", "notin", "exists", "!exists", "<", "<=", ">", ">="]
CONSTRAINT_OPS: frozenset[str] = frozenset(
    ("=", "!=", "in", "notin", "exists", "!exists", "<", "<=", ">", ">=")
)
_ORDER_OPS = frozenset(("<", "<=", ">", ">="))
# Attributes read from the inventory: a device with none yet fails any constraint on them.
INVENTORY_ATTRIBUTES: frozenset[str] = frozenset(
    ("arch", "os", "cpu_count", "mem_total_bytes", "disk_total_bytes")
) | frozenset(f"inventory.{name}" for name in Inventory.__struct_fields__)
_OTHER_ATTRIBUTES = frozenset(("agent_version",))
_LABEL_KEY = re.compile(LABEL_KEY_PATTERN)
_NAME = re.compile(DEPLOYMENT_NAME_PATTERN)
_VERSION = re.compile(r"^v?(\d+(?:\.\d+)*)(.*)$")

Scalar = str | int | float


class SpecError(ValueError):
    """A deployment spec (or a part of one) that cannot be planned: bad input."""


def check_attribute(attribute: str, where: str) -> str:
    """The attribute if the planner knows it; raises SpecError naming ``where`` otherwise."""
    if attribute in INVENTORY_ATTRIBUTES or attribute in _OTHER_ATTRIBUTES:
        return attribute
    if attribute.startswith("label.") and _LABEL_KEY.match(attribute[6:]):
        return attribute
    raise SpecError(
        f"{where}: unknown attribute {attribute!r} (arch, os, agent_version, cpu_count, "
        "mem_total_bytes, disk_total_bytes, label.<key>, inventory.<field>)"
    )


def version_key(text: str) -> tuple[tuple[int, ...], int, str] | None:
    """Pure: a sort key for a version such as ``0.4.0``, ``v1.2`` or ``0.4.0rc1``.

    Release numbers compare numerically with trailing zeros ignored (``1.0 == 1``); a
    suffix (``rc1``, ``-dev``) sorts before the plain release, ``+local`` does not.
    None when ``text`` does not start with a number.
    """
    found = _VERSION.match(text.strip())
    if found is None:
        return None
    release = tuple(int(part) for part in found.group(1).split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    suffix = found.group(2)
    final = 1 if not suffix or suffix.startswith("+") else 0
    return (release, final, suffix if not final else "")


def _text(value: Scalar) -> str:
    """How equality sees a value: integral numbers without a fraction, text as is."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


@dataclass(frozen=True, slots=True)
class Constraint:
    """A hard rule on one attribute; a device that fails it is not eligible."""

    attribute: str
    op: ConstraintOp
    value: Scalar | None = None
    values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        where = f"constraint on {self.attribute!r}"
        check_attribute(self.attribute, where)
        if self.op not in CONSTRAINT_OPS:
            raise SpecError(
                f"{where}: unknown op {self.op!r} ({', '.join(sorted(CONSTRAINT_OPS))})"
            )
        if self.op in ("in", "notin"):
            if not self.values or self.value is not None:
                raise SpecError(f"{where}: {self.op!r} takes 'values' (one or more), not 'value'")
            object.__setattr__(self, "values", frozenset(_text(v) for v in self.values))
        elif self.op in ("exists", "!exists"):
            if self.values or self.value is not None:
                raise SpecError(f"{where}: {self.op!r} takes no value")
        elif self.value is None or self.values:
            raise SpecError(f"{where}: {self.op!r} takes one 'value'")
        elif self.op in _ORDER_OPS:
            if self.attribute == "agent_version":
                if not isinstance(self.value, str) or version_key(self.value) is None:
                    raise SpecError(f"{where}: {self.value!r} is not a version")
            elif _number(self.value) is None or isinstance(self.value, str):
                raise SpecError(f"{where}: {self.op!r} needs a number, not {self.value!r}")

    def holds(self, value: Scalar | None) -> bool:
        """Pure: whether a device whose attribute is ``value`` (None: not set) passes."""
        match self.op:
            case "exists":
                return value is not None
            case "!exists":
                return value is None
            case "!=":
                return value is None or _text(value) != self._expected()
            case "notin":
                return value is None or _text(value) not in self.values
            case _ if value is None:
                return False
            case "=":
                return _text(value) == self._expected()
            case "in":
                return _text(value) in self.values
        return self._compare(value)

    def _compare(self, value: Scalar) -> bool:
        mine: Any
        theirs: Any
        if self.attribute == "agent_version":
            mine, theirs = version_key(str(value)), version_key(str(self.value))
        else:
            mine, theirs = _number(value), _number(self.value)
        if mine is None or theirs is None:
            return False
        match self.op:
            case "<":
                return bool(mine < theirs)
            case "<=":
                return bool(mine <= theirs)
            case ">":
                return bool(mine > theirs)
        return bool(mine >= theirs)

    def __str__(self) -> str:
        if self.op in ("exists", "!exists"):
            return f"{self.attribute} {self.op}"
        if self.op in ("in", "notin"):
            return f"{self.attribute} {self.op} ({','.join(sorted(self.values))})"
        return f"{self.attribute} {self.op} {self._expected()}"

    def _expected(self) -> str:
        return "" if self.value is None else _text(self.value)


@dataclass(frozen=True, slots=True)
class Affinity:
    """A soft preference: devices where ``condition`` holds score ``weight`` (-100..100)."""

    condition: Constraint
    weight: int

    def __post_init__(self) -> None:
        if not -MAX_WEIGHT <= self.weight <= MAX_WEIGHT or self.weight == 0:
            raise SpecError(f"affinity {self.condition}: weight must be -100..100 and not 0")


@dataclass(frozen=True, slots=True)
class Resources:
    """What one copy of the deployment requests on a device, in bytes."""

    memory_bytes: int = 0
    disk_bytes: int = 0

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.disk_bytes < 0:
            raise SpecError("resources: requests must be >= 0 bytes")


@dataclass(frozen=True, slots=True)
class Spread:
    """Spread instances over an attribute's values: ``targets`` in percent (sum <= 100),
    or evenly over the values eligible devices have when ``targets`` is empty."""

    attribute: str
    targets: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_attribute(self.attribute, "spread")
        if any(p < 0 for p in self.targets.values()) or sum(self.targets.values()) > 100:
            raise SpecError("spread: targets are percentages >= 0 that add up to at most 100")


@dataclass(frozen=True, slots=True)
class Reschedule:
    """Capped exponential backoff between tries to find an instance a new device."""

    delay_s: float = 30.0
    max_delay_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.delay_s <= self.max_delay_s:
            raise SpecError("reschedule: need 0 < delay_s <= max_delay_s")

    def delay_after(self, attempts: int) -> float:
        """Pure: the pause after the try that had ``attempts`` tries before it."""
        return min(self.delay_s * 2.0 ** min(attempts, 64), self.max_delay_s)


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One deployment as the planner sees it (``name`` is the resource's name)."""

    name: str
    selector: Selector = field(default_factory=Selector)
    priority: int = 0
    kind: Kind = "fleet"
    replicas: int | None = None
    workloads: tuple[Mapping[str, Any], ...] = ()
    constraints: tuple[Constraint, ...] = ()
    resources: Resources = field(default_factory=Resources)
    spread: Spread | None = None
    distinct: tuple[str, ...] = ()
    affinities: tuple[Affinity, ...] = ()
    lost_after_s: float = 300.0
    reschedule: Reschedule = field(default_factory=Reschedule)
    reconcile: Literal["keep_replacement"] = "keep_replacement"

    def __post_init__(self) -> None:
        where = f"deployment {self.name!r}"
        if not _NAME.match(self.name):
            raise SpecError(f"{where}: name must match {DEPLOYMENT_NAME_PATTERN}")
        if not -MAX_PRIORITY <= self.priority <= MAX_PRIORITY:
            raise SpecError(f"{where}: priority must be -1000..1000")
        if self.kind == "placed":
            if self.replicas is None or not 1 <= self.replicas <= MAX_REPLICAS:
                raise SpecError(f"{where}: a placed deployment needs replicas 1..10000")
        elif self.kind == "fleet":
            if self.replicas is not None or self.spread is not None or self.distinct:
                raise SpecError(f"{where}: replicas, spread and distinct are for placed only")
        else:
            raise SpecError(f"{where}: kind must be 'fleet' or 'placed'")
        for attribute in self.distinct:
            if attribute != "device":
                check_attribute(attribute, f"{where}: distinct")
        if self.lost_after_s < 0:
            raise SpecError(f"{where}: lost_after_s must be >= 0")
        if self.reconcile != "keep_replacement":
            raise SpecError(f"{where}: reconcile must be 'keep_replacement'")


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the planner knows of a device (times in unix seconds, the same clock as now)."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    active: bool = True  # False once decommissioned
    online: bool = False
    offline_since: float | None = None  # start of the current continuous absence
    online_since: float | None = None  # start of the current connection
    inventory: Mapping[str, Any] | None = None
    agent_version: str | None = None


@dataclass(frozen=True, slots=True)
class Move:
    """One entry of an instance's history: it left ``from_device`` for ``to_device``
    (None: it found no device and is unplaced) at ``at`` because of ``reason``."""

    at: float
    from_device: str | None
    to_device: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Instance:
    """One replica of a placed deployment: where it runs and how it got there."""

    deployment: str
    index: int
    device_id: str | None = None  # None: unplaced (see reason)
    placed_at: float | None = None
    original_device_id: str | None = None  # its first device
    history: tuple[Move, ...] = ()
    attempts: int = 0  # tries to find it a new device (each starts a longer pause)
    next_attempt_at: float | None = None  # no try to move or place it before this
    reason: str | None = None  # why unplaced, or why its device is not good now


def _scalar(value: object, where: str) -> Scalar:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SpecError(f"{where}: value must be text or a number, not {value!r}")
    return value


def _constraint(raw: Mapping[str, Any], where: str) -> Constraint:
    if not isinstance(raw, Mapping) or "attribute" not in raw or "op" not in raw:
        raise SpecError(f"{where}: needs 'attribute' and 'op'")
    values = raw.get("values")
    if values is not None and not isinstance(values, list | tuple):
        raise SpecError(f"{where}: 'values' must be a list")
    value = raw.get("value")
    return Constraint(
        attribute=str(raw["attribute"]),
        op=raw["op"],
        value=None if value is None else _scalar(value, where),
        values=frozenset(_text(_scalar(v, where)) for v in values or ()),
    )


def spec_from_json(name: str, data: Mapping[str, Any]) -> DeploymentSpec:
    """Pure: the spec a JSON ``spec`` object describes (the API and YAML shape); raises
    SpecError naming the field (a bad selector's SelectorError text included)."""
    try:
        selector = parse_selector(str(data.get("selector", "")))
    except SelectorError as error:
        raise SpecError(f"selector: {error}") from error
    spread = data.get("spread")
    resources = data.get("resources") or {}
    reschedule = data.get("reschedule") or {}
    kind = data.get("kind", "fleet")
    try:
        return DeploymentSpec(
            name=name,
            selector=selector,
            priority=int(data.get("priority", 0)),
            kind=kind,
            replicas=data.get("replicas"),
            workloads=tuple(data.get("workloads") or ()),
            constraints=tuple(
                _constraint(c, f"constraints[{i}]")
                for i, c in enumerate(data.get("constraints") or ())
            ),
            resources=Resources(
                memory_bytes=int(resources.get("memory_bytes", 0)),
                disk_bytes=int(resources.get("disk_bytes", 0)),
            ),
            spread=None
            if spread is None
            else Spread(str(spread["attribute"]), dict(spread.get("targets") or {})),
            distinct=tuple(str(a) for a in data.get("distinct") or ()),
            affinities=tuple(
                Affinity(_constraint(a, f"affinities[{i}]"), int(a.get("weight", 0)))
                for i, a in enumerate(data.get("affinities") or ())
            ),
            lost_after_s=float(data.get("lost_after_s", 300.0)),
            reschedule=Reschedule(
                delay_s=float(reschedule.get("delay_s", 30.0)),
                max_delay_s=float(reschedule.get("max_delay_s", 3600.0)),
            ),
            reconcile=data.get("reconcile", "keep_replacement"),
        )
    except SpecError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise SpecError(f"deployment {name!r}: malformed spec ({error!r})") from error
