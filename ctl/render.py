"""What the operator reads: previews, tables and descriptions, as text (pure).

Rules:
- Pure: API answers (JSON as dicts) and ``now`` in, text out; no I/O, no clock.
- A preview groups devices whose change is the same (same workloads added,
  removed and changed, to the same entries), so a fleet-wide change of 5,000
  devices is one block, not 5,000; each group lists ``ids`` device ids (0: all).
  Unplaceable devices are grouped by their reasons the same way.
- Markers: ``+`` added, ``-`` removed, ``~`` changed; ``!`` unplaceable devices
  and ties (two deployments of equal priority offering one workload: the smaller
  name wins). A changed workload lists the fields that differ, values as compact
  JSON cut at :data:`VALUE_CHARS`; bundles show their first 12 hex digits.
- Every preview ends with the hub's own summary line (changed, unchanged,
  unplaceable), so what is printed never contradicts what the hub counted.
- Answers are read leniently (``.get`` with defaults): a field the hub adds later
  shows nothing rather than breaking the command.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

VALUE_CHARS = 60
BUNDLE_CHARS = 12


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def compact(value: object, limit: int = VALUE_CHARS) -> str:
    """Pure: ``value`` as compact JSON (keys sorted), cut to ``limit`` characters."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def heading(name: str, action: str, spec: Mapping[str, Any] | None) -> str:
    """``deployment/NAME: ACTION (kind, priority, selector)``."""
    if not spec:
        return f"deployment/{name}: {action}"
    kind = spec.get("kind", "fleet")
    if kind == "placed":
        kind = f"placed, {plural(int(spec.get('replicas') or 0), 'replica')}"
    selector = spec.get("selector") or ""
    where = f'selector "{selector}"' if selector else "every device"
    return f"deployment/{name}: {action} ({kind}, priority {spec.get('priority', 0)}, {where})"


def preview(preview: Mapping[str, Any], *, ids: int = 5) -> list[str]:
    """Pure: the lines of a preview (indented under its heading), ending with the summary."""
    lines: list[str] = []
    for members, device in _groups(preview.get("devices") or (), _change_key):
        lines.append(f"  ~ {plural(len(members), 'device')}: {_ids(members, ids)}")
        lines.extend("      " + line for line in _workload_lines(device))
    unplaceable = preview.get("unplaceable") or ()
    for members, entry in _groups(unplaceable, lambda e: tuple(e.get("reasons") or ())):
        lines.append(f"  ! {plural(len(members), 'device')} cannot run it: {_ids(members, ids)}")
        lines.extend(f"      {reason}" for reason in entry.get("reasons") or ("(no reason given)",))
    lines.append("  " + summary(preview))
    return lines


def summary(preview: Mapping[str, Any]) -> str:
    """Pure: the hub's counts as one line."""
    counts = preview.get("summary") or {}
    changed = int(counts.get("changed", 0))
    return (
        f"{plural(changed, 'device')} change, {counts.get('unchanged', 0)} unchanged, "
        f"{counts.get('unplaceable', 0)} unplaceable"
    )


def changed_devices(preview: Mapping[str, Any]) -> int:
    return int((preview.get("summary") or {}).get("changed", len(preview.get("devices") or ())))


def _change_key(device: Mapping[str, Any]) -> str:
    """What makes two devices' changes the same (everything but the device id)."""
    return compact({k: v for k, v in device.items() if k != "device_id"}, limit=10**9)


def _groups(
    items: Iterable[Mapping[str, Any]], key: Any
) -> list[tuple[list[str], Mapping[str, Any]]]:
    """Items with equal ``key`` together, in order of first appearance, with their ids."""
    groups: dict[object, tuple[list[str], Mapping[str, Any]]] = {}
    for item in items:
        members, _ = groups.setdefault(key(item), ([], item))
        members.append(str(item.get("device_id", "?")))
    return list(groups.values())


def _ids(members: Sequence[str], shown: int) -> str:
    if shown <= 0 or len(members) <= shown:
        return ", ".join(members)
    return ", ".join(members[:shown]) + f", … (+{len(members) - shown} more)"


def _workload_lines(device: Mapping[str, Any]) -> list[str]:
    before = device.get("before") or {}
    after = device.get("after") or {}
    sources = device.get("contributions") or {}
    lines: list[str] = []
    for name in device.get("added") or ():
        entry = after.get(name) or {}
        lines.append(f"+ {name}  bundle {_bundle(entry.get('bundle'))}{_source(sources, name)}")
    for name in device.get("changed") or ():
        old, new = before.get(name) or {}, after.get(name) or {}
        lines.append(f"~ {name}{_source(sources, name)}")
        for field in sorted(set(old) | set(new)):
            if old.get(field) != new.get(field):
                lines.append(f"    {field}: {_value(field, old, new)}")
    for name in device.get("removed") or ():
        lines.append(f"- {name}")
    lines.extend(
        f"! tie on {name}: equal priority, the smaller deployment name wins"
        for name in device.get("ties") or ()
    )
    return lines


