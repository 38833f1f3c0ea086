"""Command-line front end: ``keys …`` and ``bundle …``, for the main ``driftless`` CLI.

The main CLI calls :func:`add_subcommands` with its subparsers and, when the
parsed namespace has ``bundles_handler`` set, :func:`dispatch`. Until it does,
``python -m firmware_bundles.cli`` runs the same commands.

Rules:
- Exit status: 0 success; 1 the data failed verification (a BundleError);
  2 bad usage (argparse); 3 a local problem (key file, passphrase, missing
  file, invalid argument).
- Every failure prints exactly one line on stderr, ``error: <Kind>: <reason>``,
  and nothing on stdout.
- Passphrases come from environment variables named on the command line,
  never from arguments (which other users can read in the process list).
- The clock is read here and passed down; nothing below reads it.
- ``bundle build --run FILE`` takes the manifest's whole ``run`` object as JSON,
  decoded as strictly as a device decodes it, then checked against the source
  tree (program present and executable, a health rule that can be met); every
  problem is refused before anything is written, with the field named.
- Importing this module costs only argparse and the errors module: handlers
  import the library when they run, so the main CLI can build its parser
  without loading cryptography for unrelated subcommands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from firmware_bundles.errors import BundleError, LocalError

DAY_S = 24 * 3600
EXIT_OK = 0
EXIT_INVALID = 1
EXIT_LOCAL = 3

Handler = Callable[[argparse.Namespace], int]


def _now() -> int:
    return int(time.time())


def _passphrase(variable: str | None) -> bytes | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise LocalError(f"environment variable {variable} is not set or empty")
    return value.encode("utf-8")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _keys_init_root(args: argparse.Namespace) -> int:
    from firmware_bundles import keydir

    now = _now()
    root = keydir.init_root(
        args.dir,
        threshold=args.threshold,
        count=args.keys,
        now=now,
        expires=now + args.expires_days * DAY_S,
        passphrase=_passphrase(args.passphrase_env),
    )
    _out(
        f"root version {root.version}: {len(root.roles['root'].keyids)} root key(s), "
        f"threshold {root.roles['root'].threshold}, written to {args.dir / keydir.ROOT_FILE}"
    )
    return EXIT_OK


def _keys_add(args: argparse.Namespace) -> int:
    from firmware_bundles import keydir

    now = _now()
    key, root = keydir.add_key(
        args.dir,
        role=args.role,
        out=args.out,
        now=now,
        expires=now + args.expires_days * DAY_S,
        passphrase=_passphrase(args.passphrase_env),
        root_passphrase=_passphrase(args.root_passphrase_env),
        threshold=args.threshold,
    )
    _out(f"{args.role} key {key.keyid} written to {args.out}; root version {root.version}")
    return EXIT_OK


def _keys_rotate_root(args: argparse.Namespace) -> int:
    from firmware_bundles import keydir

    now = _now()
    root_passphrase = _passphrase(args.root_passphrase_env)
    new_passphrase = (
        _passphrase(args.new_passphrase_env) if args.new_passphrase_env else root_passphrase
    )
    root = keydir.rotate_root(
        args.dir,
        now=now,
        expires=now + args.expires_days * DAY_S,
        root_passphrase=root_passphrase,
        new_passphrase=new_passphrase,
        threshold=args.threshold,
        count=args.keys,
    )
    _out(f"root version {root.version}: root keys rotated")
    return EXIT_OK


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--env {pair!r} is not NAME=VALUE")
        env[name] = value
    return env


RUN_FLAGS = {
    "command": "--command",
    "env": "--env",
    "working_dir": "--working-dir",
    "restart": "--restart",
    "health_command": "--health-command",
}
"""The flags that spell a ``run`` on the command line; ``--run FILE`` replaces them all."""


def _refuse_repeated(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for name, value in pairs:
        if name in seen:
            raise ValueError(f"member {name[:40]!r} appears twice in one object")
        seen[name] = value
    return seen


def _read_run_file(path: Path) -> Any:
    """The ``run`` object of ``--run FILE`` (``-``: stdin), strictly decoded; raises ValueError.

    Strict as the device is: unknown fields, wrong types, fractions where whole
    numbers go, out-of-range values and repeated members are refused, and the
    message names the field (``run.checks[0].port``).
    """
    import msgspec

    from firmware_bundles.model import RunSpec

    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise LocalError(f"cannot read run file {path}: {exc.strerror or exc}") from None
    try:
        tree = json.loads(data, object_pairs_hook=_refuse_repeated)
    except UnicodeDecodeError:
        raise ValueError(f"run file {path} is not UTF-8 JSON") from None
    except ValueError as exc:
        raise ValueError(f"run file {path}: not valid JSON: {exc}") from None
    if not isinstance(tree, dict):
        raise ValueError(f"run file {path} must hold one JSON object, not {type(tree).__name__}")
    try:
        return msgspec.json.decode(data, type=RunSpec)
    except msgspec.ValidationError as exc:
        where = str(exc).replace("`$.", "`run.").replace("`$`", "`run`")
        raise ValueError(f"run file {path}: {where}") from None


def run_problems(run: Any, src_dir: Path) -> list[str]:
    """What makes ``run`` unable to work from ``src_dir`` on a device (empty: none).

    Beyond the model's field rules: a health rule no workload could meet, a
    reserved variable, and a program or working directory missing from the
    bundle (or not executable), which a device would only find out at start.
    """
    from firmware_bundles.model import AliveCheck

    problems = []
    deadline_ms = run.health_deadline_s * 1000
    if run.min_healthy_ms > deadline_ms:
        problems.append(
            f"run.min_healthy_ms {run.min_healthy_ms} is longer than run.health_deadline_s "
            f"{run.health_deadline_s} s: the workload could never turn healthy in time"
        )
    for index, check in enumerate(run.checks):
        if isinstance(check, AliveCheck) and check.for_ms > deadline_ms:
            problems.append(
                f"run.checks[{index}].for_ms {check.for_ms} is longer than "
                f"run.health_deadline_s {run.health_deadline_s} s: it could never pass in time"
            )
    problems += [
        f"run.env.{name}: DRIFTLESS_* names are reserved for the runtime"
        for name in run.env
        if name.startswith("DRIFTLESS_")
    ]
    workdir = src_dir / run.working_dir
    if not workdir.is_dir():
        problems.append(f"run.working_dir {run.working_dir!r} is not a directory in {src_dir}")
    program = run.command[0]
    if "/" in program and not program.startswith("/"):
        path = src_dir / program
        if not path.is_file():
            problems.append(f"run.command[0] {program!r} is not a file in {src_dir}")
        elif not os.access(path, os.X_OK):
            problems.append(f"run.command[0] {program!r} is not executable (chmod +x it)")
    return problems


def _run_spec(args: argparse.Namespace) -> Any:
    """The manifest's ``run`` from ``--run FILE`` or the flags; None for none; raises ValueError."""
    from firmware_bundles.model import HealthCheck, RunSpec

    given = [flag for dest, flag in RUN_FLAGS.items() if getattr(args, dest) not in (None, [])]
    if args.run is not None:
        if given:
            raise ValueError(f"--run FILE replaces {', '.join(given)}: put those in the file")
        run = _read_run_file(args.run)
        problems = run_problems(run, args.src_dir)
        if problems:
            raise ValueError(f"run file {args.run}: " + "; ".join(problems))
        return run
    if not args.command:
        if given:
            raise ValueError(f"{', '.join(given)} given without --command")
        return None
    health = HealthCheck(command=shlex.split(args.health_command)) if args.health_command else None
    return RunSpec(
        command=shlex.split(args.command),
        env=_env_pairs(args.env),
        working_dir=args.working_dir or ".",
        restart=args.restart or "on-failure",
        health=health,
    )


