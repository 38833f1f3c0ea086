"""A real Mosquitto with mutual TLS, identity = username, the device ACL and a CRL."""

from __future__ import annotations

import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import MosquittoBroker
from edge_agent.identity import create_key, make_csr
from hub.broker_config import TlsFiles, hub_identities, write_secure_files
from hub.identity import CertificateAuthority, client_identity

HUB_IDENTITY = hub_identities("driftless-hub")[0]

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


@dataclass
class Pki:
    ca: CertificateAuthority
    files: TlsFiles
    dir: Path

    def device(self, device_id: str) -> tuple[Path, Path, int]:
        """A device as enrollment makes it: key on the device, certificate from its CSR."""
        key_path = self.dir / f"{device_id}.key"
        csr = make_csr(create_key(key_path), device_id)
        issued = self.ca.issue_from_csr(csr, device_id=device_id, now=NOW)
        cert_path = self.dir / f"{device_id}.crt"
        cert_path.write_bytes(issued.pem)
        return cert_path, key_path, issued.serial

    def server_side(self, name: str) -> tuple[Path, Path]:
        return client_identity(self.ca, self.dir, name, now=NOW)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", now=NOW)
    files = write_secure_files(ca, tmp_path, hub_identities=[HUB_IDENTITY], revoked=[], now=NOW)
    return Pki(ca, files, tmp_path)


@pytest.fixture
def tls_broker(pki: Pki, tmp_path: Path) -> Iterator[MosquittoBroker]:
    broker = MosquittoBroker(tmp_path / "broker", tls=pki.files)
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


class Client:
    """A paho MQTT 5 client over mutual TLS that records messages and PUBACK reason codes."""

    def __init__(
        self,
        broker: MosquittoBroker,
        ca: Path,
        cert: Path | None,
        key: Path | None,
        client_id: str = "",
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}
        self.connect_result: int | None = None
        self.disconnected = threading.Event()
        self._event = threading.Condition()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        context = ssl.create_default_context(cafile=str(ca))
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
        self.c.tls_set_context(context)
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.broker = broker

    def _on_disconnect(self, *_a: object) -> None:
        with self._event:  # wake a connect() waiting for the CONNACK that will not come
            self.disconnected.set()
            self._event.notify_all()

    def _on_connect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        with self._event:
            self.connect_result = int(rc.value)  # type: ignore[attr-defined]
            self._event.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._event:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._event.notify_all()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: object, _p: object) -> None:
        with self._event:
            self.acks[mid] = int(rc.value)  # type: ignore[attr-defined]
            self._event.notify_all()

    def connect(self) -> bool:
        try:
            self.c.connect("127.0.0.1", self.broker.port, keepalive=30)
        except (ssl.SSLError, OSError):
            return False
        self.c.loop_start()
        with self._event:
            self._event.wait_for(
                lambda: self.connect_result is not None or self.disconnected.is_set(), 10
            )
        return self.connect_result == 0 and not self.disconnected.is_set()

    def wait(self, predicate: object, timeout_s: float = 10) -> bool:
        with self._event:
            return self._event.wait_for(predicate, timeout_s)  # type: ignore[arg-type]

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *_a: done.set()
        self.c.subscribe(topic, qos=1)
        assert done.wait(10)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Publish QoS 1 and return the PUBACK reason code (below 0x80 is success,
        e.g. 0x10 "no matching subscribers"; 0x87 is "not authorized")."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        assert self.wait(lambda: info.mid in self.acks)
        return self.acks[info.mid]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_device_reaches_only_its_own_topics(pki: Pki, tls_broker: MosquittoBroker) -> None:
    hub = Client(tls_broker, pki.ca.cert_path, *pki.server_side(HUB_IDENTITY))
    a = Client(tls_broker, pki.ca.cert_path, *pki.device("dev-a")[:2])
    assert hub.connect() and a.connect()
    try:
        hub.subscribe("driftless/v1/devices/#")
        a.subscribe("driftless/v1/devices/#")  # granted by SUBACK, filtered on delivery
        for device in ("dev-b", "dev-a"):
            assert (
                hub.publish(f"driftless/v1/devices/{device}/desired", device.encode(), True) < 0x80
            )
        assert a.wait(lambda: ("driftless/v1/devices/dev-a/desired", b"dev-a") in a.messages)
        assert all("/dev-b/" not in topic for topic, _ in a.messages)
        # Impersonation: forbidden publishes are refused with 0x87 and never delivered.
        assert a.publish("driftless/v1/devices/dev-b/reported", b"forged") == 0x87
        assert a.publish("driftless/v1/devices/dev-a/desired", b"self-serve") == 0x87
        assert a.publish("driftless/v1/devices/dev-a/reported", b"mine") < 0x80
        assert hub.wait(lambda: ("driftless/v1/devices/dev-a/reported", b"mine") in hub.messages)
        assert ("driftless/v1/devices/dev-b/reported", b"forged") not in hub.messages
    finally:
        hub.close()
        a.close()


def test_client_id_of_another_device_cannot_take_over_its_session(
    pki: Pki, tls_broker: MosquittoBroker
) -> None:
    b = Client(tls_broker, pki.ca.cert_path, *pki.device("dev-b")[:2], client_id="dev-b")
    assert b.connect()
    a = Client(tls_broker, pki.ca.cert_path, *pki.device("dev-a")[:2], client_id="dev-b")
    try:
        assert a.connect()  # its client id is replaced by its certificate's name
        assert not b.disconnected.wait(1.0), "dev-b was kicked off by a client claiming its id"
        assert b.publish("driftless/v1/devices/dev-b/reported", b"still here") < 0x80
    finally:
        a.close()
        b.close()


def test_no_certificate_or_foreign_ca_is_refused(
    pki: Pki, tls_broker: MosquittoBroker, tmp_path: Path
) -> None:
    assert not Client(tls_broker, pki.ca.cert_path, None, None).connect()
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca", now=NOW)
    key = create_key(tmp_path / "rogue.key")
    issued = other.issue_from_csr(make_csr(key, "dev-a"), device_id="dev-a", now=NOW)
    (tmp_path / "rogue.crt").write_bytes(issued.pem)
    rogue = Client(tls_broker, pki.ca.cert_path, tmp_path / "rogue.crt", tmp_path / "rogue.key")
    assert not rogue.connect()


def test_revoked_certificate_is_refused_after_reload(pki: Pki, tls_broker: MosquittoBroker) -> None:
    cert, key, serial = pki.device("dev-a")
    first = Client(tls_broker, pki.ca.cert_path, cert, key)
    assert first.connect()
    first.close()
    pki.files.crl.write_bytes(pki.ca.crl([(serial, NOW)], now=NOW))
    tls_broker.reload()

    def refused() -> bool:
        return not Client(tls_broker, pki.ca.cert_path, cert, key).connect()

    assert any(refused() for _ in range(20)), "revoked certificate still accepted"
    other_cert, other_key, _ = pki.device("dev-b")
    assert Client(tls_broker, pki.ca.cert_path, other_cert, other_key).connect()
