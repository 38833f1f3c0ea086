"""The desired-state service: every change commits, then signals delivery; a refusal neither.

The signal here reads the database from another session when it is called, so each
test also shows that delivery is told only after the commit (it would see the old
generation otherwise).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine
from sqlmodel import Session

from edge_agent.identity import make_csr
from hub.db import init_db, make_engine, new_session
from hub.devices import store
from hub.devices.desired import DesiredState
from hub.devices.errors import (
    ConfigTooLarge,
    CutOffPending,
    DeviceActive,
    DeviceDecommissioned,
    DeviceNotFound,
    UnknownBundles,
)
from hub.enrollment.store import EnrollmentRefused, create_token
from hub.identity import CertificateAuthority
from hub.settings import HubSettings

NOW = dt.datetime(2026, 11, 29, 12, tzinfo=dt.UTC)
LATER = NOW + dt.timedelta(hours=1)


class Delivery:
    """A DeliverySignal that records, per call, the ids and what the database said then."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.calls: list[dict[str, int | None]] = []
        self.registrations = 0

    def desired_changed(self, device_ids: Iterable[str]) -> None:
        seen: dict[str, int | None] = {}
        with new_session(self.engine) as session:
            for device_id in device_ids:
                try:
                    seen[device_id] = store.get_device(session, device_id=device_id).desired_seq
                except DeviceNotFound:
                    seen[device_id] = None
        self.calls.append(seen)

    def fleet_changed(self) -> None:
        self.registrations += 1


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    instance = make_engine(f"sqlite:///{tmp_path / 'hub.db'}", busy_timeout_ms=1000)
    init_db(instance)
    yield instance
    instance.dispose()


@pytest.fixture
def delivery(engine: Engine) -> Delivery:
    return Delivery(engine)


def service(delivery: Delivery, *, tls: bool = False) -> DesiredState:
    settings = HubSettings(
        broker_url="mqtts://broker:8883" if tls else "mqtt://broker:1883",
        db_url="sqlite:///unused.db",
        max_config_bytes=100,
    )
    return DesiredState(settings=settings, delivery=delivery)


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with new_session(engine) as s:
        for device_id, site in (("a", "lab"), ("b", "lab"), ("c", "plant")):
            store.register_device(s, device_id=device_id, labels={"site": site}, now=NOW)
        yield s


def feed_mark(engine: Engine) -> int:
    with new_session(engine) as s:
        return store.desired_seq_now(s)


def test_setting_one_device_signals_it_once_committed(
    engine: Engine, session: Session, delivery: Delivery
) -> None:
    row = service(delivery).set_device(session, device_id="a", config={"v": 1}, now=NOW)
    assert row.desired_generation == 1
    assert delivery.calls == [{"a": feed_mark(engine)}]  # the committed change, not before


def test_a_selector_signals_exactly_the_devices_it_changed(
    engine: Engine, session: Session, delivery: Delivery
) -> None:
    updated = service(delivery).set_selector(
        session, labels={"site": "lab"}, config={"v": 2}, now=NOW
    )
    assert updated == [("a", 1), ("b", 1)]
    mark = feed_mark(engine)
    assert delivery.calls == [{"a": mark, "b": mark}]


@pytest.mark.parametrize(
    ("device_id", "config", "error"),
    [
        pytest.param("nope", {}, DeviceNotFound, id="unknown-device"),
        pytest.param("a", {"x": "y" * 200}, ConfigTooLarge, id="too-large"),
        pytest.param("a", {"workloads": [{"bundle": "ab" * 32}]}, UnknownBundles, id="no-bundle"),
    ],
)
def test_a_refused_change_commits_and_signals_nothing(
    engine: Engine,
    session: Session,
    delivery: Delivery,
    device_id: str,
    config: dict[str, object],
    error: type[Exception],
) -> None:
    before = feed_mark(engine)
    with pytest.raises(error):
        service(delivery).set_device(session, device_id=device_id, config=config, now=NOW)
    assert delivery.calls == [] and feed_mark(engine) == before


def test_decommission_and_purge_each_signal_the_device(
    engine: Engine, session: Session, delivery: Delivery
) -> None:
    desired = service(delivery)
    with pytest.raises(DeviceActive):
        desired.purge(session, device_id="a", now=NOW)
    assert delivery.calls == []
    desired.decommission(session, ca=None, device_id="a", now=NOW)
    assert delivery.calls == [{"a": feed_mark(engine)}]  # the retained document is cleared
    with pytest.raises(DeviceDecommissioned):
        desired.set_device(session, device_id="a", config={}, now=LATER)
    desired.purge(session, device_id="a", now=LATER)  # no broker cut-off over plain MQTT
    assert delivery.calls[1:] == [{"a": None}]  # gone: its retained copy is cleared too


def test_purge_waits_for_the_broker_cut_off_when_the_hub_asks_for_one(
    session: Session, delivery: Delivery
) -> None:
    desired = service(delivery, tls=True)
    desired.decommission(session, ca=None, device_id="a", now=NOW)
    with pytest.raises(CutOffPending):
        desired.purge(session, device_id="a", now=NOW)
    assert len(delivery.calls) == 1
    store.confirm_cut_offs(session, device_ids=["a"], now=NOW)
    desired.purge(session, device_id="a", now=NOW)
    assert len(delivery.calls) == 2


def test_enrolling_signals_only_a_reactivated_id(
    tmp_path: Path, engine: Engine, session: Session, delivery: Delivery
) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW)
    desired = service(delivery)

    def enroll(device_id: str) -> bool:
        secret, _ = create_token(
            session, device_id=device_id, uses=1, expires_at=LATER, labels={}, now=NOW
        )
        csr = make_csr(ec.generate_private_key(ec.SECP256R1()), device_id)
        enrolled = desired.enroll(
            session, ca=ca, secret=secret, device_id=device_id, csr_pem=csr, now=NOW
        )
        return enrolled.reactivated

    assert enroll("new-1") is False and delivery.calls == []  # a new device: nothing to deliver
    with pytest.raises(EnrollmentRefused):
        desired.enroll(session, ca=ca, secret="wrong", device_id="b", csr_pem=b"", now=NOW)
    desired.decommission(session, ca=ca, device_id="b", now=NOW)
    assert enroll("b") is True
    assert delivery.calls[1:] == [{"b": feed_mark(engine)}]
