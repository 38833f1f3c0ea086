"""What ``driftless rollout`` and ``driftless jobs`` print: rollout views and jobs as text (pure).

Rules:
- Pure: the API's JSON (dicts) and ``now`` in, text out; no I/O, no clock, no
  terminal queries (whether stdout is a terminal is the caller's input).
- Read leniently (``.get`` with defaults), like :mod:`ctl.render`: a field the hub
  adds later shows nothing, a missing one shows ``-``; nothing here raises on an
  answer of the contract's shape.
- The bar is ASCII (CI logs and the demo's recording show it as is): ``#``
  succeeded, ``x`` failed (failed + timed_out), ``?`` unknown, ``>`` in flight
  (in_flight + soaking), ``.`` the rest (pending, staging, staged,
  waiting_window). Segment edges are rounded from cumulative counts, so the bar is
  always exactly ``width`` wide and a state's share is never off by more than one
  character.
- Device lists are cut at ``ids`` entries with ``… (+N more)``; the hub caps them
  at 100 itself, so the "more" count comes from the view's counts, not the list.
- Waves are numbered from 1 for people (the view's ``wave`` and ``index`` are
  0-based).
- The live view (:func:`frame`) redraws in place with cursor-home and
  erase-to-end-of-line/screen rather than clearing the screen first, so it does not
  flicker; :func:`line` is the one-line form printed per change when stdout is not a
  terminal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from ctl.render import age, plural

TERMINAL = frozenset({"succeeded", "aborted", "superseded"})
STATES = (
    "scheduled",
    "running",
    "paused",
    "waiting_promote",
    "succeeded",
    "aborted",
    "superseded",
)
DEVICE_STATES = (
    "pending",
    "staging",
    "staged",
    "waiting_window",
    "in_flight",
    "soaking",
    "succeeded",
    "failed",
    "timed_out",
    "unknown",
)
BAR_WIDTH = 40
IDS = 10
DETAIL_CHARS = 80

HOME = "\x1b[H"
ERASE_LINE = "\x1b[K"
ERASE_BELOW = "\x1b[J"

_BAR = (("succeeded", "#"), ("failed", "x"), ("unknown", "?"), ("in_flight", ">"))
_STATE_WORDS = {
    "waiting_promote": "waiting for promote",
    "waiting_window": "waiting for window",
    "in_flight": "in flight",
    "timed_out": "timed out",
}


def is_terminal(view: Mapping[str, Any]) -> bool:
    return str(view.get("state")) in TERMINAL


def groups(counts: Mapping[str, Any]) -> dict[str, int]:
    """Pure: the device counts as the bar's groups (see the module's rules) plus ``waiting``."""

    def n(*keys: str) -> int:
        return sum(_int(counts.get(key)) for key in keys)

    return {
        "succeeded": n("succeeded"),
        "failed": n("failed", "timed_out"),
        "unknown": n("unknown"),
        "in_flight": n("in_flight", "soaking"),
        "waiting": n("pending", "staging", "staged", "waiting_window"),
    }


def bar(counts: Mapping[str, Any], width: int = BAR_WIDTH) -> str:
    """Pure: ``[###x?>>.....]`` over every device the counts hold, ``width`` inside."""
    grouped = groups(counts)
    total = sum(grouped.values())
    if total <= 0 or width <= 0:
        return "[" + "." * max(width, 0) + "]"
    cells: list[str] = []
    done = 0
    edge = 0
    for key, mark in _BAR:
        done += grouped[key]
        end = round(width * done / total)
        cells.append(mark * (end - edge))
        edge = end
    cells.append("." * (width - edge))
    return "[" + "".join(cells) + "]"


def tally(counts: Mapping[str, Any]) -> str:
    """Pure: ``10 succeeded, 1 failed, 4 unknown, 3 in flight, 2 waiting`` (zeros left out,
    except succeeded, which is always shown)."""
    grouped = groups(counts)
    parts = [f"{grouped['succeeded']} succeeded"]
    parts += [
        f"{grouped[key]} {word}"
        for key, word in (
            ("failed", "failed"),
            ("unknown", "unknown"),
            ("in_flight", "in flight"),
            ("waiting", "waiting"),
        )
        if grouped[key]
    ]
    return ", ".join(parts)


def breakdown(counts: Mapping[str, Any]) -> str:
    """Pure: every non-zero device state, in the contract's order (``-`` when none)."""
    parts = [
        f"{_int(counts.get(state))} {_word(state)}"
        for state in DEVICE_STATES
        if _int(counts.get(state))
    ]
    return ", ".join(parts) or "-"


def heading(view: Mapping[str, Any]) -> str:
    """Pure: ``deployment/web rollout 3: version 1 -> 2``."""
    source = view.get("from_version")
    change = f"version {source} -> {view.get('to_version', '?')}"
    if source is None:
        change = f"version {view.get('to_version', '?')} (new deployment)"
    return f"deployment/{view.get('deployment', '?')} rollout {view.get('id', '?')}: {change}"


def wave_label(view: Mapping[str, Any]) -> str:
    """Pure: ``wave 2 of 3`` (``no waves yet`` before the hub fixed them)."""
    waves = view.get("waves") or ()
    if not waves:
        return "no waves yet"
    return f"wave {_int(view.get('wave')) + 1} of {len(waves)}"


def status(
    view: Mapping[str, Any], now: datetime, *, ids: int = IDS, width: int = BAR_WIDTH
) -> list[str]:
    """Pure: ``rollout status NAME``: state, waves, bar, staged, times, devices, notes."""
    counts = view.get("counts") or {}
    targeted = _int(view.get("targeted"))
    state = str(view.get("state", "?"))
    reason = str(view.get("reason") or "")
    lines = [
        heading(view),
        f"State:      {_word(state)}" + (f" ({reason})" if reason else ""),
        f"Policy:     {policy(view.get('policy') or {})}",
        f"Progress:   {bar(counts, width)} {tally(counts)} of {plural(targeted, 'device')}",
        f"Devices:    {breakdown(counts)}",
    ]
    staged = _int(view.get("staged"))
    if staged or (view.get("policy") or {}).get("prestage"):
        lines.append(f"Staged:     {staged} of {targeted}")
    lines.append(f"Waves:      {wave_label(view)}")
    waves = view.get("waves") or ()
    if waves:
        lines.append("    WAVE  DEVICES  STATES")
    current = _int(view.get("wave"))
    for wave in waves:
        index = _int(wave.get("index"))
        marker = ">" if index == current and state not in TERMINAL else " "
        lines.append(
            f"  {marker} {index + 1:>4}  {_int(wave.get('size')):>7}  "
            f"{breakdown(wave.get('counts') or {})}"
        )
    lines += [
        f"Created:    {_when(view.get('created_at'), now)}",
        f"Started:    {_when(view.get('started_at'), now)}",
    ]
    if view.get("finished_at"):
        lines.append(f"Finished:   {_when(view.get('finished_at'), now)}")
    if view.get("progress_deadline_at"):
        then = (view.get("policy") or {}).get("on_progress_deadline", "pause")
        lines.append(
            f"Deadline:   progress by {view['progress_deadline_at']} "
            f"({_until(view['progress_deadline_at'], now)}; else {then})"
        )
    lines.extend(_failed(view, counts, ids))
    lines.extend(_unknown(view, counts, ids))
    notes = [str(note) for note in view.get("notes") or ()]
    if notes:
        lines.append("Notes:")
        lines.extend(f"  {note}" for note in notes)
    return lines


def line(view: Mapping[str, Any]) -> str:
    """Pure: one line of the view, for a log (``--watch`` when stdout is not a terminal)."""
    counts = view.get("counts") or {}
    reason = str(view.get("reason") or "")
    state = _word(str(view.get("state", "?"))) + (f" ({reason})" if reason else "")
    return (
        f"deployment/{view.get('deployment', '?')} rollout {view.get('id', '?')}: {state}, "
        f"{wave_label(view)}: {tally(counts)} of {_int(view.get('targeted'))}"
    )


def fresh_notes(seen: Sequence[str], view: Mapping[str, Any]) -> list[str]:
    """Pure: the view's notes not printed yet (the hub keeps the newest, so a note is new
    when it is not among those already printed)."""
    known = set(seen)
    return [str(note) for note in view.get("notes") or () if str(note) not in known]


def frame(lines: Sequence[str], footer: str) -> str:
    """Pure: one redraw of the live view on a terminal (see the module's rules)."""
    body = "".join(text + ERASE_LINE + "\n" for text in [*lines, "", footer])
    return HOME + body + ERASE_BELOW


def outcome(view: Mapping[str, Any]) -> str:
    """Pure: the last line of a watch: how the rollout ended."""
    state = str(view.get("state", "?"))
    reason = str(view.get("reason") or "")
    tail = f": {reason}" if reason else ""
    return f"deployment/{view.get('deployment', '?')} rollout {view.get('id', '?')} {state}{tail}"


def acted(action: str, view: Mapping[str, Any]) -> str:
    """Pure: what an action did, before the view is printed."""
    done = {
        "pause": "paused",
        "resume": "resumed",
        "abort": "aborted (the previous version is being restored)",
        "promote": "promoted",
        "retry-failed": "retrying its failed devices",
    }.get(action, action)
    return (
        f"deployment/{view.get('deployment', '?')} rollout {view.get('id', '?')} {done}; "
        f"now {_word(str(view.get('state', '?')))}"
    )


def policy(raw: Mapping[str, Any]) -> str:
    """Pure: the policy in one line: strategy, pauses, limits, soak, gates, deadlines."""
    return ", ".join([*_stages(raw), *_gates(raw)])


def _stages(raw: Mapping[str, Any]) -> list[str]:
    """How the change is cut up and paced: strategy, pause, in-flight limit, rate."""
    strategy = str(raw.get("strategy") or "all-at-once")
    parts = [strategy]
    if strategy == "canary":
        canary = raw.get("canary") or {}
        size = (
            f"{_num(canary['percent'])}%"
            if canary.get("percent") is not None
            else plural(_int(canary.get("count") or 1), "device")
        )
        parts[0] = f"canary of {size}"
    if strategy == "waves" and raw.get("waves"):
        parts[0] = "waves " + ", ".join(str(w) for w in raw["waves"])
    pause = raw.get("pause_s")
    if pause is not None:
        parts.append(f"pause {_seconds(pause)}")
    elif strategy == "canary":
        parts.append("pause until promoted")
    if raw.get("max_in_flight"):
        parts.append(f"at most {raw['max_in_flight']} in flight")
    rate = raw.get("rate") or {}
    if rate.get("per_minute"):
        parts.append(f"{_num(rate['per_minute'])}/min")
    return parts


def _gates(raw: Mapping[str, Any]) -> list[str]:
    """What judges it and when: soak, threshold, quorum, deadline, prestage, window."""
    parts = []
    soak = raw.get("soak") or {}
    if soak.get("seconds") or soak.get("reports"):
        parts.append(
            f"soak {_seconds(soak.get('seconds') or 0)} and "
            f"{plural(_int(soak.get('reports')), 'healthy report')}"
        )
    threshold = raw.get("failure_threshold") or {}
    if threshold:
        limit = (
            f"{threshold['count']} failed"
            if threshold.get("count") is not None
            else f"{_num(threshold.get('percent', 20))}% failed"
        )
        parts.append(f"{threshold.get('action', 'abort')} at {limit}")
    quorum = raw.get("quorum") or {}
    if quorum:
        parts.append(
            f"quorum {_num(quorum.get('percent'))}% within {_seconds(quorum.get('within_s'))}"
        )
    if raw.get("apply_deadline_s") is not None:
        parts.append(f"apply deadline {_seconds(raw['apply_deadline_s'])}")
    if raw.get("prestage"):
        at = raw.get("activate_at")
        parts.append("prestaged" + (f", activate at {at}" if at else ", activate on promote"))
    if raw.get("window"):
        parts.append(f"window {raw['window']}")
    return parts


# ---------------------------------------------------------------- jobs

JOB_COLUMNS = ("ID", "STATE", "TARGET", "COMMAND", "DEVICES", "AGE")
COMMAND_CHARS = 40


def jobs_table(jobs: Sequence[Mapping[str, Any]], now: datetime) -> list[str]:
    """Pure: ``jobs list`` as aligned columns."""
    rows = [JOB_COLUMNS]
    for job in jobs:
        rows.append(
            (
                str(job.get("id", "?")),
                str(job.get("state", "?")),
                _target(job),
                _cut(" ".join(str(a) for a in job.get("command") or ()), COMMAND_CHARS),
                _job_counts(job),
                age(job.get("created_at"), now),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(JOB_COLUMNS))]
    return [
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def job(view: Mapping[str, Any], now: datetime, *, ids: int = IDS) -> list[str]:
    """Pure: ``jobs get ID``: the job, its counts, and each device's state and result."""
    reason = str(view.get("reason") or "")
    lines = [
        f"job/{view.get('id', '?')}: {view.get('state', '?')}" + (f" ({reason})" if reason else ""),
        f"Command:    {' '.join(str(a) for a in view.get('command') or ())}",
        f"Target:     {_target(view)}",
        f"Deadline:   {_seconds(view.get('deadline_s') or 0)} per device",
        f"Created:    {_when(view.get('created_at'), now)}",
        f"Expires:    {view.get('expires_at') or '-'} ({_until(view.get('expires_at'), now)})",
        f"Devices:    {_job_counts(view)}",
    ]
    if view.get("finished_at"):
        lines.insert(5, f"Finished:   {_when(view.get('finished_at'), now)}")
    devices = list(view.get("devices") or ())
    if devices:
        lines.append("Per device:")
        for device in devices if ids <= 0 else devices[:ids]:
            result = []
            if device.get("exit_code") is not None:
                result.append(f"exit {device['exit_code']}")
            if device.get("message"):
                result.append(_cut(str(device["message"]), DETAIL_CHARS))
            lines.append(
                f"  {device.get('device_id', '?')}  {device.get('state', '?')}"
                + (f"  {'; '.join(result)}" if result else "")
            )
        total = _int(view.get("devices_total")) or len(devices)
        if 0 < ids < total:
            lines.append(f"  … (+{total - min(ids, len(devices))} more)")
    return lines


def _target(job: Mapping[str, Any]) -> str:
    if job.get("device_id"):
        return f"device {job['device_id']}"
    selector = job.get("selector")
    return f'selector "{selector}"' if selector else "every device"


def _job_counts(job: Mapping[str, Any]) -> str:
    counts = job.get("counts") or {}
    parts = [f"{n} {state}" for state, n in counts.items() if _int(n)]
    targeted = _int(job.get("targeted"))
    return f"{targeted}: " + (", ".join(parts) or "-") if targeted else ", ".join(parts) or "-"


# ---------------------------------------------------------------- helpers


def _failed(view: Mapping[str, Any], counts: Mapping[str, Any], ids: int) -> list[str]:
    failed = list(view.get("failed_devices") or ())
    total = max(_int(counts.get("failed")) + _int(counts.get("timed_out")), len(failed))
    if not total:
        return []
    lines = [f"Failed devices ({total}):"]
    shown = failed if ids <= 0 else failed[:ids]
    for device in shown:
        detail = _cut(str(device.get("detail") or ""), DETAIL_CHARS)
        lines.append(
            f"  {device.get('device_id', '?')}  {_word(str(device.get('state', 'failed')))}"
            + (f"  {detail}" if detail else "")
        )
    if total > len(shown):
        lines.append(f"  … (+{total - len(shown)} more)")
    return lines


def _unknown(view: Mapping[str, Any], counts: Mapping[str, Any], ids: int) -> list[str]:
    unknown = [str(d) for d in view.get("unknown_devices") or ()]
    total = max(_int(counts.get("unknown")), len(unknown))
    if not total:
        return []
    shown = unknown if ids <= 0 else unknown[:ids]
    text = ", ".join(shown)
    if total > len(shown):
        text += (", " if text else "") + f"… (+{total - len(shown)} more)"
    return [f"Unknown devices ({total}, offline: neither passed nor failed): {text}"]


def _word(state: str) -> str:
    return _STATE_WORDS.get(state, state)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _num(value: object) -> str:
    """Pure: a number without a needless ``.0`` (other values as they are)."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _seconds(value: object) -> str:
    """Pure: seconds as ``45s``, ``10m``, ``1h30m`` (other values as they are)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    seconds = int(value)
    if seconds < 120 or seconds % 60:
        return f"{value:g}s"
    minutes = seconds // 60
    if minutes < 120 or minutes % 60:
        return f"{minutes}m"
    return f"{minutes // 60}h"


def _when(moment: object, now: datetime) -> str:
    return f"{moment} ({age(str(moment), now)} ago)" if moment else "-"


def _until(moment: object, now: datetime) -> str:
    """Pure: ``in 25m`` or ``passed 3m ago`` for an ISO 8601 time."""
    if not moment:
        return "-"
    try:
        then = datetime.fromisoformat(str(moment))
    except ValueError:
        return "-"
    if then.tzinfo is None or now.tzinfo is None:
        then, now = then.replace(tzinfo=None), now.replace(tzinfo=None)
    if then >= now:
        return "in " + age(now.isoformat(), then)
    return f"passed {age(then.isoformat(), now)} ago"
