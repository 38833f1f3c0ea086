"""``driftless hub …``: serve the hub, make API tokens, migrate its database.

Rule: importing this module imports only argparse; each command imports what it
runs when it runs (the console script is also what devices start).
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
    """Add ``hub serve``, ``hub token create`` and ``hub migrate`` to ``top``."""
    parser = top.add_parser("hub", help="the cloud hub")
    parser.set_defaults(dispatch=dispatch)
    hub = parser.add_subparsers(dest="hub_cmd", required=True)
    serve = hub.add_parser("serve", help="run the admin API and the MQTT link in one process")
    serve.add_argument("--broker", default=_env("DRIFTLESS_BROKER", "mqtt://127.0.0.1:1883"))
    serve.add_argument("--db", default=_env("DRIFTLESS_DB", "sqlite:///driftless-hub.db"))
    serve.add_argument("--host", default=_env("DRIFTLESS_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(_env("DRIFTLESS_PORT", "8080")))
    serve.add_argument("--client-id", default=_env("DRIFTLESS_HUB_CLIENT_ID", "driftless-hub"))
    serve.add_argument(
        "--signing-key",
        type=Path,
        action="append",
        default=[Path(p) for p in _env("DRIFTLESS_HUB_SIGNING_KEY", "").split(",") if p],
        help="a hub-role key (driftless keys add --role hub) that signs every desired "
        "document; repeat for a threshold above 1 (passphrase: DRIFTLESS_HUB_KEY_PASSPHRASE)",
    )
    serve.add_argument(
        "--public-broker-url",
        default=_env("DRIFTLESS_PUBLIC_BROKER_URL", "") or None,
        help="the broker URL enrolled devices are told to use (mqtts://HOST:PORT)",
    )
    for flag, env, text in (
        (
            "--bundles-dir",
            "DRIFTLESS_BUNDLES_DIR",
            "bundle files (default: 'bundles' beside the SQLite file)",
        ),
        (
            "--trust-root",
            "DRIFTLESS_TRUST_ROOT",
            "the fleet's root.json; without it bundle uploads are refused (503)",
        ),
        (
            "--identity-dir",
            "DRIFTLESS_IDENTITY_DIR",
            "the fleet CA for device enrollment (default: 'identity' beside the SQLite file)",
        ),
        ("--api-tls-cert", "DRIFTLESS_API_TLS_CERT", "serve the API over HTTPS (PEM)"),
        ("--api-tls-key", "DRIFTLESS_API_TLS_KEY", "its private key (PEM)"),
        ("--broker-ca", "DRIFTLESS_BROKER_CA", "CA file for mqtts:// (default: the fleet CA)"),
        ("--broker-cert", "DRIFTLESS_BROKER_CERT", "client certificate (default: self-issued)"),
        ("--broker-key", "DRIFTLESS_BROKER_KEY", "its key (with --broker-cert)"),
        ("--broker-crl", "DRIFTLESS_BROKER_CRL", "a local broker's CRL file the hub keeps"),
        ("--broker-acl", "DRIFTLESS_BROKER_ACL", "a local broker's ACL file the hub keeps"),
        ("--broker-pid-file", "DRIFTLESS_BROKER_PID_FILE", "SIGHUP this pid after a change"),
    ):
        serve.add_argument(flag, type=Path, default=_env(env, "") or None, help=text)
    serve.add_argument(
        "--no-link",
        action="store_true",
        help="serve the API only; another hub process on the same database runs the MQTT "
        "link (give that one --desired-poll-s)",
    )
    serve.add_argument(
        "--desired-poll-s",
        type=float,
        default=float(_env("DRIFTLESS_DESIRED_POLL_S", "0")),
        help="also publish changes committed by API-only processes, polling this often",
    )
    serve.add_argument(
        "--placement-interval-s",
        type=float,
        default=float(_env("DRIFTLESS_PLACEMENT_INTERVAL_S", "10")),
        help="the placement controller looks at the fleet at least this often",
    )
    serve.add_argument(
        "--rollout-interval-s",
        type=float,
        default=float(_env("DRIFTLESS_ROLLOUT_INTERVAL_S", "1")),
        help="while a rollout is active, its controller looks at least this often",
    )
    serve.add_argument(
        "--broker-acl-admin",
        action="append",
        default=[],
        help="an 'admin:NAME' certificate name given the hub's broker rights in the ACL "
        "(repeatable; issue its certificate with 'driftless broker identity')",
    )
    serve.add_argument(
        "--broker-cutoff",
        choices=("dynsec", "none"),
        default=_env("DRIFTLESS_BROKER_CUTOFF", "dynsec"),
        help="how a decommissioned device's open connections are closed: through the "
        "broker's dynamic security plugin (default), or not at all (ACL reload only)",
    )
    serve.add_argument(
        "--heartbeat-s",
        type=float,
        default=float(_env("DRIFTLESS_HUB_HEARTBEAT_S", "30")),
        help="a device's heartbeat interval when its birth does not say (liveness)",
    )
    serve.add_argument(
        "--offline-after-missed",
        type=int,
        default=int(_env("DRIFTLESS_OFFLINE_AFTER_MISSED", "3")),
        help="mark a device offline after this many heartbeat intervals without a message",
    )
    serve.add_argument(
        "--cert-renew-min-interval-s",
        type=float,
        default=float(_env("DRIFTLESS_CERT_RENEW_MIN_INTERVAL_S", "3600")),
        help="at most one certificate renewal per device this often",
    )
    token = hub.add_parser("token", help="API tokens, made where the hub's database is")
    token_cmds = token.add_subparsers(dest="token_cmd", required=True)
    token_create = token_cmds.add_parser(
        "create", help="create an API token and print its secret once, on stdout"
    )
    token_create.add_argument("--role", required=True, choices=("admin", "operator", "viewer"))
    token_create.add_argument("--name", required=True, help="who holds it (shown in the audit log)")
    token_create.add_argument("--db", default=_env("DRIFTLESS_DB", "sqlite:///driftless-hub.db"))

    migrate = hub.add_parser(
        "migrate", help="bring the hub's database to the newest schema (the hub does at start)"
    )
    migrate.add_argument("--db", default=_env("DRIFTLESS_DB", "sqlite:///driftless-hub.db"))
    migrate.add_argument("--revision", default="head", help="a revision id (default: newest)")


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed ``hub`` command; returns the exit status."""
    if args.hub_cmd == "token":
        from hub.admin_cli import create_token

        return create_token(db_url=args.db, name=args.name, role=args.role)
    if args.hub_cmd == "migrate":
        from hub.admin_cli import migrate_db

        return migrate_db(db_url=args.db, revision=args.revision)
    from hub.serve import serve

    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"driftless hub serve: {exc}", file=sys.stderr)
        return 2
    return serve(settings)


