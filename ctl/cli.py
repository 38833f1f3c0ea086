"""``driftless apply|diff|delete|get|describe``: the operator's commands (argparse only).

Rule: importing this module imports only argparse; :func:`dispatch` imports the
commands (httpx, PyYAML, jsonschema) when one runs, so ``driftless agent run``
pays nothing for them (``driftless.cli`` imports this module only for these
commands or for the full help).
"""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS = ("apply", "diff", "delete", "get", "describe")


def _connection() -> argparse.ArgumentParser:
    """The options every command shares: where the hub is and how to prove who we are."""
    common = argparse.ArgumentParser(add_help=False)
    hub = common.add_argument_group("the hub")
    hub.add_argument(
        "--hub",
        default=None,
        metavar="URL",
        help="the hub's address, http(s)://HOST:PORT "
        "(default: $DRIFTLESS_HUB_URL, else http://127.0.0.1:8080)",
    )
    hub.add_argument(
        "--token-file",
        default=None,
        metavar="FILE",
        help="a file whose first line is the API token (default: $DRIFTLESS_TOKEN_FILE)",
    )
    hub.add_argument(
        "--token",
        default=None,
        help="the API token itself; visible to other users in the process list, so prefer "
        "--token-file or $DRIFTLESS_TOKEN (the default)",
    )
    hub.add_argument(
        "--ca-file",
        default=None,
        metavar="PEM",
        help="CA certificate(s) that verify an https:// hub (default: the system's)",
    )
    hub.add_argument("--timeout-s", type=float, default=30.0, help="per request (default 30)")
    return common


def _files(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "-f",
        "--filename",
        dest="filenames",
        action="append",
        default=[],
        required=required,
        metavar="FILE|DIR|-",
        help="a YAML or JSON file of Deployment documents, a directory of them "
        "(*.yaml, *.yml, *.json), or - for stdin; repeat for more",
    )


def _preview_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=("text", "json"),
        default="text",
        help="the preview as text (default) or as the hub's JSON",
    )
    parser.add_argument(
        "--device-ids",
        type=int,
        default=5,
        metavar="N",
        help="device ids listed per group of identical changes (default 5; 0: all)",
    )


def add_subcommands(top: Any) -> None:
    """Add apply, diff, delete, get and describe to the top-level subparsers."""
    common = _connection()

    apply = top.add_parser(
        "apply",
        parents=[common],
        help="create or update deployments from files, after a preview",
        description="Preview what the files change on every device, ask, then apply. "
        "Exit: 0 done, 1 the hub refused, 2 bad usage or invalid file, 3 declined.",
    )
    _files(apply, required=True)
    apply.add_argument("--yes", "-y", action="store_true", help="apply without asking")
    _preview_options(apply)

    diff = top.add_parser(
        "diff",
        parents=[common],
        help="show what apply -f would change, change nothing",
        description="Preview what the files would change. Exit: 0 no changes, 1 changes, "
        "2 bad usage or invalid file, 4 the hub refused or could not be reached.",
    )
    _files(diff, required=True)
    _preview_options(diff)

    delete = top.add_parser(
        "delete",
        parents=[common],
        help="delete deployments (from files, or by name), after a preview",
        description="driftless delete -f FILE, or driftless delete deployment NAME [NAME ...]",
    )
    _files(delete, required=False)
    delete.add_argument("target", nargs="*", metavar="deployment NAME", help="what to delete")
    delete.add_argument("--yes", "-y", action="store_true", help="delete without asking")
    delete.add_argument(
        "--ignore-not-found", action="store_true", help="a name the hub does not know is no error"
    )
    _preview_options(delete)

    get = top.add_parser(
        "get",
        parents=[common],
        help="list deployments, or show one",
        description="driftless get deployments | driftless get deployment NAME",
    )
    get.add_argument("resource", choices=("deployments", "deployment", "deploy"))
    get.add_argument("name", nargs="?", default=None, help="one deployment")
    get.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")

    describe = top.add_parser(
        "describe",
        parents=[common],
        help="one deployment: its spec, status counts, unplaceable reasons and instances",
    )
    describe.add_argument("resource", choices=("deployment", "deployments", "deploy"))
    describe.add_argument("name")

    for parser in (apply, diff, delete, get, describe):
        parser.set_defaults(dispatch=dispatch, plain_output=True)


def dispatch(args: argparse.Namespace) -> int:
    from ctl.commands import main

    return main(args)