def _bundle_build(args: argparse.Namespace) -> int:
    from firmware_bundles import archive

    if args.kind == "firmware" and not args.arch:
        raise ValueError("a firmware bundle needs --arch")
    run = _run_spec(args)
    if run is None and args.kind == "app":
        raise ValueError("an app bundle needs --command or --run FILE")
    now = _now()
    manifest = archive.build(
        args.src_dir,
        name=args.name,
        version=args.version,
        security_version=args.security_version,
        kind=args.kind,
        architectures=args.arch or ["any"],
        min_agent_version=args.min_agent_version,
        run=run,
        created=now,
        expires=now + args.expires_days * DAY_S,
        out=args.out,
    )
    _out(
        f"built {args.out}: {manifest.name} {manifest.version}, payload "
        f"{manifest.payload.size} bytes sha256 {manifest.payload.sha256} (unsigned)"
    )
    return EXIT_OK


def _bundle_sign(args: argparse.Namespace) -> int:
    from firmware_bundles import archive
    from firmware_bundles.keys import load_private_key

    key = load_private_key(args.key, _passphrase(args.passphrase_env))
    manifest = archive.sign(args.file, key)
    _out(f"signed {args.file} ({manifest.name} {manifest.version}) with key {key.keyid}")
    return EXIT_OK