def _settings(args: argparse.Namespace) -> Any:
    """``hub serve``'s flags as HubSettings; raises ValueError for a bad combination."""
    from hub.settings import HubSettings

    return HubSettings(
        broker_url=args.broker,
        db_url=args.db,
        api_host=args.host,
        api_port=args.port,
        mqtt_client_id=args.client_id,
        bundles_dir=args.bundles_dir,
        trust_root_path=args.trust_root,
        signing_key_paths=tuple(args.signing_key),
        identity_dir=args.identity_dir,
        public_broker_url=args.public_broker_url,
        broker_tls_ca_path=args.broker_ca,
        broker_tls_cert_path=args.broker_cert,
        broker_tls_key_path=args.broker_key,
        broker_crl_path=args.broker_crl,
        broker_acl_path=args.broker_acl,
        broker_pid_file=args.broker_pid_file,
        cert_renew_min_interval_s=args.cert_renew_min_interval_s,
        broker_acl_admins=tuple(args.broker_acl_admin),
        broker_cutoff=args.broker_cutoff,
        run_link=not args.no_link,
        desired_poll_s=args.desired_poll_s,
        placement_interval_s=args.placement_interval_s,
        rollout_interval_s=args.rollout_interval_s,
        heartbeat_s=args.heartbeat_s,
        offline_after_missed=args.offline_after_missed,
        api_tls_cert_path=args.api_tls_cert,
        api_tls_key_path=args.api_tls_key,
    )
