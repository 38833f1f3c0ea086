"""The durable outbox end to end: a report made while the broker is down survives a SIGKILL.

The agent fetches a bundle over HTTP from a stub that stalls (503) while the
test kills the broker; then the stub refuses the bundle (404), so the agent
fails the generation while it cannot publish: the failed report goes into
``outbox.json``. The agent is SIGKILLed, the broker comes back (empty), the
agent restarts, and a raw peer standing in for the hub receives that very
report, before the new birth (architecture rule 5).
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocols import Birth, Channel, Desired, Reported, decode, encode, topic
from protocols.signed import seal
from tests.integration.bundle_support import Keys
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, wait_until

pytestmark = pytest.mark.integration

DEVICE = "dev-outbox"


class StallingBundleServer:
    """``GET /api/v1/bundles/<sha>/file``: 503 (try later) until :meth:`refuse`, then 404."""

    def __init__(self) -> None:
        self.requests = 0
        self.refusing = False
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                self.send_response(404 if owner.refusing else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def refuse(self) -> None:
        self.refusing = True

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StallingBundleServer]:
    server = StallingBundleServer()
    yield server
    server.close()


def outbox_entries(agent: AgentProcess) -> list[dict[str, object]]:
    path = agent.data_dir / "outbox.json"
    if not path.exists():
        return []
    entries = json.loads(path.read_text())["entries"]
    assert isinstance(entries, list)
    return entries


def test_a_report_made_offline_reaches_the_hub_after_a_sigkill_and_a_restart(
    broker: TestBroker, stub: StallingBundleServer, tmp_path: Path
) -> None:
    keys = Keys(tmp_path / "keys")
    agent = AgentProcess(tmp_path, DEVICE, broker, root=keys.root_path, hub_url=stub.url)
    peer = RawPeer(broker)
    peer.subscribe(f"driftless/v1/devices/{DEVICE}/#")
    agent.start()
    try:
        peer.wait_for(lambda m: m[0] == topic(DEVICE, Channel.BIRTH))
        config = {"workloads": [{"name": "thermo", "bundle": "ab" * 32}]}
        document = Desired(device_id=DEVICE, generation=1, config=config, issued_at=time.time())
        sealed = seal(encode(document), keys.fleet.hub_keys)
        peer.publish(topic(DEVICE, Channel.DESIRED), sealed, retain=True)
        wait_until(lambda: stub.requests > 0, what="the fetch asking the stub")
        peer.close()
        broker.kill()
        wait_until(lambda: '"disconnected"' in agent.log(), what="the agent seeing it offline")
        stub.refuse()  # the fetch fails now: the failed report cannot be published
        entries = wait_until(lambda: outbox_entries(agent), timeout_s=60, what="a kept report")
        assert [e["lane"] for e in entries] == ["state"]
        agent.kill()  # SIGKILL: only the disk remembers the report
        broker.wipe_persistence()
        broker.start()
        peer = RawPeer(broker)
        peer.subscribe(f"driftless/v1/devices/{DEVICE}/#")
        agent.start()
        reported = decode(
            peer.wait_for(lambda m: m[0] == topic(DEVICE, Channel.REPORTED), timeout_s=40)[1],
            Reported,
        )
        assert (reported.phase, reported.generation, reported.failed_generation) == ("failed", 1, 1)
        assert reported.error is not None and "unknown_bundle" in reported.error
        wait_until(lambda: any(m[0].endswith("/birth") for m in peer.messages), what="a birth")
        births = [decode(m[1], Birth) for m in peer.messages if m[0].endswith("/birth")]
        first = next(i for i, m in enumerate(peer.messages) if m[0].endswith("/birth"))
        report_at = next(i for i, m in enumerate(peer.messages) if m[0].endswith("/reported"))
        assert report_at < first  # the kept report leaves before the birth that outdates it
        assert (reported.boot_epoch, reported.seq) < (births[0].boot_epoch, births[0].seq)
        assert births[0].events_dropped == 0
        wait_until(lambda: not outbox_entries(agent), what="the outbox emptied")
    finally:
        peer.close()
        agent.kill()
