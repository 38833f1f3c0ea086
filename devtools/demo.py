"""``driftless demo``: a real broker, the hub and a few agents on loopback, converging live.

Rules:
- Everything runs as real processes on 127.0.0.1 (Mosquitto, ``driftless hub
  serve``, one ``driftless agent run`` per device) so the demo shows what a
  deployment does, not a mock.
- Every wait has a deadline; Ctrl-C (or the end of ``--once``) stops every child.
- Each capability that lands gets a scene here.
- The hub child mints an admin API token for the session; it is printed once
  (so the operator can use the API while the demo runs) and sent with every call.
- The workload scene deploys a real program (``devtools/demo_web/``) as bundles
  built and signed with ``driftless bundle build --run`` and uploaded through the
  API; each device gets its own port in its desired entry's ``env``. Workloads
  outlive their agent on purpose, so the demo's clean-up stops them itself
  (re-adopted through each agent's process record), Ctrl-C included.
- The orchestration scene labels the devices and drives ``/deployments`` the way
  ``driftless apply`` does: a dry run first, printed with ctl's own preview
  renderer (``ctl.render``), then the change. Its deployments run the same web
  bundle; a fleet deployment's entry is the same on every device, so its copies
  share one port (the service binds with ``SO_REUSEPORT``) and the scene reads each
  device's workloads from its report, not from the port. The demo's hub looks at
  placement every second (``--placement-interval-s 1``, the default is 10) so a
  lost device's instance moves within seconds of its ``lost_after_s``.
- The rollout scene runs 24 simulated devices (``driftless sim run --enroll`` as a
  child: the agent's own core, each enrolled over mutual TLS, supervising ``web``
  from the same signed bundles with simulated processes; the profile makes web 1.1
  crash a few seconds into each run) under a ``web-sim`` deployment of their own
  (selector ``sim=demo-sim``), so the real agents are never touched. The live view
  is the operator's own: ``driftless rollout status NAME --watch`` as a child, its
  lines printed as they come; the promote is ``driftless rollout promote``. The
  outcome (abort, restore, success) is checked from the API and the scene fails
  loudly otherwise. The hub looks at active rollouts twice a second
  (``--rollout-interval-s 0.5``). ``--plain`` skips it (quick experiments).
- ``converge`` counts only the demo's own agents (the simulated devices stay
  registered after their scene).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
from paho.mqtt import publish

from ctl import render
from ctl import rollout_render as rollout_view
from devtools.broker import (
    BrokerError,
    MosquittoBroker,
    free_port,
    hub_broker_args,
    wait_for_port,
    write_secure_broker,
)
from devtools.procs import AgentChild, DriftlessChild, HubChild
from edge_agent.enroll import Identity
from edge_agent.store import StateStore
from edge_agent.supervisor.processes import ProcessTable
from firmware_bundles.devfleet import DevFleet
from hub.broker_config import TlsFiles, hub_identities, write_secure_files
from hub.identity import CertificateAuthority, client_identity
from protocols import Channel, Desired, encode, topic


class DemoError(RuntimeError):
    """A step of the demo did not happen before its deadline."""


def run_broker(
    *, data_dir: Path, port: int | None, identity_dir: Path | None, hub_client_id: str
) -> int:
    """``driftless broker run``: the development broker in the foreground until Ctrl-C.

    Mutual TLS from the fleet CA in ``identity_dir`` (the hub's) unless it is None
    (``--plain``); then it prints the flags that let the hub keep its CRL and ACL.
    """
    # Handlers, installed before the broker starts, so a signal never finds the default
    # action (exit, leaving the broker behind). Not a blocked mask with sigwait: Mosquitto
    # would inherit the mask and ignore SIGTERM (MosquittoBroker.start refuses that).
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run_broker_until(stop, data_dir, port, identity_dir, hub_client_id)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_broker_until(
    stop: threading.Event,
    data_dir: Path,
    port: int | None,
    identity_dir: Path | None,
    hub_client_id: str,
) -> int:
    try:
        if identity_dir is None:
            broker = MosquittoBroker(data_dir, port=port)
        else:
            broker = write_secure_broker(
                identity_dir=identity_dir,
                out_dir=data_dir,
                host="127.0.0.1",
                port=port or free_port(),
                hub_client_id=hub_client_id,
                db_url=None,
            )
        broker.start()
    except (BrokerError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        print(
            f"mosquitto listening on {broker.url} (config {broker.config_path}); Ctrl-C stops it",
            flush=True,
        )
        if identity_dir is not None:
            print("hub flags: " + " ".join(hub_broker_args(broker, identity_dir)), flush=True)
        while not stop.wait(1.0):
            if not broker.running():
                print("error: mosquitto exited", file=sys.stderr)
                return 1
    finally:
        broker.stop()
    return 0


def _wait(predicate: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            result = predicate()
            if result:
                return result
        time.sleep(0.1)
    raise DemoError(f"timed out after {timeout_s}s waiting for {what}")


# A broker-level identity in the ACL beside the hub's: scene 4's "someone with broker access".
BROKER_ADMIN = "admin:demo-console"
WEB_SOURCE = Path(__file__).parent / "demo_web"
"""The workload scene's program and its ``run`` files (``run-<version>.json``)."""
WORKLOAD = "web"


class Demo:
    def __init__(self, *, devices: int, api_port: int, data_dir: Path, plain: bool) -> None:
        self.data_dir = data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.device_ids = [f"demo-{i:02d}" for i in range(1, devices + 1)]
        self.api_port = api_port
        self.plain = plain
        # A throw-away fleet root: the hub signs desired documents, agents verify them.
        self.fleet = DevFleet.open_or_create(self.data_dir / "fleet")
        # The fleet CA lives where the hub keeps it (identity/ beside its DB); made here
        # first because the broker's certificate, CRL and ACL come from it.
        self.ca = CertificateAuthority.load_or_create(
            self.data_dir / "identity", now=dt.datetime.now(dt.UTC)
        )
        self.tls: TlsFiles | None = None
        if not plain:
            self.tls = write_secure_files(
                self.ca,
                self.data_dir / "broker-tls",
                hub_identities=(*hub_identities("driftless-hub"), BROKER_ADMIN),
                revoked=[],
                now=dt.datetime.now(dt.UTC),
            )
        self.broker = MosquittoBroker(self.data_dir / "broker", tls=self.tls)
        self.hub = HubChild(
            self.data_dir,
            self.broker.url,
            api_port=api_port,
            token_name="demo",
            trust_root=self.fleet.root_path,
            signing_key=self.fleet.hub_key_path,
        )
        if self.tls is not None:
            self.hub.argv += hub_broker_args(
                self.broker, self.ca.directory, acl_admins=[BROKER_ADMIN]
            )
        # The orchestration scene's failover should take seconds, not a 10 s look.
        self.hub.argv += ["--placement-interval-s", "1"]
        # The rollout scene's soaks and pauses are seconds long: look twice a second.
        self.hub.argv += ["--rollout-interval-s", "0.5"]
        self.agents = {d: self._agent(d) for d in self.device_ids}
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}/api/v1", timeout=10)
        self.fleet_config: dict[str, Any] = {}
        # The workload scene's entries per device: kept in every later configuration change.
        self.workloads: dict[str, list[dict[str, Any]]] = {}
        self.ports: dict[str, int] = {}
        self.bundles: dict[str, str] = {}  # web version -> the uploaded bundle's SHA-256
        self.sim: DriftlessChild | None = None  # the rollout scene's simulated fleet
        self.watches: list[subprocess.Popen[str]] = []  # its live views, stopped at the end
        self.changed_at = 0.0  # when the newest rollout's change was made (monotonic)

    def _agent(self, device_id: str) -> AgentChild:
        if self.plain:  # given the root directly; plain MQTT
            return AgentChild(
                self.data_dir / "agents", device_id, self.broker.url, root=self.fleet.root_path
            )
        # Enrolled (below): the data directory holds its certificate, the CA and the root.
        return AgentChild(self.data_dir / "agents", device_id, self.broker.url, enrolled=True)

    @contextlib.contextmanager
    def running(self) -> Iterator[Demo]:
        try:
            self._start()
            yield self
        finally:
            for watch in self.watches:
                _stop_group(watch)
            if self.sim is not None:
                self.sim.terminate(timeout_s=20)
            for agent in self.agents.values():
                agent.terminate()
                stop_workloads(agent.data_dir)
            self.hub.terminate()
            self.broker.stop()
            self.api.close()

    def _start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.broker.start()
        kind = "plain MQTT (--plain)" if self.plain else "mutual TLS, per-device ACL, CRL"
        say(f"broker    Mosquitto on {self.broker.url}, {kind} (data in {self.broker.data_dir})")
        self.hub.start()  # mints the session's admin token first
        self.api.headers.update(self.hub.headers)
        wait_for_port("127.0.0.1", self.api_port, timeout_s=30)
        _wait(
            lambda: self.api.get("/health").json()["mqtt_connected"],
            timeout_s=20,
            what="the hub's MQTT link",
        )
        say(
            f"hub       API on http://127.0.0.1:{self.api_port}/docs (logs {self.data_dir}/hub.log)"
        )
        say(f"token     admin API token for this session, shown once: {self.hub.token}")
        say(
            '          curl -H "Authorization: Bearer $TOKEN" '
            f"http://127.0.0.1:{self.api_port}/api/v1/fleet/summary"
        )
        if self.plain:
            for device_id in self.device_ids:
                body = {"id": device_id, "labels": {"site": "demo"}}
                response = self.api.post("/devices", json=body)
                if response.status_code not in (201, 409):
                    raise DemoError(f"registering {device_id}: {response.status_code}")
        else:
            self._enroll()
        for device_id in self.device_ids:
            self.start_agent(device_id)
        _wait(
            lambda: self.summary()["online"] == len(self.device_ids),
            timeout_s=30,
            what="all agents online",
        )
        say(f"agents    {len(self.device_ids)} devices online")

    def _enroll(self) -> None:
        """Each device enrolls itself, as in the field: a claim token, a key made on it."""
        todo = [d for d in self.device_ids if not Identity(self.agents[d].data_dir).enrolled()]
        if not todo:
            return
        response = self.api.post(
            "/enrollment-tokens", json={"uses": len(todo), "labels": {"site": "demo"}}
        )
        if response.status_code != 201:
            raise DemoError(f"enrollment token: {response.status_code} {response.text}")
        token = response.json()["token"]
        for device_id in todo:
            done = subprocess.run(
                [
                    sys.executable, "-m", "driftless.cli", "agent", "enroll",
                    "--hub", f"http://127.0.0.1:{self.api_port}", "--token", token,
                    "--device-id", device_id, "--data-dir", str(self.agents[device_id].data_dir),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise DemoError(f"enrolling {device_id}: {done.stderr.strip()}")
        say(
            f"enroll    {len(todo)} devices enrolled with one claim token: each made its own "
            "key and got a certificate from the fleet CA, the fleet root and the broker URL"
        )

    def start_agent(self, device_id: str) -> None:
        self.agents[device_id].start()

    def stop_agent(self, device_id: str) -> None:
        self.agents[device_id].terminate()

    def applied_history(self, device_id: str) -> list[int]:
        state = StateStore(self.agents[device_id].data_dir).load()
        return [entry.generation for entry in state.history if entry.ok]

    def forge(self, device_id: str) -> None:
        """Publish an unsigned document with a huge generation, retained, as an attacker would.

        Over mutual TLS the attacker holds a broker-level identity the ACL lets write
        to every device's tree (a compromised broker or a leaked hub credential).
        """
        doc = Desired(
            device_id=device_id, generation=10**9, config={"evil": True}, issued_at=time.time()
        )
        tls: dict[str, str] | None = None
        client_id = "demo-attacker"
        if not self.plain:
            now = dt.datetime.now(dt.UTC)
            cert, key = client_identity(self.ca, self.data_dir / "attacker", BROKER_ADMIN, now=now)
            tls = {"ca_certs": str(self.ca.cert_path), "certfile": str(cert), "keyfile": str(key)}
            client_id = BROKER_ADMIN
        publish.single(
            topic(device_id, Channel.DESIRED),
            encode(doc),
            qos=1,
            retain=True,
            hostname="127.0.0.1",
            port=self.broker.port,
            client_id=client_id,
            tls=tls,  # type: ignore[arg-type]
        )

    def decommission(self, device_id: str) -> None:
        response = self.api.delete(f"/devices/{device_id}")
        if response.status_code != 204:
            raise DemoError(f"decommissioning {device_id}: {response.status_code}")
        self.device_ids.remove(device_id)

    def rejections(self, device_id: str) -> int:
        return self.agents[device_id].log().count("rejected message")

    def summary(self) -> dict[str, Any]:
        return self.api.get("/fleet/summary").json()  # type: ignore[no-any-return]

    def devices(self) -> list[dict[str, Any]]:
        return self.api.get("/devices", params={"limit": 500}).json()["items"]  # type: ignore[no-any-return]

    def set_fleet_config(self, config: dict[str, Any]) -> None:
        """The same configuration for every device, plus each one's workloads once deployed."""
        self.fleet_config = config
        if not self.workloads:
            response = self.api.put("/fleet/desired", json={"config": config})
            response.raise_for_status()
            return
        for device_id in self.device_ids:
            self.set_device_config(device_id)

    def set_device_config(self, device_id: str) -> int:
        """PUT the fleet's configuration with this device's workloads; returns the generation."""
        config = {**self.fleet_config, "workloads": self.workloads.get(device_id, [])}
        response = self.api.put(f"/devices/{device_id}/desired", json={"config": config})
        if response.status_code != 200:
            raise DemoError(f"desired state of {device_id}: {response.status_code} {response.text}")
        return int(response.json()["desired_generation"])

    def publish_bundle(self, version: str, *, run: str | None = None) -> str:
        """Build and sign web ``version`` with the bundle CLI, upload it; returns its SHA-256.

        ``run`` names the run file (``run-<run>.json``; default: the version's own).
        """
        out = self.data_dir / "bundles-built" / f"{WORKLOAD}-{version}.bundle"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.unlink(missing_ok=True)
        cli = [sys.executable, "-m", "driftless.cli", "bundle"]
        for argv in (
            [
                "build", str(WEB_SOURCE), "--name", WORKLOAD, "--version", version,
                "--security-version", "1", "--run", str(WEB_SOURCE / f"run-{run or version}.json"),
                "--expires-days", "7", "--out", str(out),
            ],
            ["sign", str(out), "--key", str(self.fleet.release_key_path)],
        ):  # fmt: skip
            done = subprocess.run(
                [*cli, *argv], capture_output=True, text=True, timeout=60, check=False
            )
            if done.returncode != 0:
                raise DemoError(f"bundle {argv[0]} {WORKLOAD} {version}: {done.stderr.strip()}")
        response = self.api.post(
            "/bundles",
            content=out.read_bytes(),
            headers={"Content-Type": "application/octet-stream"},
        )
        if response.status_code not in (200, 201):
            raise DemoError(f"uploading {out.name}: {response.status_code} {response.text}")
        sha = str(response.json()["sha256"])
        self.bundles[version] = sha
        return sha

    def deploy(self, bundle: str) -> dict[str, int]:
        """Every device runs ``bundle`` as ``web`` on its own port; returns the generations."""
        for device_id in self.device_ids:
            port = self.ports.setdefault(device_id, free_port())
            self.workloads[device_id] = [
                {
                    "name": WORKLOAD,
                    "bundle": bundle,
                    "env": {"PORT": str(port), "DEVICE": device_id},
                    "config": {"greeting": "hello from the demo"},
                }
            ]
        return {d: self.set_device_config(d) for d in self.device_ids}

    def device(self, device_id: str) -> dict[str, Any]:
        return self.api.get(f"/devices/{device_id}").json()  # type: ignore[no-any-return]

    def workload_table(self) -> None:
        """Each device's workload as the hub shows it (its report), and what its port answers."""
        for device_id in self.device_ids:
            d = self.device(device_id)
            states = ", ".join(
                f"{w['name']} {w['state']} restarts={w['restarts']}" for w in d["workloads"] or []
            )
            print(
                f"    {device_id:10} g{d['reported_generation']:<3} {d['report_phase'] or '-':11} "
                f"{states or 'no workloads':28} :{self.ports[device_id]} -> "
                f"{answer(self.ports[device_id])}",
                flush=True,
            )

    def switch_off(self, device_id: str) -> None:
        """Power off, as far as one machine allows: the agent stops and its workloads too."""
        agent = self.agents[device_id]
        agent.terminate()
        stop_workloads(agent.data_dir)

    def label(self, device_id: str, labels: dict[str, str]) -> None:
        """Merge ``labels`` into the device's (``PATCH /devices/{id}/labels``)."""
        response = self.api.patch(f"/devices/{device_id}/labels", json=labels)
        if response.status_code != 200:
            raise DemoError(f"labels of {device_id}: {response.status_code} {response.text}")

    def put_deployment(
        self, name: str, spec: dict[str, Any], *, dry_run: bool = False
    ) -> dict[str, Any]:
        """``PUT /deployments/{name}``; returns ``{"deployment", "preview"}``."""
        response = self.api.put(
            f"/deployments/{name}",
            json={"spec": spec},
            params={"dry_run": "true"} if dry_run else None,
        )
        if response.status_code not in (200, 201):
            raise DemoError(f"deployment {name}: {response.status_code} {response.text}")
        return response.json()  # type: ignore[no-any-return]

    def instances(self, name: str) -> list[dict[str, Any]]:
        """A placed deployment's instances as its status shows them."""
        response = self.api.get(f"/deployments/{name}/status")
        response.raise_for_status()
        return response.json()["instances"]  # type: ignore[no-any-return]

    def events(self, device_id: str) -> list[dict[str, Any]]:
        """The device's orchestration history, oldest first."""
        response = self.api.get(f"/devices/{device_id}/events", params={"limit": 100})
        response.raise_for_status()
        return list(reversed(response.json()["items"]))

    # -- the rollout scene: a simulated fleet, rollouts, the operator's command line

    def ctl_argv(self) -> list[str]:
        return [sys.executable, "-m", "driftless.cli"]

    def ctl_env(self) -> dict[str, str]:
        """The operator's environment for ``driftless rollout …``: this hub, this token."""
        return {
            **os.environ,
            "DRIFTLESS_HUB_URL": f"http://127.0.0.1:{self.api_port}",
            "DRIFTLESS_TOKEN": self.hub.token,
            "PYTHONUNBUFFERED": "1",
        }

    def ctl(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.ctl_argv(), *argv],
            env=self.ctl_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start_sim(self, count: int, profile: Path) -> list[str]:
        """``driftless sim run`` with ``count`` devices labelled ``sim=<prefix>``, enrolled
        over mutual TLS unless ``--plain``; returns their ids once every one is online."""
        argv = [
            "sim", "run", "--devices", str(count), "--prefix", SIM_PREFIX,
            "--hub", f"http://127.0.0.1:{self.api_port}", "--broker", self.broker.url,
            "--profile", str(profile), "--seed", str(SIM_SEED), "--workers", "1",
            "--state-dir", str(self.data_dir / "sim"), "--root", str(self.fleet.root_path),
            *([] if self.plain else ["--enroll"]),
        ]  # fmt: skip
        self.sim = DriftlessChild(argv, self.data_dir / "sim.log", log_level="warning")
        self.sim.env = {"DRIFTLESS_TOKEN": self.hub.token}  # not in the process list
        self.sim.start()

        def online() -> list[str] | None:
            if self.sim is not None and self.sim.exited() is not None:
                raise DemoError(f"driftless sim run exited: see {self.sim.log_path}")
            rows = self.sim_rows()
            if len(rows) == count and all(d["online"] for d in rows.values()):
                return sorted(rows)
            return None

        return _wait(online, timeout_s=60, what=f"{count} simulated devices online")  # type: ignore[no-any-return]

    def stop_sim(self) -> None:
        if self.sim is not None and self.sim.terminate(timeout_s=20) not in (0, None):
            raise DemoError(f"driftless sim run did not stop cleanly: see {self.sim.log_path}")

    def sim_rows(self) -> dict[str, dict[str, Any]]:
        response = self.api.get("/devices", params={"selector": f"sim={SIM_PREFIX}", "limit": 500})
        response.raise_for_status()
        return {d["id"]: d for d in response.json()["items"]}

    def wait_sim(self, ids: list[str], bundle: str, *, what: str) -> dict[str, dict[str, Any]]:
        """Until every simulated device's document runs ``bundle`` and the device is in sync
        with its workload healthy; returns the rows then (DemoError names who was behind)."""
        behind: list[str] = []

        def done() -> dict[str, dict[str, Any]] | None:
            rows = self.sim_rows()
            behind.clear()
            for device_id in ids:
                d = rows[device_id]
                entries = d["desired_config"].get("workloads") or []
                if not (
                    d["in_sync"]
                    and [e["bundle"] for e in entries] == [bundle]
                    and _reported(d, WORKLOAD) == "healthy"
                ):
                    behind.append(
                        f"{device_id} g{d['desired_generation']}/g{d['reported_generation']} "
                        f"{d['report_phase']} {WORKLOAD} {_reported(d, WORKLOAD)} "
                        f"{[e['bundle'][:8] for e in entries]} {d['report_error'] or ''}".strip()
                    )
            return None if behind else rows

        try:
            return _wait(done, timeout_s=ROLLOUT_DEADLINE_S, what=what)  # type: ignore[no-any-return]
        except DemoError as exc:
            raise DemoError(f"{exc}; behind: {'; '.join(behind[:5])}") from None

    def rollout(self, name: str) -> dict[str, Any]:
        """The deployment's newest rollout (``GET /deployments/{name}/rollout``)."""
        response = self.api.get(f"/deployments/{name}/rollout")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def deployment(self, name: str) -> dict[str, Any]:
        response = self.api.get(f"/deployments/{name}")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def change(
        self, name: str, spec: dict[str, Any], bundle: str, policy: dict[str, Any]
    ) -> dict[str, Any]:
        """The deployment's workloads on ``bundle`` under the rollout ``policy``; returns the
        new rollout's view (and notes when the change was made)."""
        response = self.api.get(f"/deployments/{name}/rollout")
        previous = response.json()["id"] if response.status_code == 200 else 0
        workloads = [{**entry, "bundle": bundle} for entry in spec["workloads"]]
        self.put_deployment(name, {**spec, "workloads": workloads, "rollout": policy})
        self.changed_at = time.monotonic()
        return _wait(  # type: ignore[no-any-return]
            lambda: (view := self.rollout(name))["id"] > previous and view,
            timeout_s=10,
            what=f"{name}'s new rollout",
        )

    def converge(self, *, timeout_s: float = 30) -> float:
        """Until every device of the demo's own is in sync (the simulated ones not counted)."""
        start = time.monotonic()
        ids = set(self.device_ids)
        _wait(
            lambda: sum(1 for d in self.devices() if d["id"] in ids and d["in_sync"]) == len(ids),
            timeout_s=timeout_s,
            what="every device in sync",
        )
        return time.monotonic() - start

    def table(self) -> None:
        for d in self.devices():
            state = "in sync" if d["in_sync"] else "behind"
            if d["state"] == "decommissioned":
                state = "decommissioned"
            print(
                f"    {d['id']:10} online={d['online']!s:5} "
                f"desired=g{d['desired_generation']:<3} "
                f"reported=g{d['reported_generation']:<3} {state}"
            )


def say(text: str) -> None:
    print(f"[driftless] {text}", flush=True)


def answer(port: int) -> str:
    """What ``curl http://127.0.0.1:PORT/`` prints, or why nothing answered."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text.strip()
    except httpx.HTTPError as exc:
        return f"no answer ({type(exc).__name__})"


def stop_workloads(agent_dir: Path) -> list[str]:
    """Stop what an agent left running (workloads outlive their agent); returns the instances.

    Re-adopted from the agent's own record by pid and start time, as a restarted
    agent would, so nothing but that agent's workloads is ever signalled.
    """
    if not (agent_dir / "supervisor").is_dir():
        return []
    table = ProcessTable(agent_dir / "supervisor", on_exit=lambda _exited: None)
    try:
        adopted = [running.instance for running in table.adopt()]
        for instance in adopted:
            table.stop(instance, grace_s=3.0)
        return adopted
    finally:
        table.close()


def workload_scene(demo: Demo, number: int) -> None:
    """A real HTTP service deployed, then a broken release that rolls back by itself."""
    say(
        f"scene {number}   a real workload: web 1.0, a small HTTP service (devtools/demo_web), "
        "built with `driftless bundle build --run`, signed with the release key, uploaded"
    )
    good = demo.publish_bundle("1.0")
    say(
        f"          bundle {good[:12]}…; each device's desired entry gives it its own port "
        "(env PORT); health: alive 1 s and GET /health passing for 1.5 s, within 5 s"
    )
    demo.deploy(good)
    say(f"          fetched, verified, started and healthy everywhere in {demo.converge():.2f}s")
    demo.workload_table()

    say(
        "          web 2.0's command adds `--require database_url`, a key the fleet's "
        "configuration lacks: it exits at start and can never pass its health check"
    )
    bad = demo.publish_bundle("2.0")
    generations = demo.deploy(bad)
    answers: dict[str, list[str]] = {d: [] for d in demo.device_ids}

    def rolled_back() -> bool:
        for device_id, port in demo.ports.items():
            answers[device_id].append(answer(port))
        return all(demo.device(d)["failed_generation"] == generations[d] for d in demo.device_ids)

    started = time.monotonic()
    _wait(rolled_back, timeout_s=60, what="web 2.0 to roll back on every device")
    say(f"          rolled back by itself on every device after {time.monotonic() - started:.2f}s")
    for device_id in demo.device_ids:
        seen = sorted(set(answers[device_id]))
        what = f"every one {seen[0]!r}" if len(seen) == 1 else f"these: {seen}"
        say(f"          {device_id} answered {len(answers[device_id])} requests meanwhile, {what}")
    demo.workload_table()
    first = demo.device(demo.device_ids[0])
    say(f"          why, as {demo.device_ids[0]} reported it (the reason and the log tail):")
    for line in (first["report_error"] or "").splitlines():
        print(f"    | {line}", flush=True)

    say("          desired state back to web 1.0, which the devices run: nothing to start")
    demo.deploy(good)
    say(f"          converged in {demo.converge():.2f}s")
    demo.workload_table()


FLEET_DEPLOYMENT = "telemetry"
CANARY_DEPLOYMENT = "telemetry-canary"
PLACED_DEPLOYMENT = "recorder"
LOST_AFTER_S = 2.0


def orchestration_scene(demo: Demo, number: int) -> None:
    """Labels, a fleet deployment with a layered canary (previewed first), then a
    placed instance that leaves a switched-off device and stays away when it returns."""
    devices = list(demo.device_ids)
    canary = devices[-1]
    if len(devices) < 2:
        say(f"scene {number}   orchestration needs two devices (a canary and the rest): skipped")
        return
    say(
        f"scene {number}   orchestration: label the devices, then a fleet deployment and a "
        "higher-priority one for the canary, each previewed (a dry run) before it applies"
    )
    for i, device_id in enumerate(devices):
        demo.label(
            device_id, {"site": "ab"[i % 2], **({"canary": "yes"} if device_id == canary else {})}
        )
    say("          labels: " + "; ".join(f"{d} {_labels(demo.device(d))}" for d in devices))
    bundle = demo.bundles["1.0"]
    shared_port = str(free_port())
    fleet = {
        "selector": "site",
        "priority": 0,
        "kind": "fleet",
        "workloads": [
            {
                "name": FLEET_DEPLOYMENT,
                "bundle": bundle,
                "env": {"PORT": shared_port},
                "config": {"greeting": "telemetry", "interval_s": 10},
            }
        ],
    }
    layered = {
        "selector": "canary=yes",
        "priority": 10,
        "kind": "fleet",
        "workloads": [
            {
                "name": FLEET_DEPLOYMENT,
                "bundle": bundle,
                "env": {"PORT": shared_port, "LOG_LEVEL": "debug"},
                "config": {"greeting": "telemetry canary", "interval_s": 1},
            }
        ],
    }
    for name, spec in ((FLEET_DEPLOYMENT, fleet), (CANARY_DEPLOYMENT, layered)):
        dry = demo.put_deployment(name, spec, dry_run=True)
        say("          " + render.heading(name, "preview (dry run, nothing stored yet)", spec))
        for line in render.preview(dry["preview"]):
            print(f"    {line}", flush=True)
        done = demo.put_deployment(name, spec)
        same = _devices_of(done["preview"]) == _devices_of(dry["preview"])
        say(
            f"          applied: {render.summary(done['preview'])}"
            + ("; exactly what the preview showed" if same else "; NOT what the preview showed")
        )
    say(
        f"          and a placed deployment: {PLACED_DEPLOYMENT}, 1 replica on any device with "
        f"a site, lost after {LOST_AFTER_S:g}s offline"
    )
    placed = {
        "selector": "site",
        "kind": "placed",
        "replicas": 1,
        "lost_after_s": LOST_AFTER_S,
        "reschedule": {"delay_s": 5, "max_delay_s": 60},
        "workloads": [
            {
                "name": PLACED_DEPLOYMENT,
                "bundle": bundle,
                "env": {"PORT": str(free_port())},
                "config": {"greeting": "recorder, one copy in the fleet"},
            }
        ],
    }
    demo.put_deployment(PLACED_DEPLOYMENT, placed)
    first = demo.instances(PLACED_DEPLOYMENT)[0]["device_id"]
    if first is None:
        raise DemoError(f"{PLACED_DEPLOYMENT} was not placed: {demo.instances(PLACED_DEPLOYMENT)}")
    say(f"          the planner put it on {first}")
    say(f"          converged in {demo.converge():.2f}s; each device's merged document:")
    merged_table(demo)
    say(f"          {first} is switched off (its agent and its workloads stop)")
    demo.switch_off(first)
    _wait(lambda: not demo.device(first)["online"], timeout_s=15, what=f"{first} offline")
    offline = time.monotonic()
    instance = _wait(
        lambda: next(
            (i for i in demo.instances(PLACED_DEPLOYMENT) if i["device_id"] not in (first, None)),
            None,
        ),
        timeout_s=30,
        what=f"{PLACED_DEPLOYMENT} to leave {first}",
    )
    second = instance["device_id"]
    say(
        f"          {time.monotonic() - offline:.1f}s after it went offline the instance moved "
        f"to {second}:"
    )
    _instance_lines(instance)
    say(f"          {first} comes back: keep_replacement, so its new document no longer has it")
    demo.start_agent(first)
    say(f"          converged in {demo.converge():.2f}s")
    # An ``applied`` event for the returned device's newest generation is written by a
    # planning run that saw its report: the planner looked after the return.
    generation = demo.device(first)["desired_generation"]
    _wait(
        lambda: any(
            e["kind"] == "applied" and e["generation"] == generation for e in demo.events(first)
        ),
        timeout_s=15,
        what=f"the planner to see {first} back",
    )
    where = [i["device_id"] for i in demo.instances(PLACED_DEPLOYMENT)]
    if where != [second]:
        raise DemoError(f"{PLACED_DEPLOYMENT} went from {second} to {where} after {first} returned")
    say(f"          the planner looked again with {first} back: the instance stays on {second}")
    # Back from a power cut, the device starts what it still runs: shown once running.
    _wait(
        lambda: all(
            _reported(demo.device(d), w) == "healthy"
            for d in devices
            for w in demo.device(d)["contributions"]
        ),
        timeout_s=30,
        what="every workload healthy",
    )
    merged_table(demo)
    say(f"          {first}'s history (GET /devices/{first}/events):")
    for event in demo.events(first):
        if event["deployment"] in (PLACED_DEPLOYMENT, None):
            print(f"    {event['at'][11:19]}  {event['kind']:9} {event['detail']}", flush=True)


def _labels(device: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(device["labels"].items()))


def _devices_of(preview: dict[str, Any]) -> object:
    return (preview.get("devices"), preview.get("unplaceable"))


def _reported(device: dict[str, Any], workload: str) -> str:
    """The workload's state as the device last reported it ("-": not reported)."""
    states = {w["name"]: w["state"] for w in device["workloads"] or []}
    return str(states.get(workload, "-"))


def merged_table(demo: Demo) -> None:
    """Per device: its labels, generation, and each workload of its merged document with
    the layer that contributed it (the hub's view) and its state (the device's report)."""
    for device_id in demo.device_ids:
        d = demo.device(device_id)
        print(
            f"    {device_id:10} {_labels(d):22} g{d['desired_generation']:<3} "
            f"{'in sync' if d['in_sync'] else 'behind'}",
            flush=True,
        )
        for entry in d["desired_config"].get("workloads") or []:
            name = entry["name"]
            source = d["contributions"].get(name, "?")
            print(
                f"      {name:10} from {source:28} {_reported(d, name):9} "
                f"config {render.compact(entry.get('config', {}), 50)}",
                flush=True,
            )


def _instance_lines(instance: dict[str, Any]) -> None:
    moved = instance["original_device_id"] not in (None, instance["device_id"])
    print(
        f"    #{instance['index']} on {instance['device_id']}"
        + (f", first on {instance['original_device_id']}" if moved else "")
        + f", attempts {instance['attempts']}",
        flush=True,
    )
    for move in instance["history"] or []:
        print(
            f"      {move.get('from_device') or '-'} -> {move.get('to_device') or '-'}: "
            f"{move.get('reason', '')}",
            flush=True,
        )


SIM_PREFIX = "demo-sim"
SIM_DEVICES = 24
SIM_SEED = 15
ROLLOUT_DEPLOYMENT = "web-sim"
CRASH_MEAN_S = 3.0
"""web 1.1 on the simulated devices: the mean run time before a crash (exponential)."""
ROLLOUT_DEADLINE_S = 60.0
WATCH_INTERVAL_S = 0.25


def sim_profile(path: Path) -> Path:
    """The simulated fleet's profile: quick applies and starts, web 1.1 crashes a few
    seconds into each run (the simulator's per-version behaviour)."""
    profile = {
        "name": "demo-rollouts",
        "description": "the demo's rollout scene: web 1.1 turns healthy, then crashes",
        "apply": {"time_s": 0.05, "jitter_s": 0.05},
        "workloads": {
            "start_s": 0.1,
            "start_jitter_s": 0.1,
            "versions": {f"{WORKLOAD}@1.1": {"mean_time_to_crash_s": CRASH_MEAN_S}},
            "health_timeout_s": 15,
        },
    }
    path.write_text(json.dumps(profile, indent=2))
    return path


class Watch:
    """``driftless rollout status NAME --watch`` as a child: the operator's live view, each
    line printed as it comes (not a terminal, so a line per change and each new note)."""

    def __init__(self, demo: Demo, name: str) -> None:
        self.proc = subprocess.Popen(
            [
                *demo.ctl_argv(), "rollout", "status", name, "--watch",
                "--interval", str(WATCH_INTERVAL_S),
            ],
            env=demo.ctl_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        demo.watches.append(self.proc)
        self.lines: list[str] = []
        self._pump = threading.Thread(target=self._print, daemon=True)
        self._pump.start()

    def _print(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            sys.stdout.write(f"    | {line}\n")
            sys.stdout.flush()

    def wait_line(self, *texts: str, timeout_s: float, what: str) -> str:
        """The first line the watch printed that holds every one of ``texts`` (so the
        scene's own lines come after what the operator saw)."""
        return _wait(  # type: ignore[no-any-return]
            lambda: next((line for line in self.lines if all(t in line for t in texts)), None),
            timeout_s=timeout_s,
            what=what,
        )

    def wait(self, timeout_s: float, what: str) -> int:
        """The watch's exit status once the rollout is terminal; DemoError past the deadline."""
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_group(self.proc)
            raise DemoError(f"timed out after {timeout_s}s waiting for {what}") from None
        self._pump.join(timeout=5)
        return code


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """SIGTERM the child's process group, SIGKILL it after a few seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def rollout_scene(demo: Demo, number: int) -> None:
    """Staged rollouts on a simulated fleet: a canary that fails its soak aborts and
    restores by itself; a good change passes its canary, is promoted, and reaches all."""
    if demo.plain:
        say(
            f"scene {number}   staged rollouts on simulated devices: skipped with --plain "
            "(quick experiments; half a minute more without it)"
        )
        return
    say(
        f"scene {number}   staged rollouts on {SIM_DEVICES} simulated devices (`driftless sim "
        "run`: the agent's own core, supervising web from the same signed bundles)"
    )
    good = demo.bundles.get("1.0") or demo.publish_bundle("1.0")
    bad = demo.publish_bundle("1.1", run="1.0")
    fixed = demo.publish_bundle("1.2", run="1.0")
    started = time.monotonic()
    ids = demo.start_sim(SIM_DEVICES, sim_profile(demo.data_dir / "sim-profile.json"))
    say(
        f"          {len(ids)} devices {ids[0]} … {ids[-1]} online (each enrolled with a "
        f"claim token, over mutual TLS) in "
        f"{time.monotonic() - started:.1f}s; web 1.1 turns healthy, then crashes a few "
        f"seconds in (the simulator's profile: a mean run time of {CRASH_MEAN_S:g}s)"
    )
    name = ROLLOUT_DEPLOYMENT
    spec: dict[str, Any] = {
        "selector": f"sim={SIM_PREFIX}",
        "kind": "fleet",
        "workloads": [
            {"name": WORKLOAD, "bundle": good, "config": {"greeting": "hello from a simulation"}}
        ],
    }
    started = time.monotonic()
    demo.put_deployment(name, spec)
    before = demo.wait_sim(ids, good, what="web 1.0 everywhere")
    say(
        f"          deployment/{name} (selector sim={SIM_PREFIX}) at web 1.0: all "
        f"{len(ids)} in sync, web healthy, in {time.monotonic() - started:.1f}s"
    )
    restored = failing_canary(demo, ids, before, bad=bad, good=good)
    promoted_waves(demo, ids, restored, fixed=fixed, version="1.2")
    demo.stop_sim()
    say("          the simulated fleet stops (its devices stay registered, offline)")


def failing_canary(
    demo: Demo, ids: list[str], before: dict[str, dict[str, Any]], *, bad: str, good: str
) -> dict[str, Any]:
    """The bad change: its canary fails the soak, the rollout aborts and restores by itself
    (checked from the API); returns the restored spec."""
    name = ROLLOUT_DEPLOYMENT
    spec = demo.deployment(name)["spec"]

    canary: dict[str, Any] = {
        "strategy": "canary",
        "canary": {"count": 2},
        "soak": {"seconds": 6, "reports": 1},
        "failure_threshold": {"count": 1, "min_reported": 1, "action": "abort"},
    }
    view = demo.change(name, spec, bad, canary)
    say(f"          change to web 1.1, policy: {rollout_view.policy(view['policy'])}")
    say(f"          the live view, `driftless rollout status {name} --watch`:")
    watch = Watch(demo, name)
    code = watch.wait(ROLLOUT_DEADLINE_S, f"{name}'s rollout of web 1.1 to end")
    view = demo.rollout(name)
    if view["state"] != "aborted" or code != 1:
        raise DemoError(f"web 1.1: the rollout ended {view['state']} (watch exit {code})")
    say(
        f"          aborted by itself {time.monotonic() - demo.changed_at:.1f}s after the "
        f"change; `driftless rollout status {name}`:"
    )
    now = dt.datetime.now(dt.UTC)
    for line in rollout_view.status(view, now):
        print(f"    {line}", flush=True)
    after = demo.wait_sim(ids, good, what="every device back on web 1.0")
    touched = [d for d in ids if after[d]["desired_generation"] != before[d]["desired_generation"]]
    same = [d for d in touched if after[d]["desired_config"] == before[d]["desired_config"]]
    restored = demo.deployment(name)
    if restored["spec"]["workloads"][0]["bundle"] != good or same != touched or not touched:
        raise DemoError(f"web 1.1 was not restored: {restored['spec']}, touched {touched}")
    say(
        f"          restored: deployment/{name} is back at web 1.0 (version "
        f"{restored['version']}: nothing retries 1.1); {len(touched)} touched devices each got "
        "a new generation whose document equals the one before the change (from the API):"
    )
    for device_id in touched:
        print(
            f"    {device_id}  g{before[device_id]['desired_generation']} -> "
            f"g{after[device_id]['desired_generation']}  same document: yes  "
            f"{'in sync' if after[device_id]['in_sync'] else 'behind'}  "
            f"{WORKLOAD} {_reported(after[device_id], WORKLOAD)}",
            flush=True,
        )
    say(f"          the other {len(ids) - len(touched)} devices were never handed web 1.1")
    return dict(restored["spec"])


def promoted_waves(
    demo: Demo, ids: list[str], spec: dict[str, Any], *, fixed: str, version: str
) -> None:
    """The good change: its canary passes, waits for a promote, then the rest goes out."""
    name = ROLLOUT_DEPLOYMENT
    waves: dict[str, Any] = {
        "strategy": "canary",
        "canary": {"count": 2},
        "max_in_flight": 12,
        "soak": {"seconds": 1, "reports": 1},
        "failure_threshold": {"count": 1, "min_reported": 1, "action": "abort"},
    }
    view = demo.change(name, spec, fixed, waves)
    say(f"          change to web 1.2 (the fix), policy: {rollout_view.policy(view['policy'])}")
    say(f"          the live view, `driftless rollout status {name} --watch`:")
    watch = Watch(demo, name)
    watch.wait_line(
        "note: ",
        "waiting for a promote",
        timeout_s=ROLLOUT_DEADLINE_S,
        what=f"{name}'s canary of web 1.2 to pass its soak",
    )
    waiting = demo.rollout(name)
    if waiting["state"] != "waiting_promote":
        raise DemoError(f"web 1.2: the watch showed a promote wait the API does not: {waiting}")
    canaries = waiting["counts"]["succeeded"]
    say(
        f"          the canary passed its soak ({canaries} devices on web 1.2); the operator "
        f"promotes: `driftless rollout promote {name}`"
    )
    promoted = demo.ctl("rollout", "promote", name)
    if promoted.returncode != 0:
        raise DemoError(f"rollout promote {name}: {promoted.stderr.strip()}")
    say(f"          {promoted.stderr.strip().splitlines()[0]}")
    at = time.monotonic()
    code = watch.wait(ROLLOUT_DEADLINE_S, f"{name}'s rollout of web 1.2 to succeed")
    view = demo.rollout(name)
    if view["state"] != "succeeded" or code != 0:
        raise DemoError(f"web 1.2: the rollout ended {view['state']} (watch exit {code})")
    final = demo.wait_sim(ids, fixed, what="every device on web 1.2")
    healthy = sum(1 for d in ids if _reported(final[d], WORKLOAD) == "healthy")
    say(
        f"          succeeded {time.monotonic() - at:.1f}s after the promote: "
        f"{view['counts']['succeeded']} of {view['targeted']} devices on web "
        f"{version}, {healthy} with web healthy"
    )


def scenes(demo: Demo, *, rounds: int | None) -> None:
    say("scene 1   push a configuration to the whole fleet")
    demo.set_fleet_config({"sample_rate_hz": 10, "message": "hello fleet"})
    say(f"          converged in {demo.converge():.2f}s")
    demo.table()

    away = demo.device_ids[-1]
    say(f"scene 2   {away} goes offline; desired state changes three times while it is away")
    demo.stop_agent(away)
    _wait(
        lambda: not demo.api.get(f"/devices/{away}").json()["online"],
        timeout_s=15,
        what=f"{away} offline",
    )
    for rate in (20, 30, 40):
        demo.set_fleet_config({"sample_rate_hz": rate, "message": f"rate {rate}"})
    _wait(
        lambda: demo.summary()["in_sync"] == len(demo.device_ids) - 1,
        timeout_s=30,
        what="the online devices in sync",
    )
    demo.table()
    say(f"          {away} comes back and applies only the newest generation")
    demo.start_agent(away)
    say(f"          converged in {demo.converge():.2f}s")
    demo.table()
    say(f"          generations {away} applied, from its own disk: {demo.applied_history(away)}")

    say("scene 3   the broker crashes (SIGKILL) and comes back with nothing retained")
    demo.broker.kill()
    demo.broker.wipe_persistence()
    demo.set_fleet_config({"sample_rate_hz": 50, "message": "after the crash"})
    say("          a change made while the broker is down is accepted: the hub's DB is the truth")
    demo.broker.start()
    say(
        f"          broker back; births and the hub's sweep republish: converged in "
        f"{demo.converge():.2f}s"
    )
    demo.table()

    victim = demo.device_ids[0]
    say(f"scene 4   someone with broker access forges {victim}'s desired document")
    before = demo.applied_history(victim)
    demo.forge(victim)
    _wait(lambda: demo.rejections(victim) > 0, timeout_s=15, what=f"{victim} to refuse it")
    say(
        f"          {victim} refused it (not signed by the fleet's hub key) and kept "
        f"generation {before[-1]}; the hub's next change still converges:"
    )
    demo.set_fleet_config({"sample_rate_hz": 60, "message": "after the forgery"})
    say(f"          converged in {demo.converge():.2f}s")

    decommissioned = not demo.plain and len(demo.device_ids) > 1
    if decommissioned:
        gone = demo.device_ids[-1]
        say(f"scene 5   {gone} is stolen: decommission it (DELETE /devices/{gone})")
        demo.decommission(gone)
        _wait(
            lambda: demo.api.get(f"/devices/{gone}").json()["broker_cut_off_at"] is not None,
            timeout_s=20,
            what=f"the broker's confirmation that {gone} is cut off",
        )
        said = "Administrative action" in demo.agents[gone].log()
        say(
            f"          its certificate is revoked (CRL) and the broker closed its open "
            f"connection{' (the agent heard: Administrative action)' if said else ''}; it "
            "cannot connect again, the hub refuses anything from it, and it stays listed "
            "as decommissioned. The rest of the fleet carries on:"
        )
        demo.set_fleet_config({"sample_rate_hz": 70, "message": "after the decommission"})
        say(f"          converged in {demo.converge():.2f}s")

    workload_scene(demo, 6 if decommissioned else 5)
    orchestration_scene(demo, 7 if decommissioned else 6)
    rollout_scene(demo, 8 if decommissioned else 7)
    ticks(demo, rounds)


def ticks(demo: Demo, rounds: int | None) -> None:
    """After the scenes: a new configuration every 5 s (``rounds`` of them; None: forever)."""
    n = 0
    while rounds is None or n < rounds:
        n += 1
        time.sleep(5)
        demo.set_fleet_config({"sample_rate_hz": 40 + n, "message": f"tick {n}"})
        say(f"tick {n:<5}  new configuration, converged in {demo.converge():.2f}s; Ctrl-C stops")


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_demo(
    *, devices: int, api_port: int, data_dir: Path, once: bool, plain: bool = False
) -> int:
    """Entry point for ``driftless demo``."""
    if os.environ.get("DRIFTLESS_DEMO_FRESH", "1") == "1" and data_dir.exists():
        shutil.rmtree(data_dir)
    port = api_port
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            port = free_port()
            say(f"port {api_port} is taken; using {port}")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # paho's one-shot publish helper logs a harmless error when it closes its client.
    logging.getLogger("paho.mqtt.client").setLevel(logging.CRITICAL)
    # Ctrl-C and SIGTERM both end the demo through the same clean-up path, even when
    # started in the background (where a shell leaves SIGINT ignored).
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    demo = Demo(devices=devices, api_port=port, data_dir=data_dir, plain=plain)
    try:
        with demo.running():
            scenes(demo, rounds=0 if once else None)
    except KeyboardInterrupt:
        say("stopped")
    except (DemoError, BrokerError) as exc:
        print(f"demo failed: {exc} (logs in {data_dir})", file=sys.stderr)
        return 1
    return 0
