"""``driftless rollout …`` and ``driftless jobs …``: steering a deployment's rollout, and jobs.

Rules:
- ``rollout status NAME`` prints the view once; ``--watch`` polls it every
  ``--interval`` seconds until the rollout is terminal: exit 0 when it succeeded,
  1 when it was aborted or superseded, 130 on Ctrl-C (the rollout carries on; only
  the watching stops). On a terminal stdout the view is redrawn in place (ANSI);
  otherwise one line is printed per change, plus each new note, so a CI log or a
  recording reads as a history.
- A watch outlives a hub that cannot be reached for a while (a restart): it says so
  once and keeps polling; a refusal (404, 401, ...) ends it like any command.
- Actions (pause, resume, abort, promote, retry-failed) POST once and print what the
  hub answered. ``abort`` restores the previous version on every touched device, so
  it asks first; without ``--yes`` and without a terminal on stdin it refuses
  before anything is sent (exit 2), as ``apply`` does.
- A refusal names the deployment and what to do: 404 "no rollout" (or no such
  deployment), 409 "the rollout's state does not allow it" with the hub's reason,
  422 the request's fields. Exit codes are :mod:`ctl.commands`' (1 refused or
  unreachable, 2 bad usage, 3 declined, 130 interrupted).
- The clock and the sleep are parameters, so tests run a watch without waiting.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ctl import rollout_render as show
from ctl.commands import Connect, Console, check_name
from ctl.errors import ApiError, HubUnreachable, UsageError

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_DECLINED = 3
EXIT_ENDED_BADLY = 1  # a watched rollout aborted or superseded
EXIT_INTERRUPTED = 130

ACTIONS = ("pause", "resume", "abort", "promote", "retry-failed")
JOB_STATES = ("queued", "in_progress", "succeeded", "failed", "timed_out", "canceled", "expired")
REASON_CHARS = 256
MIN_INTERVAL_S = 0.1
JOB_ID_CHARS = 64

Clock = Callable[[], datetime]
Sleep = Callable[[float], None]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def run(
    args: Any,
    console: Console,
    connect: Connect,
    *,
    clock: Clock | None = None,
    sleep: Sleep | None = None,
) -> int:
    """``rollout`` or ``jobs``, with the real clock and sleep unless given."""
    if args.command == "jobs":
        return jobs(args, console, connect, clock=clock or _utc_now)
    return rollout(args, console, connect, clock=clock or _utc_now, sleep=sleep or time.sleep)


# ---------------------------------------------------------------- rollout


def rollout(
    args: Any,
    console: Console,
    connect: Connect,
    *,
    clock: Clock = _utc_now,
    sleep: Sleep = time.sleep,
) -> int:
    """``driftless rollout ACTION NAME``."""
    check_name(args.name)
    reason = str(getattr(args, "reason", "") or "")
    if len(reason) > REASON_CHARS:
        raise UsageError(f"--reason: at most {REASON_CHARS} characters (got {len(reason)})")
    if args.action == "status":
        if args.interval < MIN_INTERVAL_S:
            raise UsageError(f"--interval: at least {MIN_INTERVAL_S} seconds")
        with connect() as client:
            try:
                if args.watch:
                    return _watch(args, console, client, clock, sleep)
                view = client.get_rollout(args.name)
            except ApiError as exc:
                raise _explained(exc, args.name, "status") from None
        _print(view, args, console, clock())
        return EXIT_OK
    if args.action not in ACTIONS:  # pragma: no cover - argparse's choices
        raise UsageError(f"unknown rollout action {args.action!r}")
    if args.action == "abort" and not args.yes and not console.interactive:
        console.warn(
            "error: abort restores the previous version on every device the rollout touched; "
            "stdin is not a terminal, so nobody can confirm: pass --yes to go ahead "
            "(nothing was changed)"
        )
        return EXIT_USAGE
    with connect() as client:
        try:
            if args.action == "abort" and not args.yes:
                current = client.get_rollout(args.name)
                console.warn(show.line(current))
                if not console.confirm(
                    "Abort it and restore the previous version on every device it touched?"
                ):
                    console.warn("declined: nothing changed")
                    return EXIT_DECLINED
            view = client.rollout_action(args.name, args.action, reason=reason)
        except ApiError as exc:
            raise _explained(exc, args.name, args.action) from None
    if not args.json:
        console.warn(show.acted(args.action, view))
    _print(view, args, console, clock())
    return EXIT_OK


def _print(view: dict[str, Any], args: Any, console: Console, now: datetime) -> None:
    if args.json:
        console.say(json.dumps(view, indent=2, sort_keys=True))
    else:
        console.say(*show.status(view, now, ids=args.device_ids))


def _watch(args: Any, console: Console, client: Any, clock: Clock, sleep: Sleep) -> int:
    """Poll until the rollout is terminal; see the module's rules."""
    screen = _Screen(args, console)
    unreachable = False
    try:
        while True:
            try:
                view = client.get_rollout(args.name)
            except HubUnreachable as exc:
                if not unreachable:
                    console.warn(f"warning: {exc}; still trying every {args.interval:g}s")
                unreachable = True
                sleep(args.interval)
                continue
            if unreachable:
                console.warn("the hub answers again")
            unreachable = False
            screen.draw(view, clock())
            if show.is_terminal(view):
                if not args.json:
                    console.say(show.outcome(view))
                return EXIT_OK if view.get("state") == "succeeded" else EXIT_ENDED_BADLY
            sleep(args.interval)
    except KeyboardInterrupt:
        console.warn("\nstopped watching; the rollout carries on (driftless rollout status NAME)")
        return EXIT_INTERRUPTED


