"""``driftless apply|diff|delete|get|describe|rollout|jobs``: the operator's commands
(argparse only).

Rule: importing this module imports only argparse; :func:`dispatch` imports the
commands (httpx, PyYAML, jsonschema) when one runs, so ``driftless agent run``
pays nothing for them (``driftless.cli`` imports this module only for these
commands or for the full help).
"""

from __future__ import annotations

import argparse
from typing import Any

COMMANDS = ("apply", "diff", "delete", "get", "describe", "rollout", "jobs")
ROLLOUT_ACTIONS = ("pause", "resume", "abort", "promote", "retry-failed")
JOB_STATES = ("queued", "in_progress", "succeeded", "failed", "timed_out", "canceled", "expired")


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
    """Add apply, diff, delete, get, describe, rollout and jobs to the top-level subparsers."""
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

    rollout = _rollout(top, common)
    jobs = _jobs(top, common)

    for parser in (apply, diff, delete, get, describe, rollout, jobs):
        parser.set_defaults(dispatch=dispatch, plain_output=True)


def _shown(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the hub's JSON as it is")
    parser.add_argument(
        "--device-ids",
        type=int,
        default=10,
        metavar="N",
        help="device ids listed per list (failed, unknown; default 10; 0: all the hub sent)",
    )


def _reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reason", default="", metavar="TEXT", help="why, kept with the rollout (256 at most)"
    )


def _rollout(top: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    rollout: argparse.ArgumentParser = top.add_parser(
        "rollout",
        help="a deployment's rollout: status (live with --watch), pause, resume, abort, "
        "promote, retry-failed",
        description="Show or steer the newest rollout of a deployment. Exit: 0 done (a "
        "watched rollout succeeded), 1 the hub refused or could not be reached (a watched "
        "rollout was aborted or superseded), 2 bad usage, 3 declined, 130 Ctrl-C.",
    )
    actions = rollout.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser(
        "status",
        parents=[common],
        help="the rollout's state, waves, progress, failed and unknown devices, notes",
    )
    status.add_argument("name", metavar="NAME", help="the deployment")
    status.add_argument(
        "--watch",
        "-w",
        action="store_true",
        help="redraw until the rollout ends (exit 0 succeeded, 1 aborted or superseded)",
    )
    status.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between polls (2)"
    )
    _shown(status)
    helps = {
        "pause": "stop handing out the change (devices in flight finish)",
        "resume": "carry on after a pause",
        "abort": "stop and restore the previous version on every touched device",
        "promote": "end a pause that waits for a promote (or a timed pause early)",
        "retry-failed": "give the failed and timed-out devices another go",
    }
    for action in ROLLOUT_ACTIONS:
        parser = actions.add_parser(action, parents=[common], help=helps[action])
        parser.add_argument("name", metavar="NAME", help="the deployment")
        _reason(parser)
        if action == "abort":
            parser.add_argument("--yes", "-y", action="store_true", help="abort without asking")
        else:
            parser.set_defaults(yes=True)
        _shown(parser)
        parser.set_defaults(watch=False)
    return rollout


def _jobs(top: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    jobs: argparse.ArgumentParser = top.add_parser(
        "jobs",
        help="one-shot commands on devices: list, get ID, cancel ID",
        description="Exit: 0 done, 1 the hub refused or could not be reached, 2 bad usage.",
    )
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="jobs, newest first")
    listing.add_argument("--state", choices=JOB_STATES, default=None, help="only this state")
    listing.add_argument("--device", default=None, metavar="ID", help="only jobs for this device")
    listing.add_argument("--limit", type=int, default=100, metavar="N", help="at most N (100)")
    listing.add_argument("--json", action="store_true", help="print the hub's JSON as it is")
    get = actions.add_parser("get", parents=[common], help="one job, with each device's result")
    get.add_argument("id", metavar="ID")
    _shown(get)
    cancel = actions.add_parser(
        "cancel", parents=[common], help="cancel a job on every device that has not started it"
    )
    cancel.add_argument("id", metavar="ID")
    _reason(cancel)
    _shown(cancel)
    return jobs


def dispatch(args: argparse.Namespace) -> int:
    from ctl.commands import main

    return main(args)
