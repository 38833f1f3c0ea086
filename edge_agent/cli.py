"""``driftless agent …``: enroll this device, run the agent.

Rule: importing this module imports only argparse (``agent run`` pays for every
module it loads, on every device); each command imports what it runs.
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
    """Add ``agent enroll``, ``agent run`` and ``agent lock …`` to ``top``."""
    parser = top.add_parser("agent", help="the edge agent")
    parser.set_defaults(dispatch=dispatch)
    agent = parser.add_subparsers(dest="agent_cmd", required=True)
    from edge_agent.lock_cli import add_lock_parser  # `agent lock …`: the update-lock tool

    add_lock_parser(agent)
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
        "--heartbeat-s",
        type=float,
        default=_env("DRIFTLESS_HEARTBEAT_S", "30"),
        help="send a state report this often while connected, 1..86400 s: the hub marks the "
        "device offline after a few missed ones (its offline_after_missed)",
    )
    run.add_argument(
        "--no-supervise",
        action="store_true",
        default=_env("DRIFTLESS_NO_SUPERVISE", "") == "1",
        help="install and switch workloads without running them (the runtime before issue 13)",
    )
    run.add_argument(
        "--restart-floor-s",
        type=float,
        default=1.0,
        help="shortest wait before a workload is restarted, whatever its backoff says",
    )
    run.add_argument(
        "--health-timeout-s",
        type=float,
        default=300.0,
        help="a rollout rolls back when its started workloads are not all healthy by then",
    )
    run.add_argument(
        "--renew-at-fraction",
        type=float,
        default=2 / 3,
        help="renew the device certificate over MQTT once this part of its lifetime has passed",
    )


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed ``agent`` command; returns the exit status."""
    if args.agent_cmd == "enroll":
        if not args.device_id or not args.token:
            print("driftless agent enroll: --device-id and --token are required", file=sys.stderr)
            return 2
        from edge_agent.enroll import run_enroll

        return run_enroll(
            hub_url=args.hub, token=args.token, device_id=args.device_id, data_dir=args.data_dir
        )
    if not args.device_id:
        print("driftless agent run: --device-id is required", file=sys.stderr)
        return 2
    from edge_agent.driver import run_agent
    from edge_agent.settings import (
        BundleSettings,
        FetchConfig,
        MqttSettings,
        SupervisorSettings,
    )

    try:
        mqtt = MqttSettings(keepalive_s=args.keepalive_s, heartbeat_s=args.heartbeat_s)
        supervisor = SupervisorSettings(
            enabled=not args.no_supervise,
            restart_floor_s=args.restart_floor_s,
            health_timeout_s=args.health_timeout_s,
        )
        bundles = BundleSettings(
            root_path=args.root,
            hub_url=args.hub_url,
            cache_max_bytes=args.bundle_cache_max_bytes,
            mqtt=FetchConfig(chunk_bytes=args.fetch_chunk_bytes, window_chunks=args.fetch_window),
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
        supervisor=supervisor,
    )
