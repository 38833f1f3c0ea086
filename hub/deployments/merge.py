"""Layered deployments: one device's desired document from its layers, and what changes.

Pure: no I/O, no clock (docs/orchestration.md, "Layers").

Rules:
- The **base** layer is the device's own document (what ``PUT /devices/{id}/desired``
  or ``PUT /fleet/desired`` set, kept as ``device.manual_config``). Its non-workload
  members (``lock_override``, anything free-form) pass through unchanged; only the
  base has them.
- Every deployment assigned to the device is a layer with a priority. Per workload
  **name**, the entry of the highest-priority layer wins, whole: entries are
  replaced, never deep-merged, so what a device runs for a name comes from exactly
  one source and the contributions say which. Equal priorities: the smaller
  deployment name wins (a tie is reported, so the preview can flag it). Any
  deployment outranks the base.
- Workloads are sorted by name, so the same layers give the same document, byte for
  byte (:func:`canonical`): a generation is bumped only when that changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from protocols.bundles import WORKLOADS_KEY

BASE_SOURCE = "device"
"""The contribution name of the device's own document."""


def deployment_source(name: str) -> str:
    """The contribution name of a deployment."""
    return f"deployment:{name}"


@dataclass(frozen=True, slots=True)
class Layer:
    """One deployment's part of a device's document."""

    name: str
    priority: int
    workloads: tuple[Mapping[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Shadowed:
    """A workload a layer defines but another layer won."""

    workload: str
    loser: str
    winner: str
    tie: bool
    """The two had the same priority; the name decided."""


@dataclass(frozen=True, slots=True)
class Composed:
    """A device's merged document and who contributed each workload."""

    document: dict[str, Any]
    contributions: dict[str, str]
    shadowed: tuple[Shadowed, ...] = ()


def _rank(layer: Layer) -> tuple[int, str]:
    # Sorting ascending by this puts the winner first: highest priority, then smallest name.
    return (-layer.priority, layer.name)


def _named(entry: Mapping[str, Any]) -> str | None:
    name = entry.get("name") if isinstance(entry, Mapping) else None
    return name if isinstance(name, str) else None


def compose(base: Mapping[str, Any], layers: Sequence[Layer]) -> Composed:
    """The document of a device whose own document is ``base`` and that is assigned
    ``layers`` (any order)."""
    document = {k: v for k, v in base.items() if k != WORKLOADS_KEY}
    chosen: dict[str, Mapping[str, Any]] = {}
    contributions: dict[str, str] = {}
    winner_of: dict[str, Layer] = {}
    shadowed: list[Shadowed] = []
    for layer in sorted(layers, key=_rank):
        for entry in layer.workloads:
            name = _named(entry)
            if name is None:
                continue
            won = winner_of.get(name)
            if won is not None:
                if won.name != layer.name:
                    shadowed.append(
                        Shadowed(
                            name,
                            deployment_source(layer.name),
                            deployment_source(won.name),
                            tie=won.priority == layer.priority,
                        )
                    )
                continue
            winner_of[name] = layer
            chosen[name] = entry
            contributions[name] = deployment_source(layer.name)
    base_workloads = base.get(WORKLOADS_KEY)
    if isinstance(base_workloads, list):
        for entry in base_workloads:
            name = _named(entry)
            if name is None:
                continue
            if name in chosen:
                shadowed.append(Shadowed(name, BASE_SOURCE, contributions[name], tie=False))
                continue
            chosen[name] = entry
            contributions[name] = BASE_SOURCE
        unnamed = [entry for entry in base_workloads if _named(entry) is None]
    else:
        unnamed = []
    if not layers:
        # Nothing assigned: the device's own document, exactly as it was set.
        return Composed(dict(base), contributions)
    if chosen or unnamed or WORKLOADS_KEY in base:
        document[WORKLOADS_KEY] = [dict(chosen[name]) for name in sorted(chosen)] + unnamed
    return Composed(document, dict(sorted(contributions.items())), tuple(shadowed))


_ENCODER = msgspec.json.Encoder(order="sorted")


def canonical(document: Mapping[str, Any]) -> bytes:
    """The document as sorted-key JSON: equal bytes mean an equal document."""
    return _ENCODER.encode(document)


@dataclass(frozen=True, slots=True)
class DocumentDiff:
    """What a new document changes in a device's workloads (by name) and elsewhere."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    before: dict[str, Any]
    after: dict[str, Any]
    other_changed: bool
    """A member besides ``workloads`` changed (only the base layer has those)."""

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.other_changed)


def _by_name(document: Mapping[str, Any]) -> dict[str, Any]:
    workloads = document.get(WORKLOADS_KEY)
    if not isinstance(workloads, list):
        return {}
    return {name: entry for entry in workloads if (name := _named(entry)) is not None}


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> DocumentDiff:
    """Per workload name: added, removed, changed (entries compared canonically)."""
    before, after = _by_name(old), _by_name(new)
    added = tuple(sorted(after.keys() - before.keys()))
    removed = tuple(sorted(before.keys() - after.keys()))
    changed = tuple(
        sorted(
            name
            for name in before.keys() & after.keys()
            if canonical(before[name]) != canonical(after[name])
        )
    )
    rest_old = {k: v for k, v in old.items() if k != WORKLOADS_KEY}
    rest_new = {k: v for k, v in new.items() if k != WORKLOADS_KEY}
    touched = set(added) | set(removed) | set(changed)
    return DocumentDiff(
        added=added,
        removed=removed,
        changed=changed,
        before={name: before.get(name) for name in sorted(touched)},
        after={name: after.get(name) for name in sorted(touched)},
        other_changed=canonical(rest_old) != canonical(rest_new),
    )