def _value(field: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    if field == "bundle":
        return f"{_bundle(old.get(field))} -> {_bundle(new.get(field))}"
    shown = [compact(side[field]) if field in side else "(none)" for side in (old, new)]
    return " -> ".join(shown)


def _bundle(sha: object) -> str:
    return (
        f"{sha[:BUNDLE_CHARS]}…" if isinstance(sha, str) and len(sha) > BUNDLE_CHARS else str(sha)
    )


def _source(sources: Mapping[str, Any], name: str) -> str:
    source = sources.get(name)
    return f"  (from {source})" if source else ""


# ---------------------------------------------------------------- get and describe


def age(then: str | None, now: datetime) -> str:
    """Pure: how long ago an ISO 8601 time was, as ``45s``, ``12m``, ``5h``, ``3d``."""
    if not then:
        return "-"
    try:
        moment = datetime.fromisoformat(then)
    except ValueError:
        return "-"
    if moment.tzinfo is None or now.tzinfo is None:
        moment, now = moment.replace(tzinfo=None), now.replace(tzinfo=None)
    seconds = max(0, int((now - moment).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size * (2 if unit != "m" else 1):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


TABLE_COLUMNS = (
    "NAME",
    "KIND",
    "PRIORITY",
    "SELECTOR",
    "TARGETED",
    "PLACED",
    "IN-SYNC",
    "FAILED",
    "OFFLINE",
    "UNPLACEABLE",
    "VERSION",
    "AGE",
)
SELECTOR_CHARS = 40


def table(deployments: Sequence[Mapping[str, Any]], now: datetime) -> list[str]:
    """Pure: ``get deployments`` as aligned columns (``-`` where the hub gave no status)."""
    rows = [TABLE_COLUMNS]
    for item in deployments:
        spec = item.get("spec") or {}
        status = item.get("status") or {}
        kind = spec.get("kind", "fleet")
        if kind == "placed":
            kind = f"placed/{spec.get('replicas', '?')}"
        selector = spec.get("selector") or "<all>"
        if len(selector) > SELECTOR_CHARS:
            selector = selector[: SELECTOR_CHARS - 1] + "…"
        counts = [
            str(status[key]) if key in status else "-"
            for key in ("targeted", "placed", "in_sync", "failed", "offline", "unplaceable")
        ]
        rows.append(
            (
                str(item.get("name", "?")),
                kind,
                str(spec.get("priority", 0)),
                selector,
                *counts,
                str(item.get("version", "-")),
                age(item.get("created_at"), now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    return [
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def describe(
    deployment: Mapping[str, Any], status: Mapping[str, Any], spec_yaml: str, now: datetime
) -> list[str]:
    """Pure: ``describe deployment NAME``: what it is, its spec, its status, its instances."""
    spec = deployment.get("spec") or {}
    created, updated = deployment.get("created_at"), deployment.get("updated_at")
    lines = [
        f"Name:        {deployment.get('name', '?')}",
        f"Kind:        {spec.get('kind', 'fleet')}",
        f"Priority:    {spec.get('priority', 0)}",
        f"Selector:    {spec.get('selector') or '<every device>'}",
        f"Version:     {deployment.get('version', '-')}",
        f"Created:     {_when(created, now)}",
        f"Updated:     {_when(updated, now)}",
        "Spec:",
        *("  " + line for line in spec_yaml.rstrip("\n").splitlines()),
        "Status:",
    ]
    for key, label in (
        ("targeted", "Targeted"),
        ("placed", "Placed"),
        ("in_sync", "In sync"),
        ("failed", "Failed"),
        ("offline", "Offline"),
        ("unplaceable", "Unplaceable"),
    ):
        lines.append(f"  {label + ':':<13}{status.get(key, '-')}")
    reasons = status.get("reasons") or {}
    if reasons:
        lines.append("Unplaceable reasons:")
        for reason, count in sorted(reasons.items(), key=lambda kv: (-int(kv[1]), kv[0])):
            lines.append(f"  {count:>5}  {reason}")
    instances = status.get("instances") or ()
    if instances or spec.get("kind") == "placed":
        lines.append("Instances:")
        if not instances:
            lines.append("  (none)")
        for instance in instances:
            lines.extend(_instance_lines(instance))
    return lines


def _when(moment: str | None, now: datetime) -> str:
    return f"{moment} ({age(moment, now)} ago)" if moment else "-"


def _instance_lines(instance: Mapping[str, Any]) -> list[str]:
    index = instance.get("index", instance.get("idx", "?"))
    device = instance.get("device_id") or "(unplaced)"
    parts = [f"  #{index}  {device}"]
    if instance.get("original_device_id") not in (None, instance.get("device_id")):
        parts.append(f"first on {instance['original_device_id']}")
    if instance.get("attempts"):
        parts.append(f"attempts {instance['attempts']}")
    if instance.get("next_attempt_at") is not None:
        parts.append(f"next attempt at {_unix(instance['next_attempt_at'])}")
    if instance.get("reason"):
        parts.append(f"reason: {instance['reason']}")
    lines = ["  ".join(parts)]
    for move in instance.get("history") or ():
        lines.append(
            f"      {_unix(move.get('at'))}  {move.get('from_device') or '-'} -> "
            f"{move.get('to_device') or '-'}  {move.get('reason', '')}".rstrip()
        )
    return lines


def _unix(value: object) -> str:
    """Pure: unix seconds as ISO 8601 UTC (other values as they are)."""
    from datetime import UTC

    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).isoformat(timespec="seconds")
    return str(value)
