"""``driftless agent lock take|renew|release|show``: a workload's update lock from a shell.

Rules:
- Importing this module imports only argparse; a command imports the lock
  files module when it runs (on a device, every import costs memory).
- The lock directory is ``--lock-dir`` (default ``$DRIFTLESS_LOCK_DIR``, which
  the runtime gives every workload) or ``<--data-dir>/locks``.
- Exit status: 0 done, 1 the lock is someone else's (take, renew, release) or
  not held (renew), 2 bad arguments or an unusable directory. ``show`` prints
  one JSON object per lock (``workload``, ``holder``, ``until``, ``expired``)
  and, for files that are not locks, ``{"file": …, "ignored": reason}``.
- ``driftless/cli.py`` composes it under ``agent`` (:func:`add_subcommands`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

_COMMANDS = ("take", "renew", "release", "show")


def add_lock_parser(agent_commands: Any) -> None:
    """Add ``lock`` with its four commands to the ``agent`` subcommand group."""
    lock = agent_commands.add_parser("lock", help="take, renew, release or show update locks")
    lock.set_defaults(dispatch=dispatch)
    commands = lock.add_subparsers(dest="lock_cmd", required=True)
    for name in _COMMANDS:
        sub = commands.add_parser(name, help=f"{name} an update lock")
        where = sub.add_mutually_exclusive_group()
        where.add_argument("--data-dir", type=Path, help="the agent's data directory")
        where.add_argument(
            "--lock-dir", type=Path, help="the lock directory (default $DRIFTLESS_LOCK_DIR)"
        )
        sub.add_argument(
            "--max-lease-s",
            type=float,
            default=3600.0,
            help="the agent's cap on any lease, seconds (its setting)",
        )
        if name != "show":
            sub.add_argument("--workload", required=True)
            sub.add_argument("--holder", required=True)
        if name in ("take", "renew"):
            sub.add_argument("--lease-s", type=float, required=True)


def _directory(args: argparse.Namespace) -> Path | None:
    if args.lock_dir is not None:
        return Path(args.lock_dir)
    if args.data_dir is not None:
        from edge_agent.supervisor.lockfiles import lock_dir

        return lock_dir(args.data_dir)
    env = os.environ.get("DRIFTLESS_LOCK_DIR")
    return Path(env) if env else None


def dispatch(args: argparse.Namespace) -> int:
    """Run ``agent lock …``; returns the exit status (module rules)."""
    from edge_agent.supervisor import lockfiles

    directory = _directory(args)
    prog = f"driftless agent lock {args.lock_cmd}"
    if directory is None:
        print(f"{prog}: give --data-dir or --lock-dir, or set DRIFTLESS_LOCK_DIR", file=sys.stderr)
        return 2
    now = time.time()
    try:
        if args.lock_cmd == "show":
            return _show(directory, now, args.max_lease_s)
        if args.lock_cmd == "release":
            lockfiles.release(directory, args.workload, args.holder)
            return 0
        change = lockfiles.take if args.lock_cmd == "take" else lockfiles.renew
        change(
            directory,
            args.workload,
            args.holder,
            args.lease_s,
            now=now,
            max_lease_s=args.max_lease_s,
        )
    except lockfiles.LockConflict as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    return 0


def _show(directory: Path, now: float, max_lease_s: float) -> int:
    from edge_agent.supervisor import lockfiles
    from edge_agent.supervisor.locks import lease_end

    found, problems = lockfiles.scan(directory)
    for lock in found:
        until = lease_end(
            lock.request,
            written_at=lock.written_at,
            seen_mono=0.0,
            now=now,
            now_mono=0.0,
            max_lease_s=max_lease_s,
        )
        line = {
            "workload": lock.workload,
            "holder": lock.request.holder,
            "until": round(until, 3),
            "expired": until <= now,
        }
        print(json.dumps(line))
    for name, why in problems.items():
        print(json.dumps({"file": name, "ignored": why}))
    return 0
