"""``driftless``: one console script; each package contributes its own subcommands.

Rules:
- Each package's ``cli`` module adds its commands with ``add_subcommands(top)``
  and sets ``dispatch`` on them; importing those modules imports only argparse,
  and a command imports what it runs when it runs, so ``driftless agent run``
  never loads the hub's FastAPI/SQLModel stack on a device.
- This module only composes them and configures logging (JSON lines, or console),
  except for commands whose output is for people (``keys``, ``bundle``:
  ``plain_output``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from devtools.cli import add_subcommands as add_devtools
from edge_agent.cli import add_subcommands as add_agent
from edge_agent.lock_cli import add_subcommands as add_agent_lock
from firmware_bundles.cli import add_subcommands as add_bundles
from hub.cli import add_subcommands as add_hub
from simulator.cli import add_subcommands as add_simulator

# In the order ``driftless --help`` lists them.
CONTRIBUTORS: tuple[Callable[[Any], None], ...] = (
    add_hub,
    add_agent,
    add_agent_lock,  # `agent lock …`, under the agent command added just before
    add_devtools,
    add_bundles,
    add_simulator,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftless", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("DRIFTLESS_LOG_LEVEL", "info"))
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=os.environ.get("DRIFTLESS_LOG_FORMAT", "json"),
    )
    top = parser.add_subparsers(dest="command", required=True)
    for contribute in CONTRIBUTORS:
        contribute(top)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not getattr(args, "plain_output", False):
        from plumbing import logs

        logs.configure(args.log_level, fmt=args.log_format)
    dispatch: Callable[[argparse.Namespace], int] = args.dispatch
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
