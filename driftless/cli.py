"""``driftless``: one console script for the hub, agent, broker, keys, bundles and the demo.

Rule: this module imports nothing heavy at import time; each subcommand imports
its own package when it runs, so ``driftless agent run`` never loads the hub's
FastAPI/SQLModel stack on a device.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="driftless", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=_env("DRIFTLESS_LOG_LEVEL", "info"))
    parser.add_argument(
        "--log-format", choices=("json", "console"), default=_env("DRIFTLESS_LOG_FORMAT", "json")
    )
    top = parser.add_subparsers(dest="command", required=True)

    hub = top.add_parser("hub", help="the cloud hub").add_subparsers(dest="hub_cmd", required=True)
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

    agent = top.add_parser("agent", help="the edge agent").add_subparsers(
        dest="agent_cmd", required=True
    )
    enroll = agent.add_parser(
        "enroll", help="get this device a certificate from the hub with an enrollment token"
    )
    enroll.add_argument("--hub", required=True, help="http(s)://HOST:PORT of the hub")
    enroll.add_argument("--token", default=_env("DRIFTLESS_ENROLL_TOKEN", ""))
    enroll.add_argument("--device-id", default=_env("DRIFTLESS_DEVICE_ID", ""))
    enroll.add_argument(
        "--data-dir", type=Path, default=Path(_env("DRIFTLESS_DATA_DIR", "agent-data"))
    )
    run = agent.add_parser("run", help="run the agent for one device")
    run.add_argument("--device-id", default=_env("DRIFTLESS_DEVICE_ID", ""), required=False)
    run.add_argument(
        "--broker",
        default=_env("DRIFTLESS_BROKER", "") or None,
        help="mqtt[s]://HOST:PORT (default: the enrollment's, else mqtt://127.0.0.1:1883)",
    )
    run.add_argument(
        "--data-dir", type=Path, default=Path(_env("DRIFTLESS_DATA_DIR", "agent-data"))
    )
    run.add_argument(
        "--root",
        type=Path,
        default=_env("DRIFTLESS_ROOT", "") or None,
        help="the fleet's root.json: desired documents and bundles are verified against it",
    )
    run.add_argument(
        "--insecure-unsigned",
        action="store_true",
        default=_env("DRIFTLESS_INSECURE_UNSIGNED", "") == "1",
        help="run without --root: accept desired documents unverified (experiments only)",
    )
    run.add_argument(
        "--hub-url",
        default=_env("DRIFTLESS_HUB_URL", "") or None,
        help="http://HOST:PORT of the hub: fetch bundles by HTTP range requests, not MQTT",
    )
    run.add_argument("--bundle-cache-max-bytes", type=int, default=2 * 1024**3)
    run.add_argument("--fetch-window", type=int, default=8, help="MQTT chunk requests in flight")
    run.add_argument("--fetch-chunk-bytes", type=int, default=64 * 1024, help="MQTT chunk size")
    run.add_argument(
        "--clock-skew-s",
        type=int,
        default=300,
        help="expiry allowance, seconds, for this device's clock running ahead",
    )
    run.add_argument(
        "--keepalive-s",
        type=int,
        default=_env("DRIFTLESS_KEEPALIVE_S", "30"),
        help="MQTT keepalive, 5..3600 s: the broker publishes this device's Last Will (offline) "
        "after 1.5 times it without traffic; keep it below a cellular link's NAT idle timeout",
    )
    run.add_argument(
        "--renew-at-fraction",
        type=float,
        default=2 / 3,
        help="renew the device certificate over MQTT once this part of its lifetime has passed",
    )

    broker = top.add_parser("broker", help="development broker").add_subparsers(
        dest="broker_cmd", required=True
    )
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

    from firmware_bundles.cli import add_subcommands as add_bundle_subcommands

    add_bundle_subcommands(top)  # ``keys …`` and ``bundle …``; imports only argparse

    from simulator.cli import add_subcommands as add_sim_subcommands

    add_sim_subcommands(top)  # ``sim run`` and ``sim profile``; imports only argparse

    demo = top.add_parser("demo", help="broker + hub + agents on loopback, converging live")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "bundles_handler", None) is not None:
        from firmware_bundles.cli import dispatch

        return dispatch(args)
    from driftless import logs

    logs.configure(args.log_level, fmt=args.log_format)
    if args.command == "hub" and args.hub_cmd == "token":
        from hub.admin_cli import create_token

        return create_token(db_url=args.db, name=args.name, role=args.role)
    if args.command == "hub" and args.hub_cmd == "migrate":
        from hub.admin_cli import migrate_db

        return migrate_db(db_url=args.db, revision=args.revision)
    if args.command == "hub":
        from hub.serve import serve
        from hub.settings import HubSettings

        try:
            settings = HubSettings(
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
                api_tls_cert_path=args.api_tls_cert,
                api_tls_key_path=args.api_tls_key,
            )
        except ValueError as exc:
            print(f"driftless hub serve: {exc}", file=sys.stderr)
            return 2
        return serve(settings)
    if args.command == "agent" and args.agent_cmd == "enroll":
        if not args.device_id or not args.token:
            print("driftless agent enroll: --device-id and --token are required", file=sys.stderr)
            return 2
        from edge_agent.enroll import run_enroll

        return run_enroll(
            hub_url=args.hub, token=args.token, device_id=args.device_id, data_dir=args.data_dir
        )
    if args.command == "agent":
        if not args.device_id:
            print("driftless agent run: --device-id is required", file=sys.stderr)
            return 2
        from edge_agent.driver import run_agent
        from edge_agent.settings import BundleSettings, FetchConfig, MqttSettings

        try:
            mqtt = MqttSettings(keepalive_s=args.keepalive_s)
            bundles = BundleSettings(
                root_path=args.root,
                hub_url=args.hub_url,
                cache_max_bytes=args.bundle_cache_max_bytes,
                mqtt=FetchConfig(
                    chunk_bytes=args.fetch_chunk_bytes, window_chunks=args.fetch_window
                ),
                clock_skew_s=args.clock_skew_s,
            )
        except ValueError as exc:
            print(f"driftless agent run: {exc}", file=sys.stderr)
            return 2
        return run_agent(
            device_id=args.device_id,
            broker_url=args.broker,
            data_dir=args.data_dir,
            bundles=bundles,
            insecure_unsigned=args.insecure_unsigned,
            renew_at_fraction=args.renew_at_fraction,
            mqtt=mqtt,
        )
    if args.command == "broker" and args.broker_cmd == "config":
        from hub.devbroker import hub_broker_args, write_secure_broker
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
    if args.command == "broker" and args.broker_cmd == "identity":
        return _broker_identity(args.identity_dir, args.name, args.out)
    if args.command == "broker":
        from driftless.demo import run_broker

        return run_broker(
            data_dir=args.data_dir,
            port=args.port or None,
            identity_dir=None if args.plain else args.identity_dir,
            hub_client_id=args.hub_client_id,
        )
    if args.command == "sim":
        from simulator.cli import dispatch as sim_dispatch

        return sim_dispatch(args)
    if args.command == "demo":
        from driftless.demo import run_demo

        return run_demo(
            devices=args.devices,
            api_port=args.api_port,
            data_dir=args.data_dir,
            once=args.once,
            plain=args.plain,
        )
    raise AssertionError(args.command)


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


if __name__ == "__main__":
    sys.exit(main())
