"""``driftless broker …`` and ``driftless demo``: Mosquitto tooling and the demo.

``broker config`` writes the mutual-TLS configuration for a Mosquitto you run
yourself, ``broker identity`` issues an admin certificate, ``broker run`` runs a
development broker in the foreground. Rule: importing this module imports only
argparse; each command imports what it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def add_subcommands(top: Any) -> None:
    """Add ``broker config|identity|run`` and ``demo`` to ``top``."""
    parser = top.add_parser(
        "broker", help="Mosquitto: configs for your own, identities, a dev broker"
    )
    parser.set_defaults(dispatch=dispatch_broker)
    broker = parser.add_subparsers(dest="broker_cmd", required=True)
    bconf = broker.add_parser(
        "config", help="write a mutual-TLS Mosquitto config (fleet CA, device ACL, CRL)"
    )
    bconf.add_argument(
        "--identity-dir", type=Path, required=True, help="the hub's fleet CA (made if missing)"
    )
    bconf.add_argument("--out", type=Path, required=True, help="where config and TLS files go")
    bconf.add_argument("--host", default="0.0.0.0", help="listen address")
    bconf.add_argument("--port", type=int, default=8883)
    bconf.add_argument("--hub-client-id", default="driftless-hub")
    bconf.add_argument("--db", default=None, help="the hub's DB: revocations so far go in")
    bident = broker.add_parser(
        "identity",
        help="issue a client certificate for an 'admin:NAME' (an operations console, a bridge)",
    )
    bident.add_argument(
        "--identity-dir", type=Path, required=True, help="the hub's fleet CA (made if missing)"
    )
    bident.add_argument(
        "--name", required=True, help="'admin:NAME'; give it to hub serve --broker-acl-admin"
    )
    bident.add_argument("--out", type=Path, required=True, help="where NAME.crt and NAME.key go")
    brun = broker.add_parser("run", help="run Mosquitto with a generated config until Ctrl-C")
    brun.add_argument("--data-dir", type=Path, default=Path(".driftless/broker"))
    brun.add_argument("--port", type=int, default=0, help="0 picks a free port")
    brun.add_argument(
        "--identity-dir",
        type=Path,
        default=Path(".driftless/identity"),
        help="the hub's fleet CA (made if missing): client certificates from it are required",
    )
    brun.add_argument("--hub-client-id", default="driftless-hub")
    brun.add_argument(
        "--plain", action="store_true", help="a plain loopback listener, no TLS (experiments)"
    )

    demo = top.add_parser("demo", help="broker + hub + agents on loopback, converging live")
    demo.set_defaults(dispatch=dispatch_demo)
    demo.add_argument("--devices", type=int, default=3)
    demo.add_argument("--api-port", type=int, default=8080)
    demo.add_argument("--data-dir", type=Path, default=Path(".driftless/demo"))
    demo.add_argument(
        "--plain",
        action="store_true",
        help="a plain loopback MQTT listener instead of mutual TLS (quick experiments)",
    )
    demo.add_argument(
        "--once", action="store_true", help="run the scripted changes, then exit (for CI)"
    )


def dispatch_broker(args: argparse.Namespace) -> int:
    """Run the parsed ``broker`` command; returns the exit status."""
    if args.broker_cmd == "config":
        from devtools.broker import hub_broker_args, write_secure_broker
        from hub.identity import IdentityError

        try:
            written = write_secure_broker(
                identity_dir=args.identity_dir,
                out_dir=args.out,
                host=args.host,
                port=args.port,
                hub_client_id=args.hub_client_id,
                db_url=args.db,
            )
        except (IdentityError, OSError, ValueError) as exc:
            print(f"driftless broker config: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {written.config_path}; run: mosquitto -c {written.config_path}")
        flags = hub_broker_args(written, args.identity_dir, url=f"mqtts://HOST:{args.port}")
        print("hub flags: " + " ".join(flags))
        return 0
    if args.broker_cmd == "identity":
        return _broker_identity(args.identity_dir, args.name, args.out)
    from devtools.demo import run_broker

    return run_broker(
        data_dir=args.data_dir,
        port=args.port or None,
        identity_dir=None if args.plain else args.identity_dir,
        hub_client_id=args.hub_client_id,
    )


def dispatch_demo(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status."""
    from devtools.demo import run_demo

    return run_demo(
        devices=args.devices,
        api_port=args.api_port,
        data_dir=args.data_dir,
        once=args.once,
        plain=args.plain,
    )


def _broker_identity(identity_dir: Path, name: str, out: Path) -> int:
    """``broker identity``: a key and certificate for an admin name, from the fleet CA."""
    import datetime as dt

    from hub.identity import (
        CertificateAuthority,
        IdentityError,
        check_service_name,
        client_identity,
    )

    try:
        check_service_name(name, kinds=("admin",))
        now = dt.datetime.now(dt.UTC)
        ca = CertificateAuthority.load_or_create(identity_dir, now=now)
        cert, key = client_identity(ca, out, name, now=now)
    except (IdentityError, OSError, ValueError) as exc:
        print(f"driftless broker identity: {exc}", file=sys.stderr)
        return 1
    print(f"certificate {cert}\nkey         {key} (0600; it holds fleet-wide broker rights)")
    print(f"hub flag: --broker-acl-admin {name}")
    return 0
