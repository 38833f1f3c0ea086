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
        "--bundles-dir",
        type=Path,
        default=_env("DRIFTLESS_BUNDLES_DIR", "") or None,
        help="bundle files (default: 'bundles' beside the SQLite file)",
    )
    serve.add_argument(
        "--trust-root",
        type=Path,
        default=_env("DRIFTLESS_TRUST_ROOT", "") or None,
        help="the fleet's root.json; without it bundle uploads are refused (503)",
    )
    token = hub.add_parser("token", help="API tokens, made where the hub's database is")
    token_cmds = token.add_subparsers(dest="token_cmd", required=True)
    token_create = token_cmds.add_parser(
        "create", help="create an API token and print its secret once, on stdout"
    )
    token_create.add_argument("--role", required=True, choices=("admin", "operator", "viewer"))
    token_create.add_argument("--name", required=True, help="who holds it (shown in the audit log)")
    token_create.add_argument("--db", default=_env("DRIFTLESS_DB", "sqlite:///driftless-hub.db"))

    agent = top.add_parser("agent", help="the edge agent").add_subparsers(
        dest="agent_cmd", required=True
    )
    run = agent.add_parser("run", help="run the agent for one device")
    run.add_argument("--device-id", default=_env("DRIFTLESS_DEVICE_ID", ""), required=False)
    run.add_argument("--broker", default=_env("DRIFTLESS_BROKER", "mqtt://127.0.0.1:1883"))
    run.add_argument(
        "--data-dir", type=Path, default=Path(_env("DRIFTLESS_DATA_DIR", "agent-data"))
    )
    run.add_argument(
        "--root",
        type=Path,
        default=_env("DRIFTLESS_ROOT", "") or None,
        help="the fleet's root.json; without it desired states that reference bundles fail",
    )
    run.add_argument(
        "--hub-url",
        default=_env("DRIFTLESS_HUB_URL", "") or None,
        help="http://HOST:PORT of the hub: fetch bundles by HTTP range requests, not MQTT",
    )
    run.add_argument("--bundle-cache-max-bytes", type=int, default=2 * 1024**3)
    run.add_argument("--fetch-window", type=int, default=8, help="MQTT chunk requests in flight")
    run.add_argument("--fetch-chunk-bytes", type=int, default=64 * 1024, help="MQTT chunk size")
    run.add_argument("--clock-skew-s", type=int, default=300, help="expiry allowance, seconds")

    broker = top.add_parser("broker", help="development broker").add_subparsers(
        dest="broker_cmd", required=True
    )
    brun = broker.add_parser("run", help="run Mosquitto with a generated config until Ctrl-C")
    brun.add_argument("--data-dir", type=Path, default=Path(".driftless/broker"))
    brun.add_argument("--port", type=int, default=0, help="0 picks a free port")

    from firmware_bundles.cli import add_subcommands as add_bundle_subcommands

    add_bundle_subcommands(top)  # ``keys …`` and ``bundle …``; imports only argparse

    from simulator.cli import add_subcommands as add_sim_subcommands

    add_sim_subcommands(top)  # ``sim run`` and ``sim profile``; imports only argparse

    demo = top.add_parser("demo", help="broker + hub + agents on loopback, converging live")
    demo.add_argument("--devices", type=int, default=3)
    demo.add_argument("--api-port", type=int, default=8080)
    demo.add_argument("--data-dir", type=Path, default=Path(".driftless/demo"))
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
    if args.command == "hub":
        from hub.serve import serve
        from hub.settings import HubSettings

        return serve(
            HubSettings(
                broker_url=args.broker,
                db_url=args.db,
                api_host=args.host,
                api_port=args.port,
                mqtt_client_id=args.client_id,
                bundles_dir=args.bundles_dir,
                trust_root_path=args.trust_root,
            )
        )
    if args.command == "agent":
        if not args.device_id:
            print("driftless agent run: --device-id is required", file=sys.stderr)
            return 2
        from edge_agent.driver import run_agent
        from edge_agent.settings import BundleSettings, FetchConfig

        try:
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
        )
    if args.command == "broker":
        from driftless.demo import run_broker

        return run_broker(data_dir=args.data_dir, port=args.port or None)
    if args.command == "sim":
        from simulator.cli import dispatch as sim_dispatch

        return sim_dispatch(args)
    if args.command == "demo":
        from driftless.demo import run_demo

        return run_demo(
            devices=args.devices, api_port=args.api_port, data_dir=args.data_dir, once=args.once
        )
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