def _bundle_verify(args: argparse.Namespace) -> int:
    from firmware_bundles import archive
    from firmware_bundles.trust import TrustedRoot

    try:
        root_bytes = args.root.read_bytes()
    except OSError as exc:
        raise LocalError(f"cannot read root metadata {args.root}: {exc.strerror}") from None
    trusted = TrustedRoot.from_bytes(root_bytes)
    manifest = archive.verify(args.file, trusted, _now(), args.clock_skew_s)
    _out(
        f"ok: {manifest.name} {manifest.version} ({manifest.kind}, security version "
        f"{manifest.security_version}, {manifest.payload.size} bytes, "
        f"root version {trusted.version})"
    )
    return EXIT_OK


def _bundle_inspect(args: argparse.Namespace) -> int:
    import msgspec

    from firmware_bundles import archive

    info = archive.inspect(args.file)
    document: dict[str, Any] = {
        "verified": False,
        "format_version": info.format_version,
        "manifest_bytes": info.manifest_bytes,
        "payload_offset": info.payload_offset,
        "payload_bytes": info.payload_bytes,
        "signatures": info.keyids,
        "manifest": msgspec.to_builtins(info.manifest),
    }
    _out(json.dumps(document, indent=2, sort_keys=True))
    return EXIT_OK


def add_subcommands(subparsers: Any) -> None:
    """Add ``keys`` and ``bundle`` to an argparse subparsers object.

    Each leaf parser sets ``bundles_handler``; pass the parsed namespace to
    :func:`dispatch`.
    """
    keys = subparsers.add_parser("keys", help="fleet root metadata and signing keys")
    keys.set_defaults(dispatch=dispatch, plain_output=True)
    keys_sub = keys.add_subparsers(dest="keys_cmd", required=True)

    init = keys_sub.add_parser("init-root", help="create root keys and root version 1")
    init.add_argument("--dir", type=Path, required=True)
    init.add_argument("--threshold", type=int, default=1)
    init.add_argument("--keys", type=int, default=1, help="how many root keys")
    init.add_argument("--expires-days", type=int, default=365)
    init.add_argument("--passphrase-env", metavar="VAR", help="encrypt root keys with $VAR")
    init.set_defaults(bundles_handler=_keys_init_root)

    add = keys_sub.add_parser("add", help="create a release or hub key, authorise it in a new root")
    add.add_argument("--dir", type=Path, required=True)
    add.add_argument("--role", choices=("release", "hub"), required=True)
    add.add_argument("--out", type=Path, required=True, help="private key file to create")
    add.add_argument("--threshold", type=int, default=None)
    add.add_argument("--expires-days", type=int, default=365, help="of the new root version")
    add.add_argument("--passphrase-env", metavar="VAR", help="encrypt the new key with $VAR")
    add.add_argument("--root-passphrase-env", metavar="VAR", help="root keys' passphrase")
    add.set_defaults(bundles_handler=_keys_add)

    rotate = keys_sub.add_parser("rotate-root", help="replace the root keys in a new root")
    rotate.add_argument("--dir", type=Path, required=True)
    rotate.add_argument("--threshold", type=int, default=None)
    rotate.add_argument("--keys", type=int, default=None)
    rotate.add_argument("--expires-days", type=int, default=365)
    rotate.add_argument("--root-passphrase-env", metavar="VAR", help="current root keys")
    rotate.add_argument("--new-passphrase-env", metavar="VAR", help="new root keys")
    rotate.set_defaults(bundles_handler=_keys_rotate_root)

    bundle = subparsers.add_parser("bundle", help="build, sign, verify and inspect bundles")
    bundle.set_defaults(dispatch=dispatch, plain_output=True)
    bundle_sub = bundle.add_subparsers(dest="bundle_cmd", required=True)

    build = bundle_sub.add_parser("build", help="pack a directory into an unsigned bundle")
    build.add_argument("src_dir", type=Path, metavar="SRC_DIR")
    build.add_argument("--name", required=True)
    build.add_argument("--version", required=True)
    build.add_argument("--security-version", type=int, default=0)
    build.add_argument("--kind", choices=("app", "firmware"), default="app")
    build.add_argument("--arch", action="append", default=[], help="repeatable; default any")
    build.add_argument("--min-agent-version", default="0")
    build.add_argument(
        "--run",
        type=Path,
        metavar="FILE",
        help="the manifest's run object as JSON (every field of docs/bundles.md; - for stdin)",
    )
    build.add_argument("--command", help="the app's command line (shell-quoted)")
    build.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    build.add_argument("--working-dir", help="default .")
    build.add_argument(
        "--restart", choices=("always", "on-failure", "never"), help="default on-failure"
    )
    build.add_argument("--health-command", help="exec health probe (shell-quoted)")
    build.add_argument("--expires-days", type=int, default=90)
    build.add_argument("--out", type=Path, required=True)
    build.set_defaults(bundles_handler=_bundle_build)

    sign = bundle_sub.add_parser("sign", help="add a release key's signature to a bundle")
    sign.add_argument("file", type=Path, metavar="FILE")
    sign.add_argument("--key", type=Path, required=True)
    sign.add_argument("--passphrase-env", metavar="VAR")
    sign.set_defaults(bundles_handler=_bundle_sign)

    verify = bundle_sub.add_parser("verify", help="verify a bundle against root metadata")
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument("--root", type=Path, required=True, metavar="ROOT_JSON")
    verify.add_argument("--clock-skew-s", type=int, default=None)
    verify.set_defaults(bundles_handler=_bundle_verify)

    inspect = bundle_sub.add_parser("inspect", help="print a bundle's manifest (unverified)")
    inspect.add_argument("file", type=Path, metavar="FILE")
    inspect.set_defaults(bundles_handler=_bundle_inspect)


def _fail(kind: str, message: object) -> None:
    line = " ".join(str(message).split())
    sys.stderr.write(f"error: {kind}: {line}\n")


def dispatch(args: argparse.Namespace) -> int:
    """Run the handler a parsed namespace names; returns the exit status (see module rules)."""
    handler: Handler = args.bundles_handler
    try:
        return handler(args)
    except BundleError as exc:
        _fail(type(exc).__name__, exc)
        return EXIT_INVALID
    except LocalError as exc:
        _fail(type(exc).__name__, exc)
        return EXIT_LOCAL
    except ValueError as exc:
        _fail("InvalidArgument", exc)
        return EXIT_LOCAL
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        _fail(type(exc).__name__, f"{exc.strerror or exc}{where}")
        return EXIT_LOCAL


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (keys/bundle commands only) and run it; returns the exit status."""
    parser = argparse.ArgumentParser(prog="driftless", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    return dispatch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