class _Screen:
    """How a watch shows each view: redrawn in place on a terminal, else a line per change
    (and each new note), or with ``--json`` one JSON line per change."""

    def __init__(self, args: Any, console: Console) -> None:
        self._args = args
        self._console = console
        self._last = ""
        self._notes: list[str] = []
        self._footer = f"every {args.interval:g}s; Ctrl-C stops watching (the rollout carries on)"

    def draw(self, view: dict[str, Any], now: datetime) -> None:
        console = self._console
        if not self._args.json and console.out_tty:
            lines = show.status(view, now, ids=self._args.device_ids)
            stamp = now.astimezone(UTC).strftime("%H:%M:%SZ")
            console.out.write(show.frame(lines, f"{stamp}  {self._footer}"))
            console.out.flush()
            return
        text = json.dumps(view, sort_keys=True) if self._args.json else show.line(view)
        if text != self._last:
            console.say(text)
        self._last = text
        if not self._args.json:
            for note in show.fresh_notes(self._notes, view):
                console.say(f"  note: {note}")
                self._notes.append(note)


def _explained(exc: ApiError, name: str, action: str) -> ApiError:
    """The refusal with a first line that says what it means for this command."""
    if exc.status == 404:
        lead = f"deployment/{name}: no rollout to {action if action != 'status' else 'show'}"
        hint = (
            " (no such deployment, or no change of it has been rolled out yet: "
            "driftless get deployments)"
        )
    elif exc.status == 409:
        lead = f"deployment/{name}: the rollout's state does not allow {action}"
        hint = " (driftless rollout status NAME shows its state)"
    elif exc.status == 422:
        lead = f"deployment/{name}: the hub refused the {action} request as malformed"
        hint = ""
    else:
        return exc
    return ApiError(
        method=exc.method,
        path=exc.path,
        status=exc.status,
        title=lead,
        detail=exc.detail + hint,
        errors=exc.errors,
    )


# ---------------------------------------------------------------- jobs


def jobs(args: Any, console: Console, connect: Connect, *, clock: Clock = _utc_now) -> int:
    """``driftless jobs list | get ID | cancel ID``."""
    if args.action == "list":
        return _jobs_list(args, console, connect, clock)
    job_id = str(args.id)
    if not job_id or len(job_id) > JOB_ID_CHARS or any(c.isspace() for c in job_id):
        raise UsageError(f"{job_id!r} is not a job id (1 to {JOB_ID_CHARS} characters, no spaces)")
    reason = str(getattr(args, "reason", "") or "")
    if len(reason) > REASON_CHARS:
        raise UsageError(f"--reason: at most {REASON_CHARS} characters (got {len(reason)})")
    with connect() as client:
        try:
            if args.action == "get":
                view = client.get_job(job_id)
            else:
                view = client.cancel_job(job_id, reason=reason)
        except ApiError as exc:
            raise _job_refusal(exc, job_id) from None
    if args.json:
        console.say(json.dumps(view, indent=2, sort_keys=True))
        return EXIT_OK
    if args.action == "cancel":
        console.warn(f"job/{job_id} cancel requested; now {view.get('state', '?')}")
    console.say(*show.job(view, clock(), ids=args.device_ids))
    return EXIT_OK


def _jobs_list(args: Any, console: Console, connect: Connect, clock: Clock) -> int:
    if args.limit < 1:
        raise UsageError("--limit: at least 1")
    with connect() as client:
        items = client.list_jobs(state=args.state, device_id=args.device, limit=args.limit)
    if args.json:
        console.say(json.dumps({"items": items}, indent=2, sort_keys=True))
    elif not items:
        console.warn("no jobs")
    else:
        console.say(*show.jobs_table(items, clock()))
    return EXIT_OK


def _job_refusal(exc: ApiError, job_id: str) -> ApiError:
    titles = {404: f"job/{job_id}: no such job", 409: f"job/{job_id}: cannot be canceled now"}
    hints = {404: " (driftless jobs list shows the jobs)"}
    if exc.status not in titles:
        return exc
    return ApiError(
        method=exc.method,
        path=exc.path,
        status=exc.status,
        title=titles[exc.status],
        detail=exc.detail + hints.get(exc.status, ""),
        errors=exc.errors,
    )
