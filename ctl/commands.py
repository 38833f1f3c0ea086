"""``driftless apply/diff/delete/get/describe``: what each command does, in order
(``rollout`` and ``jobs`` are :mod:`ctl.rollouts`'; their errors end here too).

Rules:
- Files are read and checked against the schema before the hub is asked anything;
  a bad file changes nothing and costs no request.
- ``apply`` asks the hub for a dry run of every document first (the same code path
  as the change, ``PUT …?dry_run=true``), prints each preview, and writes only the
  deployments that would change something: new ones, ones whose spec differs from
  the stored one (compared after the hub's normalisation: the dry run's spec), and
  ones whose preview changes devices. Then it asks ``Apply N changes? [y/N]`` on a
  terminal, refuses without ``--yes`` when stdin is not one, and PUTs for real, in
  file order, printing each result; if the real answer's preview differs from the
  dry run's (another change landed in between), it says so.
- ``diff`` is ``apply``'s first half: exit 0 when nothing would change, 1 when
  something would.
- ``delete`` previews each removal (``DELETE …?dry_run=true``), asks the same way,
  then deletes.
- Exit codes (:data:`EXIT_OK` …): 0 done; 1 the hub refused or could not be
  reached; 2 bad usage or an invalid file; 3 the operator declined. ``diff``: 0 no
  changes, 1 changes, 2 bad usage or an invalid file, 4 the hub refused or could
  not be reached. Ctrl-C (at the question, say) is 130.
- Output for people goes to stdout; prompts, warnings and errors to stderr, so
  ``-o json`` output can be piped while the prompt still shows.
- The clock is read once here (for ages in tables) and passed down.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any, Literal

from ctl import documents, render
from ctl.client import HubClient
from ctl.errors import ApiError, CtlError, DocumentError, HubUnreachable, UsageError

EXIT_OK = 0
EXIT_API = 1
EXIT_USAGE = 2
EXIT_DECLINED = 3
EXIT_CHANGES = 1  # diff
EXIT_DIFF_API = 4  # diff: 1 already means "changes"
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
DEFAULT_HUB_URL = "http://127.0.0.1:8080"

Action = Literal["created", "configured", "unchanged", "deleted"]


@dataclass
class Console:
    """Where the command writes and asks."""

    out: IO[str]
    err: IO[str]
    stdin: IO[str]
    interactive: bool
    """Whether stdin is a terminal a person can answer a question on."""
    out_tty: bool = False
    """Whether stdout is a terminal (``rollout status --watch`` redraws in place)."""

    @classmethod
    def system(cls) -> Console:
        return cls(sys.stdout, sys.stderr, sys.stdin, sys.stdin.isatty(), sys.stdout.isatty())

    def say(self, *lines: str) -> None:
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()

    def warn(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    def confirm(self, question: str) -> bool:
        """``question [y/N]`` on stderr; True only for y or yes."""
        self.err.write(f"{question} [y/N] ")
        self.err.flush()
        return self.stdin.readline().strip().lower() in ("y", "yes")


@dataclass(frozen=True)
class Planned:
    """One deployment's dry run: what the hub would do with it."""

    name: str
    source: str
    action: Action
    spec: Mapping[str, Any] | None
    preview: Mapping[str, Any]
    document: documents.Document | None = field(default=None, compare=False)

    @property
    def changes(self) -> bool:
        return self.action != "unchanged" or bool(self.preview.get("devices"))

    def lines(self, ids: int) -> list[str]:
        return [
            render.heading(self.name, self.action, self.spec),
            *render.preview(self.preview, ids=ids),
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "action": self.action,
            "preview": self.preview,
        }


Connect = Callable[[], HubClient]


