"""What ``driftless agent run`` must not import while it has nothing to verify or renew.

A real child process: an enrolled data directory (certificate, CA, fleet root,
as ``driftless agent enroll`` leaves it), mutual TLS, a broker port nobody
listens on. Once the agent has built its TLS context, read its root, set up its
runtime and tried to connect, the modules it imported are read from
``-X importtime``. Every one of these costs each device resident memory for as
long as the agent runs (``docs/benchmarks.md``, "Agent footprint").
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devtools.broker import free_port
from firmware_bundles.devfleet import DevFleet
from hub.identity import CertificateAuthority
from simulator.bench.footprint import enroll_locally

# Top-level packages (or exact modules) an idle agent has no use for.
NOT_AT_IDLE = {
    "cryptography": "verifying, making keys and renewing load it when they happen",
    "hub": "the hub's command line and stack",
    "simulator": "the simulator's command line",
    "devtools": "the broker/demo command line",
    "firmware_bundles.cli": "the keys/bundle command line",
    "firmware_bundles.keys": "signature checks, loaded with the first document",
    "edge_agent.fetch_thread": "bundle downloads, loaded with the first bundle",
    "tarfile": "unpacking, loaded with the first bundle",
    "asyncio": "the agent is threads over paho",
    "pydantic": "the hub's models",
    "sqlalchemy": "the hub's database",
    "fastapi": "the hub's API",
    "aiomqtt": "the simulator's and hub's MQTT client",
}


def _imported(log: str) -> set[str]:
    names = set()
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.add(name)
    return names


@pytest.fixture
def enrolled(tmp_path: Path) -> Path:
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", now=now)
    fleet = DevFleet(tmp_path / "fleet")
    data_dir = tmp_path / "agent"
    url = f"mqtts://127.0.0.1:{free_port()}"  # nobody listens: the agent retries
    enroll_locally(ca, data_dir, "idle-1", broker_url=url, root=fleet.root_path)
    return data_dir


def test_an_idle_agent_over_mutual_tls_imports_nothing_it_does_not_use(
    enrolled: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "agent.log"
    argv = [sys.executable, "-X", "importtime", "-m", "driftless.cli", "agent", "run"]
    argv += ["--device-id", "idle-1", "--data-dir", str(enrolled)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while '"broker unreachable"' not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the agent never tried to connect"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    text = log_path.read_text(errors="replace")
    imported = _imported(text)
    assert {"ssl", "paho.mqtt.client", "edge_agent.driver", "edge_agent.root"} <= imported
    loaded = {
        name: why
        for name, why in NOT_AT_IDLE.items()
        if any(m == name or m.startswith(name + ".") for m in imported)
    }
    assert loaded == {}
    # The root was taken from its verified digest (written as enrollment does), not re-checked.
    assert (enrolled / "root.json.verified").exists()


def test_without_the_verified_digest_the_root_is_checked_in_full(
    enrolled: Path, tmp_path: Path
) -> None:
    (enrolled / "root.json.verified").unlink()
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from edge_agent.root import load_trusted_root\n"
        f"load_trusted_root(Path({str(enrolled / 'root.json')!r}))\n"
        "print('cryptography' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "True"
    # ... and remembered, since the root is the enrolled data directory's own.
    assert (enrolled / "root.json.verified").exists()
