"""``driftless``: one console script; each package contributes its own subcommands.

Rules:
- Each package's ``cli`` module adds its commands with ``add_subcommands(top)``
  and sets ``dispatch`` on them; importing those modules imports only argparse,
  and a command imports what it runs when it runs, so ``driftless agent run``
  never loads the hub's FastAPI/SQLModel stack on a device.
- Only the module that contributes the command being run is imported and asked
  for its parser (:data:`CONTRIBUTORS` says which module adds which commands):
  ``driftless agent run`` pays for no other package's parser, on every device.
  Without a known command (``--help``, a typo, an abbreviated top-level option)
  every module contributes, so help and errors list all commands.
- This module only composes them and configures logging (JSON lines, or console),
  except for commands whose output is for people (``keys``, ``bundle``:
  ``plain_output``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

# The module that adds each command, in the order ``driftless --help`` lists them.
CONTRIBUTORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hub.cli", ("hub",)),
    ("ctl.cli", ("apply", "diff", "delete", "get", "describe", "rollout", "jobs")),
    ("edge_agent.cli", ("agent",)),
    ("devtools.cli", ("broker", "demo")),
    ("firmware_bundles.cli", ("keys", "bundle")),
    ("simulator.cli", ("sim",)),
)
# Top-level options that take a value (the value is not the command).
VALUED_OPTIONS = ("--log-level", "--log-format")


def command_of(argv: Sequence[str]) -> str | None:
    """Pure: the command ``argv`` runs, or None when that is not plain to see.

    None for ``-h``, an unknown option (an abbreviation, say) or no command at
    all: the caller then builds the whole parser, which handles all of those.
    """
    tokens = iter(argv)
    for token in tokens:
        if token in VALUED_OPTIONS:
            next(tokens, None)
        elif token.startswith(tuple(f"{option}=" for option in VALUED_OPTIONS)):
            continue
        elif token.startswith("-"):
            return None
        else:
            return token
    return None


def contributors_for(command: str | None) -> tuple[str, ...]:
    """Pure: the ``cli`` modules to import for ``command`` (all of them if it is unknown)."""
    for module, commands in CONTRIBUTORS:
        if command in commands:
            return (module,)
    return tuple(module for module, _ in CONTRIBUTORS)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``'s command alone, or for every command when ``argv`` is None
    or names none (see :func:`command_of`)."""
    parser = argparse.ArgumentParser(prog="driftless", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("DRIFTLESS_LOG_LEVEL", "info"))
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=os.environ.get("DRIFTLESS_LOG_FORMAT", "json"),
    )
    top = parser.add_subparsers(dest="command", required=True)
    command = command_of(argv) if argv is not None else None
    for module in contributors_for(command):
        contribute: Callable[[object], None] = importlib.import_module(module).add_subcommands
        contribute(top)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if not getattr(args, "plain_output", False):
        from plumbing import logs

        logs.configure(args.log_level, fmt=args.log_format)
    dispatch: Callable[[argparse.Namespace], int] = args.dispatch
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