def run(
    args: Any,
    *,
    console: Console,
    connect: Connect,
    clock: Callable[[], datetime] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> int:
    """Run the parsed command; every CtlError becomes its message and exit code.

    ``clock`` and ``sleep`` (default: the real ones) are for ``rollout status --watch``
    and the ages printed by ``rollout`` and ``jobs``."""
    command: str = args.command
    try:
        if command in ("apply", "diff"):
            return _apply(args, console, connect, diff_only=command == "diff")
        if command == "delete":
            return _delete(args, console, connect)
        if command == "get":
            return _get(args, console, connect)
        if command == "describe":
            return _describe(args, console, connect)
        if command in ("rollout", "jobs"):
            from ctl import rollouts

            return rollouts.run(args, console, connect, clock=clock, sleep=sleep)
        raise UsageError(f"unknown command {command!r}")
    except DocumentError as exc:  # one line per violation, as compilers do
        for violation in exc.violations:
            console.warn(f"error: {violation}")
        console.warn(f"{render.plural(len(exc.violations), 'problem')}; nothing was sent")
        return EXIT_USAGE
    except UsageError as exc:
        console.warn(f"error: {exc}")
        return EXIT_USAGE
    except (ApiError, HubUnreachable) as exc:
        console.warn(f"error: {exc}")
        return EXIT_DIFF_API if command == "diff" else EXIT_API
    except CtlError as exc:  # pragma: no cover - every CtlError is one of the above
        console.warn(f"error: {exc}")
        return EXIT_API
    except KeyboardInterrupt:
        console.warn("\ninterrupted: what the hub already answered stays done")
        return EXIT_INTERRUPTED


# ---------------------------------------------------------------- apply and diff


def _apply(args: Any, console: Console, connect: Connect, *, diff_only: bool) -> int:
    docs = documents.load(args.filenames, stdin=console.stdin)
    if not docs:
        raise UsageError("the files hold no document")
    with connect() as client:
        plans = [_dry_run(client, document) for document in docs]
        _show(plans, console, args)
        pending = [plan for plan in plans if plan.changes]
        if diff_only:
            return EXIT_CHANGES if pending else EXIT_OK
        if not pending:
            console.warn("nothing to apply: the hub already has every deployment as written")
            return EXIT_OK
        refused = _ask(console, args, f"Apply {len(pending)} changes?", pending)
        if refused is not None:
            return refused
        for done, plan in enumerate(pending):
            assert plan.document is not None
            try:
                answer = client.put_deployment(plan.name, plan.document.spec, dry_run=False)
            except (ApiError, HubUnreachable) as exc:
                console.warn(f"error: {exc}")
                console.warn(f"applied {done} of {len(pending)}; the rest were not sent")
                return EXIT_API
            _report_applied(plan, answer, console)
    return EXIT_OK


def _dry_run(client: HubClient, document: documents.Document) -> Planned:
    current = client.find_deployment(document.name)
    answer = client.put_deployment(document.name, document.spec, dry_run=True)
    would_be = (answer.get("deployment") or {}).get("spec") or document.spec
    action: Action
    if current is None:
        action = "created"
    elif current.get("spec") != would_be:
        action = "configured"
    else:
        action = "unchanged"
    return Planned(
        name=document.name,
        source=document.where,
        action=action,
        spec=would_be,
        preview=answer.get("preview") or {},
        document=document,
    )


def _show(plans: Sequence[Planned], console: Console, args: Any) -> None:
    if args.output == "json":
        console.say(json.dumps([plan.as_json() for plan in plans], indent=2, sort_keys=True))
        return
    for plan in plans:
        console.say(*plan.lines(args.device_ids))
    total = sum(render.changed_devices(plan.preview) for plan in plans)
    changing = sum(plan.changes for plan in plans)
    console.say(
        f"{render.plural(changing, 'deployment')} to change of {len(plans)}; "
        f"{render.plural(total, 'device document')} change"
    )


def _ask(console: Console, args: Any, question: str, pending: Sequence[Planned]) -> int | None:
    """None to go on; else the exit code (declined, or cannot ask)."""
    if args.yes:
        return None
    if not console.interactive:
        console.warn(
            "error: stdin is not a terminal, so nobody can confirm: pass --yes to go ahead "
            "(nothing was changed)"
        )
        return EXIT_USAGE
    if console.confirm(question):
        return None
    console.warn(
        f"declined: nothing changed ({render.plural(len(pending), 'deployment')} left as they are)"
    )
    return EXIT_DECLINED


def _report_applied(plan: Planned, answer: Mapping[str, Any], console: Console) -> None:
    deployment = answer.get("deployment") or {}
    preview = answer.get("preview") or {}
    version = deployment.get("version")
    tag = f" (version {version})" if version is not None else ""
    console.say(f"deployment/{plan.name} {plan.action}{tag}: {render.summary(preview)}")
    if _comparable(preview) != _comparable(plan.preview):
        console.warn(
            f"warning: deployment/{plan.name}: the hub's answer differs from the preview "
            "shown (another change landed in between); what it did:"
        )
        console.warn("\n".join(render.preview(preview)))


def _comparable(preview: Mapping[str, Any]) -> object:
    return json.dumps(
        {"devices": preview.get("devices"), "unplaceable": preview.get("unplaceable")},
        sort_keys=True,
    )


# ---------------------------------------------------------------- delete


def _delete(args: Any, console: Console, connect: Connect) -> int:
    if args.filenames:
        if args.target:
            raise UsageError("give either -f FILE or deployment NAME, not both")
        names = [
            (doc.name, doc.where) for doc in documents.load(args.filenames, stdin=console.stdin)
        ]
    else:
        names = [(name, "command line") for name in _names(args.target)]
    with connect() as client:
        plans = []
        for name, source in names:
            try:
                answer = client.delete_deployment(name, dry_run=True)
            except ApiError as exc:
                if exc.status == 404 and args.ignore_not_found:
                    console.warn(f"deployment/{name}: not found, nothing to delete")
                    continue
                raise
            plans.append(Planned(name, source, "deleted", None, answer.get("preview") or {}))
        if not plans:
            return EXIT_OK
        _show(plans, console, args)
        refused = _ask(console, args, f"Delete {render.plural(len(plans), 'deployment')}?", plans)
        if refused is not None:
            return refused
        for done, plan in enumerate(plans):
            try:
                answer = client.delete_deployment(plan.name, dry_run=False)
            except (ApiError, HubUnreachable) as exc:
                console.warn(f"error: {exc}")
                console.warn(f"deleted {done} of {len(plans)}; the rest were not sent")
                return EXIT_API
            _report_applied(plan, answer, console)
    return EXIT_OK


def _names(target: Sequence[str]) -> list[str]:
    """The names after ``deployment`` on the command line, checked."""
    if not target:
        raise UsageError("say what to delete: -f FILE, or deployment NAME")
    kind, *names = target
    if kind not in ("deployment", "deployments", "deploy"):
        raise UsageError(f"{kind!r}: only deployments can be deleted (deployment NAME)")
    if not names:
        raise UsageError("deployment NAME: give at least one name")
    for name in names:
        check_name(name)
    return names


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise UsageError(
            f"{name!r} is not a deployment name (lowercase letters, digits and '-', "
            "starting with a letter or digit, at most 63)"
        )


# ---------------------------------------------------------------- get and describe


def _get(args: Any, console: Console, connect: Connect) -> int:
    if args.name is not None:
        check_name(args.name)
    with connect() as client:
        if args.name is None:
            items = client.list_deployments()
            whole: object = {"items": items, "total": len(items)}
        else:
            items = [client.get_deployment(args.name)]
            whole = items[0]
    if args.output == "json":
        console.say(json.dumps(whole, indent=2, sort_keys=True))
    elif args.output == "yaml":
        console.say(_yaml(whole).rstrip("\n"))
    elif not items:
        console.warn("no deployments")
    else:
        console.say(*render.table(items, datetime.now(UTC)))
    return EXIT_OK


def _describe(args: Any, console: Console, connect: Connect) -> int:
    check_name(args.name)
    with connect() as client:
        deployment = client.get_deployment(args.name)
        status = client.deployment_status(args.name)
    spec_yaml = _yaml(deployment.get("spec") or {})
    console.say(*render.describe(deployment, status, spec_yaml, datetime.now(UTC)))
    return EXIT_OK


def _yaml(value: object) -> str:
    import yaml

    return str(yaml.safe_dump(value, sort_keys=False, default_flow_style=False, allow_unicode=True))


# ---------------------------------------------------------------- the connection


def token_of(args: Any, environ: Mapping[str, str]) -> str:
    """The API token: ``--token``, else ``--token-file``'s first line, else DRIFTLESS_TOKEN.

    Raises UsageError when there is none or the file cannot be read.
    """
    if args.token:
        return str(args.token)
    path = args.token_file or environ.get("DRIFTLESS_TOKEN_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.readline().strip()
        except OSError as exc:
            raise UsageError(f"--token-file {path}: {exc.strerror or exc}") from None
        if not token:
            raise UsageError(f"--token-file {path}: the file is empty")
        return token
    token = environ.get("DRIFTLESS_TOKEN", "")
    if not token:
        raise UsageError(
            "no API token: give --token-file FILE, or set DRIFTLESS_TOKEN "
            "(driftless hub token create makes one; role operator or admin)"
        )
    return token


def main(args: Any) -> int:
    """The console script's entry: real streams, a real connection made when needed."""
    console = Console.system()

    def connect() -> HubClient:
        return HubClient.connect(
            url=args.hub or os.environ.get("DRIFTLESS_HUB_URL") or DEFAULT_HUB_URL,
            token=token_of(args, os.environ),
            ca_file=args.ca_file,
            timeout_s=args.timeout_s,
        )

    return run(args, console=console, connect=connect)
