"""A raw MQTT 5 test peer (paho) that records what it receives, with deadline waits."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.pki import TestBroker


class RawPeer:
    """Publishes anything (including garbage) and records every message it receives,
    the PUBACK reason of each publish and why its connection ended.

    It is the test peer playing ``role`` on the secure broker (``TestBroker.peer_tls``):
    the same role gets the same certificate and client id again. :meth:`from_files`
    presents a certificate and key read from files instead: what a thief copied off a
    device, or what ``agent enroll`` left.
    """

    def __init__(self, broker: TestBroker, *, role: str | None = None) -> None:
        client_id, context = broker.peer_tls(role)
        self._start(broker.port, client_id, context)

    @classmethod
    def from_files(cls, port: int, ca: Path, cert: Path, key: Path) -> RawPeer:
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(cert, key)
        peer = cls.__new__(cls)
        peer._start(port, "", context)  # the broker names it after the certificate
        return peer

    def _start(self, port: int, client_id: str, context: ssl.SSLContext) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.pubacks: dict[int, str] = {}
        self.disconnects: list[str] = []
        self._cond = threading.Condition()
        self.client_id = client_id
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.tls_set_context(context)
        connected = threading.Event()
        self.client.on_connect = lambda *_a: connected.set()
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        assert connected.wait(10), "no CONNACK"

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self._cond.notify_all()

    def _on_publish(self, _c: object, _u: object, mid: int, reason: object, _p: object) -> None:
        with self._cond:
            self.pubacks[mid] = str(reason)
            self._cond.notify_all()

    def _on_disconnect(
        self, _c: object, _u: object, _f: object, reason: object, _p: object
    ) -> None:
        with self._cond:
            self.disconnects.append(str(reason))
            self._cond.notify_all()

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.subscribe(topic, qos=1)
        assert done.wait(5), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    def publish_reason(self, topic: str, payload: bytes, *, retain: bool = False) -> str:
        """Publish at QoS 1; the broker's PUBACK reason ('Success', 'Not authorized')."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.pubacks, 5), f"no PUBACK: {topic}"
            return self.pubacks[info.mid]

    def wait_for(
        self, predicate: Callable[[tuple[str, bytes, bool]], bool], *, timeout_s: float = 10
    ) -> tuple[str, bytes, bool]:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching message in {timeout_s}s: {self.messages!r}")
                self._cond.wait(left)

    def wait_disconnected(self, *, timeout_s: float) -> str:
        """Why the connection ended (e.g. 'Administrative action' from the broker)."""
        with self._cond:
            if not self._cond.wait_for(lambda: bool(self.disconnects), timeout_s):
                raise AssertionError(f"still connected after {timeout_s}s")
            return self.disconnects[0]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def session_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    return props
