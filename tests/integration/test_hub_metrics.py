"""``GET /metrics`` of a real hub process on the secure Mosquitto, scraped as Prometheus does.

A raw MQTT peer (an ACL admin) plays the devices: births, reports, a duplicate, garbage,
a device nobody registered, a renewal without proof. The scrape is parsed with
prometheus_client's parser and every count is checked against what was sent. Every
wait has a deadline (tests.support.wait_until, RawPeer.wait_for); nothing sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edge_agent.identity import make_csr
from hub.admin_cli import mint_token
from hub.auth.models import Role
from protocols import Birth, CertRequest, Channel, Reported, encode, topic
from protocols.topics import subscription
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import HubProcess, Scrape, wait_until

pytestmark = pytest.mark.integration

RECEIVED = "driftless_ingest_messages_received_total"
REJECTED = "driftless_ingest_messages_rejected_total"
STALE = "driftless_ingest_messages_stale_total"
APPLIED = "driftless_ingest_messages_applied_total"
PUBLISHED = "driftless_desired_published_total"
REQUESTS = "driftless_api_requests_total"


@pytest.fixture
def peer(broker: TestBroker) -> Iterator[RawPeer]:
    instance = RawPeer(broker)
    try:
        yield instance
    finally:
        instance.close()


def viewer_token(hub: HubProcess) -> str:
    return mint_token(db_url=f"sqlite:///{hub.db_path}", name="prometheus", role=Role.viewer)


def scrape(hub: HubProcess, token: str) -> Scrape:
    """What a Prometheus scrape config with ``authorization: {credentials: TOKEN}`` gets."""
    response = httpx.get(
        f"{hub.base_url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(response.text)


def birth(device_id: str, applied_generation: int) -> bytes:
    return encode(
        Birth(
            device_id=device_id,
            session=1,
            boot_epoch=1,
            seq=0,
            applied_generation=applied_generation,
            agent_version="test-1",
            ts=time.time(),
        )
    )


def applied_report(device_id: str, generation: int) -> bytes:
    return encode(
        Reported(
            device_id=device_id,
            boot_epoch=1,
            seq=1,
            phase="applied",
            generation=generation,
            applied_generation=generation,
            ts=time.time(),
        )
    )


def renewal_without_proof(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = make_csr(key, device_id).decode()
    return encode(CertRequest(device_id=device_id, request_id=1, csr_pem=csr_pem, ts=time.time()))


def test_a_scrape_counts_the_traffic_the_hub_saw(hub: HubProcess, peer: RawPeer) -> None:
    anonymous = httpx.get(f"{hub.base_url}/metrics", timeout=10)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"] == "Bearer"
    token = viewer_token(hub)
    before = scrape(hub, token)
    assert before.value("driftless_mqtt_connected", connection="link") == 1
    assert before.value("driftless_api_auth_failures_total", reason="missing_token") == 1
    assert before.value("driftless_devices", state="active") == 0

    # Two devices, a desired change for each, both delivered.
    peer.subscribe(subscription(Channel.DESIRED))
    for device_id in ("d1", "d2"):
        hub.api.post("/devices", json={"id": device_id}).raise_for_status()
        response = hub.api.put(f"/devices/{device_id}/desired", json={"config": {"rate": 5}})
        response.raise_for_status()
        peer.wait_for(lambda m, d=device_id: m[0] == topic(d, Channel.DESIRED) and bool(m[1]))

    # What the devices send: 3 births and 3 reports, of which 1 garbage, 1 duplicate and
    # 1 from a device nobody registered; then a renewal without a proof of possession.
    peer.publish(topic("d1", Channel.BIRTH), birth("d1", applied_generation=1))
    peer.publish(topic("d2", Channel.BIRTH), birth("d2", applied_generation=0))  # behind
    peer.publish(topic("d1", Channel.REPORTED), applied_report("d1", 1))
    peer.publish(topic("d1", Channel.REPORTED), applied_report("d1", 1))  # the same again
    peer.publish(topic("d1", Channel.REPORTED), b'{"v":1,"kind":')  # garbage
    peer.publish(topic("ghost", Channel.BIRTH), birth("ghost", applied_generation=0))
    peer.subscribe(topic("d1", Channel.CERT))
    peer.publish(topic("d1", Channel.CERT_REQ), renewal_without_proof("d1"))
    peer.wait_for(lambda m: m[0] == topic("d1", Channel.CERT))

    def settled() -> Scrape | None:
        now = scrape(hub, token)
        handled = now.value(APPLIED) + now.total(STALE) + now.total(REJECTED)
        # d2's birth announced generation 0 < 1: its document goes out once more.
        return now if handled >= 6 and now.value(PUBLISHED) >= 3 else None

    metrics = wait_until(settled, timeout_s=20, what="the hub to handle every message")

    # Ingest: every message counted once, by channel, and by what became of it.
    assert metrics.value(RECEIVED, channel="birth") == 3
    assert metrics.value(RECEIVED, channel="reported") == 3
    assert metrics.value(RECEIVED, channel="cert_req") == 1
    assert metrics.value(APPLIED) == 3  # two births, one report
    assert metrics.value(STALE, reason="stale_report") == 1
    assert metrics.value(REJECTED, reason="malformed") == 1
    assert metrics.value(REJECTED, reason="unknown_device") == 1
    assert metrics.total(REJECTED) == 2
    # One batch observation per transaction: the five messages that decoded, in 1 to 5.
    size = "driftless_ingest_batch_size_messages"
    assert metrics.value(f"{size}_sum") == 5
    assert 1 <= metrics.value(f"{size}_count") <= 5
    duration = "driftless_ingest_batch_duration_seconds"
    assert metrics.value(f"{duration}_count") == metrics.value(f"{size}_count")
    assert 0 < metrics.value(f"{duration}_sum") < 20
    assert metrics.value("driftless_certificate_renewals_total", outcome="refused") == 1
    assert metrics.value("driftless_certificate_renewals_total", outcome="granted") == 0

    # Delivery: three publishes, but only the two changes have a delivery lag (the
    # republish for d2's birth delivers no new change).
    assert metrics.value(PUBLISHED) == 3
    lag = "driftless_desired_delivery_lag_seconds"
    assert metrics.value(f"{lag}_count") == 2
    assert 0 <= metrics.value(f"{lag}_sum") < 20
    assert metrics.value(f"{lag}_bucket", le="+Inf") == 2

    # The fleet, read from the database at scrape time.
    devices = {s.labels["state"]: s.value for s in metrics.families["driftless_devices"].samples}
    assert devices == {
        "active": 2,
        "online": 2,
        "in_sync": 1,  # d1 reported generation 1
        "behind": 1,  # d2 did not
        "failed": 0,
        "decommissioned": 0,
    }

    # The API, by route template: no device id in any label.
    assert metrics.value(REQUESTS, method="POST", route="/api/v1/devices", status="201") == 2
    desired = "/api/v1/devices/{device_id}/desired"
    assert metrics.value(REQUESTS, method="PUT", route=desired, status="200") == 2
    api_duration = "driftless_api_request_duration_seconds"
    assert metrics.value(f"{api_duration}_count", method="PUT", route=desired) == 2
    assert metrics.value(REQUESTS, method="GET", route="/metrics", status="401") == 1
    # A scrape is counted once it has been answered: this one sees those before it.
    assert metrics.value(REQUESTS, method="GET", route="/metrics", status="200") >= 1
    assert "/devices/d1" not in metrics.text and "/devices/d2" not in metrics.text
