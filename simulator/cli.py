"""``driftless sim …``: the simulator's command line (argparse only; the run is imported lazily).

Rule: building the parser imports nothing but the standard library, so
``driftless --help`` and the agent stay cheap; :func:`dispatch` imports the
runner when a ``sim`` command actually runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def add_subcommands(top: Any) -> None:
    """Add ``sim run`` and ``sim profile`` to the top-level subparsers."""
    sim = top.add_parser("sim", help="the fleet simulator (real agent cores, real MQTT)")
    sim.set_defaults(dispatch=dispatch)
    commands = sim.add_subparsers(dest="sim_cmd", required=True)

    run = commands.add_parser(
        "run",
        help="register N devices and run them until the duration ends or Ctrl-C",
        description="Run N simulated devices (the real agent core) in worker processes.",
    )
    env = os.environ.get
    run.add_argument("--devices", type=int, required=True, help="how many devices")
    run.add_argument("--broker", default=env("DRIFTLESS_BROKER", "mqtt://127.0.0.1:1883"))
    run.add_argument("--hub", default=env("DRIFTLESS_HUB", "http://127.0.0.1:8080"))
    run.add_argument(
        "--token",
        default=env("DRIFTLESS_TOKEN", "") or None,
        help="the hub's API token, admin role (registers devices); default $DRIFTLESS_TOKEN",
    )
    run.add_argument(
        "--profile",
        default="stable",
        help="stable, flaky, storm, slow, workloads, or a .toml/.json profile file",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: cores)"
    )
    run.add_argument("--duration-s", type=float, default=None, help="default: until Ctrl-C")
    run.add_argument("--json", type=Path, default=None, help="write the summary here")
    run.add_argument(
        "--change-every-s",
        type=float,
        default=None,
        help="push a new fleet-wide desired configuration this often",
    )
    run.add_argument(
        "--settle-s",
        type=float,
        default=0.0,
        help="after the duration: end faults, wait up to this long for every device to settle",
    )
    run.add_argument("--prefix", default="sim", help="device ids PREFIX-00000, ...")
    run.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".driftless/sim"),
        help="the devices' saved states (their 'disks') and worker logs",
    )
    run.add_argument(
        "--respawn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart a worker that dies (default: on)",
    )
    run.add_argument("--max-respawns", type=int, default=5, help="per worker")
    run.add_argument("--max-concurrent-connects", type=int, default=64, help="per worker")
    run.add_argument(
        "--root",
        type=Path,
        default=None,
        metavar="ROOT_JSON",
        help="the fleet's root.json: devices fetch and verify bundles against it "
        "(without it, a desired state that references bundles fails)",
    )
    run.add_argument(
        "--enroll",
        action="store_true",
        help="provision every device as a real one (its own key, a CSR, POST /enroll with a "
        "claim token; kept in STATE_DIR/identities and reused) and connect with mutual TLS "
        "to an mqtts:// broker",
    )

    show = commands.add_parser("profile", help="print a built-in profile as JSON (a template)")
    show.add_argument(
        "name", help="stable, flaky, storm, slow, workloads, or a profile file to check"
    )


def dispatch(args: argparse.Namespace) -> int:
    from simulator.profiles import ProfileError, load_profile

    try:
        profile = load_profile(args.profile if args.sim_cmd == "run" else args.name)
    except ProfileError as exc:
        print(f"driftless sim: {exc}", file=sys.stderr)
        return 2
    if args.sim_cmd == "profile":
        import json

        print(json.dumps(profile.as_dict(), indent=2))
        return 0

    from simulator.runner import RunConfig, run_sim

    try:
        cfg = RunConfig(
            devices=args.devices,
            broker_url=args.broker,
            hub_url=args.hub,
            token=args.token,
            profile=profile,
            seed=args.seed,
            workers=args.workers,
            duration_s=args.duration_s,
            change_every_s=args.change_every_s,
            settle_s=args.settle_s,
            json_path=args.json,
            prefix=args.prefix,
            state_dir=args.state_dir,
            respawn=args.respawn,
            max_respawns=args.max_respawns,
            max_concurrent_connects=args.max_concurrent_connects,
            log_level=args.log_level,
            root=args.root,
            enroll=args.enroll,
        )
        from plumbing.net import parse_broker_url
        from protocols import validate_device_id

        parse_broker_url(args.broker)
        validate_device_id(f"{args.prefix}-0")
    except ValueError as exc:
        print(f"driftless sim run: {exc}", file=sys.stderr)
        return 2
    return run_sim(cfg)
