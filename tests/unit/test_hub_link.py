"""The link as assembled on one broker: which handlers its sessions carry, and how they connect.

Nothing connects here: building a link opens no socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from hub.bundles.files import BundleFiles
from hub.context import system_clock
from hub.db import init_db, make_engine
from hub.identity import CertificateAuthority
from hub.metrics import HubMetrics
from hub.mqtt.link import BrokerLink, link_subscriptions
from hub.settings import HubSettings
from protocols import Channel
from protocols.topics import shared_subscription

NOW = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    instance = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=1000)
    init_db(instance)
    yield instance
    instance.dispose()


def build(
    tmp_path: Path, engine: Engine, broker_url: str, *, ca: CertificateAuthority | None
) -> tuple[BrokerLink, HubSettings]:
    settings = HubSettings(broker_url=broker_url, db_url=f"sqlite:///{tmp_path / 'hub.db'}")
    link = BrokerLink(
        broker=settings.broker(),
        engine=engine,
        settings=settings,
        clock=system_clock,
        metrics=HubMetrics(engine=engine),
        bundle_files=BundleFiles(tmp_path / "bundles"),
        ca=ca,
    )
    return link, settings


@pytest.mark.parametrize(
    ("broker_url", "with_ca"),
    [
        pytest.param("mqtt://127.0.0.1:1883", False, id="plain-no-ca"),
        pytest.param("mqtt://127.0.0.1:1883", True, id="plain-renews"),
        pytest.param("mqtts://127.0.0.1:8883", True, id="tls-renews-and-cuts-off"),
    ],
)
def test_the_link_session_subscribes_to_what_the_protocol_documents(
    tmp_path: Path, engine: Engine, broker_url: str, with_ca: bool
) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW) if with_ca else None
    link, settings = build(tmp_path, engine, broker_url, ca=ca)
    assert link.session.subscriptions == link_subscriptions(settings, renews=with_ca)
    assert link.chunk_session.subscriptions == [
        shared_subscription(settings.mqtt_shared_group, Channel.BUNDLE_REQ)
    ]


def test_the_two_sessions_connect_differently_on_purpose(tmp_path: Path, engine: Engine) -> None:
    link, settings = build(tmp_path, engine, "mqtt://127.0.0.1:1883", ca=None)
    main, chunks = link.session.options, link.chunk_session.options
    assert (main.client_id, chunks.client_id) == ("driftless-hub", "driftless-hub-bundles")
    assert not main.clean_start and main.session_expiry_s == settings.mqtt_session_expiry_s
    assert main.receive_max_messages == settings.mqtt_receive_max_messages
    assert main.batch_max == settings.ingest_batch_max and not main.tcp_nodelay
    assert chunks.clean_start and chunks.session_expiry_s is None and chunks.tcp_nodelay
    assert chunks.receive_max_messages is None


def test_a_signal_before_the_link_runs_is_dropped_not_queued(
    tmp_path: Path, engine: Engine
) -> None:
    """No link in this process (API only, or not started yet): the signal is a no-op and
    the on-connect sweep finds the change in the database later."""
    link, _ = build(tmp_path, engine, "mqtt://127.0.0.1:1883", ca=None)
    link.desired_changed(["a", "b"])
    assert link.stats.pending_desired == 0


async def test_a_signal_reaches_delivery_on_the_event_loop(tmp_path: Path, engine: Engine) -> None:
    link, _ = build(tmp_path, engine, "mqtt://127.0.0.1:1", ca=None)  # nothing listens
    link.start()
    try:
        await asyncio.to_thread(link.desired_changed, ["a", "b"])  # from another thread
        for _ in range(100):
            if link.stats.pending_desired == 2:
                break
            await asyncio.sleep(0.01)
        assert link.stats.pending_desired == 2  # waiting for a connection
        assert not link.connected
    finally:
        await link.stop()
