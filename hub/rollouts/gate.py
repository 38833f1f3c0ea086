"""Rollouts inside the fleet's reconcile transaction: which version each device gets.

Called by :mod:`hub.deployments.reconcile` (every run: a route's change, its preview,
the placement and rollout controllers), in the caller's write transaction.

Rules:
- A change that alters a deployment's layer (its workloads or its priority) and whose
  new spec has a ``rollout`` policy creates a rollout (``scheduled``, no devices yet:
  the rollout controller fixes its waves when it starts). An active rollout of the same
  deployment is superseded, and the new one starts from the superseded one's
  ``from_spec``: a version that never finished rolling out is not a known good one.
  Deleting a deployment supersedes its active rollout. A change of the policy alone
  (more in flight, another window) applies to the active rollout; its waves stay.
- While a rollout is active, each device assigned its deployment gets ``from_spec``'s
  layer until it is handed out (none if the deployment is new), ``to_spec``'s layer
  with the whole document held (``"hold": true``: fetch and verify, do not switch)
  while ``staging``, ``staged`` or ``waiting_window``, and the deployment's current
  layer (``to_spec``'s) otherwise, including a failed device put back to pending by
  a retry (until it is handed out again, as a new generation). A device that joins
  the deployment during the rollout is not in it: it gets ``from_spec``'s layer until
  the rollout ends.
- A preview shows where a change ends: the deployments it puts are not gated.
- After composing, every handed-out row (``staging``, ``waiting_window``,
  ``in_flight``) records the generation its device got: the new one when its document
  changed, else its current one. A device handed out again after it failed that very
  generation (retry-failed) gets a new generation with the same document, or it would
  ignore it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, bindparam, insert, update
from sqlalchemy import select as sa_select

from hub.controllers.rollout.plan import HELD as HELD_STATES
from hub.controllers.rollout.plan import TERMINAL as _TERMINAL
from hub.deployments.layers import layer_of
from hub.deployments.merge import Composed, canonical, compose
from hub.rollouts.models import Rollout, RolloutDevice
from protocols import HOLD_KEY

TERMINAL = tuple(sorted(_TERMINAL))
"""The rollout states nothing changes any more (the planner's), for SQL."""
HANDED_OUT_STATES = frozenset({"staging", "waiting_window", "in_flight"})
"""States whose row records the generation its device is handed in this run."""
LAYER_KEYS = ("workloads", "priority")
NOTES_KEPT = 50

_ROLLOUTS: Table = Rollout.__table__  # type: ignore[attr-defined]
_TARGETS: Table = RolloutDevice.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Gating:
    """One active rollout as the merge needs it."""

    rollout_id: int
    deployment: str
    from_spec: Mapping[str, Any] | None
    modes: dict[str, str] = field(default_factory=dict)
    """device id -> "hold" | "to"; a device not here gets ``from_spec``'s layer."""
    handed: dict[str, int | None] = field(default_factory=dict)
    """device id -> its row's generation, for rows in HANDED_OUT_STATES."""


def layer_changed(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Pure: whether a spec change alters what devices run (a rollout's reason to be)."""
    if old is None:
        return True
    return any(canonical({"v": old.get(k)}) != canonical({"v": new.get(k)}) for k in LAYER_KEYS)


def create_rollouts(
    connection: Any,
    *,
    stored: Mapping[str, tuple[Mapping[str, Any], int, datetime]],
    put: Mapping[str, Mapping[str, Any]],
    remove: Iterable[str],
    now: datetime,
) -> list[str]:
    """Create a rollout for every put that needs one (module rules); returns their
    deployments' names."""
    created: list[str] = []
    active = {
        r["deployment"]: dict(r)
        for r in connection.execute(
            sa_select(_ROLLOUTS).where(_ROLLOUTS.c.state.notin_(TERMINAL))
        ).mappings()
    }
    for name in remove:
        if name in active:
            _supersede(connection, active[name]["id"], "the deployment was deleted", now)
    for name, spec in put.items():
        old = stored.get(name)
        old_spec = old[0] if old is not None else None
        if (
            name in active
            and spec.get("rollout")
            and not layer_changed(old_spec, spec)
            and canonical(dict(spec["rollout"])) != canonical(active[name]["policy"])
        ):
            # The policy alone changed (more in flight, a later start, no window): the
            # running rollout follows it; its waves stay as they were fixed.
            connection.execute(
                update(_ROLLOUTS)
                .where(_ROLLOUTS.c.id == active[name]["id"])
                .values(
                    policy=dict(spec["rollout"]),
                    start_at=_iso(spec["rollout"].get("start_at")),
                    activate_at=_iso(spec["rollout"].get("activate_at")),
                    updated_at=now,
                )
            )
            continue
        if not spec.get("rollout") or not layer_changed(old_spec, spec):
            if name in active and old_spec is not None and layer_changed(old_spec, spec):
                # The rollout policy was removed with the change: the change goes out at
                # once, as any change without a policy does; the running one stops.
                _supersede(connection, active[name]["id"], "superseded by a change", now)
            continue
        from_spec: Mapping[str, Any] | None = old_spec
        from_version = old[1] if old is not None else None
        running = active.get(name)
        if running is not None:
            from_spec, from_version = running["from_spec"], running["from_version"]
            _supersede(connection, running["id"], "superseded by a newer change", now)
        version = old[1] + 1 if old is not None else 1
        policy = dict(spec["rollout"])
        connection.execute(
            insert(_ROLLOUTS).values(
                deployment=name,
                from_version=from_version,
                to_version=version,
                from_spec=dict(from_spec) if from_spec is not None else None,
                to_spec=dict(spec),
                policy=policy,
                state="scheduled",
                reason="",
                wave=0,
                waves=[],
                promoted=-1,
                accepted_failures=0,
                notes=[f"created: version {from_version} -> {version}"],
                start_at=_iso(policy.get("start_at")),
                activate_at=_iso(policy.get("activate_at")),
                created_at=now,
                updated_at=now,
            )
        )
        created.append(name)
    return created


def _iso(value: object) -> datetime | None:
    """A policy's time (ISO 8601, checked by the policy parser) as an aware datetime."""
    if not isinstance(value, str):
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _supersede(connection: Any, rollout_id: int, reason: str, now: datetime) -> None:
    connection.execute(
        update(_ROLLOUTS)
        .where(_ROLLOUTS.c.id == rollout_id)
        .values(state="superseded", reason=reason, finished_at=now, updated_at=now)
    )


def read_gating(connection: Any, *, ungated: Iterable[str] = ()) -> dict[str, Gating]:
    """The active rollouts by deployment (module rules), except those of ``ungated``."""
    skip = set(ungated)
    rollouts = [
        dict(r)
        for r in connection.execute(
            sa_select(_ROLLOUTS.c.id, _ROLLOUTS.c.deployment, _ROLLOUTS.c.from_spec).where(
                _ROLLOUTS.c.state.notin_(TERMINAL)
            )
        ).mappings()
        if r["deployment"] not in skip
    ]
    if not rollouts:
        return {}
    by_id = {r["id"]: Gating(r["id"], r["deployment"], r["from_spec"]) for r in rollouts}
    rows = connection.execute(
        sa_select(
            _TARGETS.c.rollout_id, _TARGETS.c.device_id, _TARGETS.c.state, _TARGETS.c.generation
        ).where(
            _TARGETS.c.rollout_id.in_(list(by_id)),
            (_TARGETS.c.state != "pending") | _TARGETS.c.generation.is_not(None),
        )
    )
    for rollout_id, device_id, state, generation in rows:
        gating = by_id[rollout_id]
        gating.modes[device_id] = mode_of(state, generation)
        if state in HANDED_OUT_STATES:
            gating.handed[device_id] = generation
    return {g.deployment: g for g in by_id.values()}


def mode_of(state: str, generation: int | None) -> str:
    """Which version a device in ``state`` gets: "from", "hold" or "to". A pending device
    that has a generation was handed out before (a retry): it keeps the new version."""
    if state == "pending":
        return "from" if generation is None else "to"
    if state in HELD_STATES:
        return "hold"
    return "to"


def forced(gating: Mapping[str, Gating], rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """Devices handed out again after they failed their current generation (retry)."""
    fresh = {d for g in gating.values() for d, gen in g.handed.items() if gen is None}
    if not fresh:
        return set()
    return {
        row["id"]
        for row in rows
        if row["id"] in fresh
        and row["desired_generation"] > 0
        and row["failed_generation"] >= row["desired_generation"]
    }


_SET_GENERATION = (
    update(_TARGETS)
    .where(_TARGETS.c.rollout_id == bindparam("b_rollout"))
    .where(_TARGETS.c.device_id == bindparam("b_device"))
    .values(generation=bindparam("b_generation"))
)


def record_generations(
    connection: Any,
    gating: Mapping[str, Gating],
    rows: Sequence[Mapping[str, Any]],
    bumped: Mapping[str, int],
) -> None:
    """Each handed-out row's generation (module rules): ``bumped`` maps the devices whose
    document this run changed to their new generation."""
    current = {row["id"]: row["desired_generation"] for row in rows}
    params: list[dict[str, Any]] = []
    for g in gating.values():
        for device_id, generation in g.handed.items():
            new = bumped.get(device_id)
            if new is None:
                if generation is not None:
                    continue
                new = current.get(device_id)
                if new is None:
                    continue
            if new != generation:
                params.append(
                    {"b_rollout": g.rollout_id, "b_device": device_id, "b_generation": new}
                )
    if params:
        connection.execute(_SET_GENERATION, params)


class Versions:
    """Which version of each deployment a device's document is composed from: the
    current one, or, while a rollout runs, what the rollout has the device at."""

    __slots__ = ("_gating", "_layers", "_previous", "force")

    def __init__(
        self, layers: Mapping[str, Any], gating: Mapping[str, Gating], force: set[str]
    ) -> None:
        self._layers = layers
        self._gating = gating
        self.force = force
        self._previous = {
            name: layer_of(name, g.from_spec) if g.from_spec is not None else None
            for name, g in gating.items()
        }

    def modes(self, device_id: str, names: Sequence[str]) -> tuple[str, ...] | None:
        """Per deployment of ``names``: "now", "from", "hold" or "to"; None: all "now"."""
        if not self._gating:
            return None
        modes = tuple(
            "now" if (g := self._gating.get(n)) is None else g.modes.get(device_id, "from")
            for n in names
        )
        return None if all(m == "now" for m in modes) else modes

    def compose(
        self, base: Mapping[str, Any], names: Sequence[str], modes: tuple[str, ...] | None
    ) -> Composed:
        if modes is None:
            return compose(base, [self._layers[n] for n in names if n in self._layers])
        chosen = []
        for name, mode in zip(names, modes, strict=True):
            layer = self._previous.get(name) if mode == "from" else self._layers.get(name)
            if layer is not None:
                chosen.append(layer)
        composed = compose(base, chosen)
        if "hold" in modes:
            composed.document[HOLD_KEY] = True
        return composed
