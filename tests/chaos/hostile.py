"""A hostile device for the chaos suite: a stolen device's valid certificate in hostile hands.

A paho MQTT 5 client over mutual TLS (no test here) that records what the
broker said to each of its publishes (PUBACK reason codes: below 0x80 taken,
0x87 not authorised), the reason codes of its SUBACKs, and every message it
received. Payload makers build what it sends: garbage on its own topics (each
with the reason the hub must reject it for) and forgeries in another device's
name.

Rule: every wait has a deadline and raises AssertionError saying what it was
waiting for; :meth:`HostileDevice.close` is safe on every exit path.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocols import Channel, topic
from protocols.codec import MAX_PAYLOAD_BYTES

NOT_AUTHORIZED = 0x87
FORGED = 999_999  # the session, boot epoch and generation a forgery claims
FORGED_AGENT = "hostile"


class HostileDevice:
    """One MQTT 5 connection with a device certificate; ``client_id`` may be anyone's."""

    def __init__(
        self, port: int, *, ca: Path, cert: Path, key: Path, client_id: str, inflight: int = 100
    ) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.acks: dict[int, int] = {}  # mid -> PUBACK reason code
        self.connect_result: int | None = None
        self.disconnected = threading.Event()
        self._cond = threading.Condition()
        self._port = port
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        context = ssl.create_default_context(cafile=str(ca))
        context.load_cert_chain(str(cert), str(key))
        self._client.tls_set_context(context)
        self._client.max_inflight_messages_set(inflight)
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_disconnect = lambda *_a: self.disconnected.set()
        self._started = False

    def _on_connect(self, _c: object, _u: object, _f: object, rc: object, _p: object) -> None:
        with self._cond:
            self.connect_result = int(rc.value)  # type: ignore[attr-defined]
            self._cond.notify_all()

    def _on_message(self, _c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.received.append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_publish(self, _c: object, _u: object, mid: int, rc: object, _p: object) -> None:
        with self._cond:
            self.acks[mid] = int(rc.value)  # type: ignore[attr-defined]
            self._cond.notify_all()

    def _wait(self, predicate: object, timeout_s: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(predicate, timeout_s):  # type: ignore[arg-type]
                raise AssertionError(f"hostile device: timed out after {timeout_s}s: {what}")

    def connect(self, timeout_s: float = 15.0) -> int:
        """Connect; returns CONNACK's reason code (0 accepted)."""
        self._client.connect("127.0.0.1", self._port, keepalive=30)
        self._client.loop_start()
        self._started = True
        self._wait(
            lambda: self.connect_result is not None or self.disconnected.is_set(),
            timeout_s,
            "CONNACK",
        )
        return -1 if self.connect_result is None else self.connect_result

    def subscribe(self, topics: Sequence[str], timeout_s: float = 10.0) -> list[int]:
        """One SUBSCRIBE for all ``topics`` at QoS 1; returns SUBACK's reason codes."""
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(_c: object, _u: object, _mid: int, rcs: list[object], _p: object) -> None:
            codes.extend(int(rc.value) for rc in rcs)  # type: ignore[attr-defined]
            done.set()

        self._client.on_subscribe = on_subscribe
        self._client.subscribe([(t, 1) for t in topics])
        if not done.wait(timeout_s):
            raise AssertionError(f"hostile device: no SUBACK for {topics} in {timeout_s}s")
        return codes

    def publish(self, name: str, payload: bytes, *, retain: bool = False) -> int:
        """Queue a QoS 1 publish (no wait); returns its message id."""
        return int(self._client.publish(name, payload, qos=1, retain=retain).mid)

    def wait_acked(self, mids: Iterable[int], timeout_s: float) -> dict[int, int]:
        """Wait until every message in ``mids`` has its PUBACK; returns mid -> reason code."""
        wanted = list(mids)
        self._wait(
            lambda: all(m in self.acks for m in wanted),
            timeout_s,
            f"PUBACKs for {len(wanted)} publishes",
        )
        return {m: self.acks[m] for m in wanted}

    def close(self) -> None:
        if self._started:
            self._client.disconnect()
            self._client.loop_stop()
            self._started = False


# ---------------------------------------------------------------- what it sends


def _json(body: dict[str, object]) -> bytes:
    return json.dumps(body).encode()


def report(device_id: str, *, seq: int, generation: int = 0, v: int = 1) -> bytes:
    return _json(
        {
            "v": v, "kind": "reported", "device_id": device_id, "boot_epoch": 1, "seq": seq,
            "phase": "applied", "generation": generation, "applied_generation": generation,
            "failed_generation": 0, "ts": time.time(),
        }
    )  # fmt: skip


def birth(device_id: str) -> bytes:
    """A birth claiming the forged session, boot epoch and generation."""
    return _json(
        {
            "v": 1, "kind": "birth", "device_id": device_id, "session": FORGED,
            "boot_epoch": FORGED, "seq": 0, "applied_generation": FORGED,
            "failed_generation": 0, "agent_version": FORGED_AGENT, "ts": time.time(),
            "inventory": {
                "arch": FORGED_AGENT, "os": FORGED_AGENT, "cpu_count": 1,
                "mem_total_bytes": 1, "mem_free_bytes": 1,
                "disk_total_bytes": 1, "disk_free_bytes": 1,
            },
        }
    )  # fmt: skip


def status(device_id: str) -> bytes:
    return _json(
        {"v": 1, "kind": "status", "device_id": device_id, "online": False,
         "session": FORGED, "ts": time.time()}
    )  # fmt: skip


def desired(device_id: str) -> bytes:
    return _json(
        {"v": 1, "kind": "desired", "device_id": device_id, "generation": FORGED,
         "config": {"pwned": True}, "issued_at": time.time()}
    )  # fmt: skip


def cert_request(
    device_id: str, *, csr_for: str, proof_with: tuple[Path, Path] | None = None
) -> bytes:
    """A renewal request from ``device_id`` carrying a CSR that names ``csr_for``;
    ``proof_with`` (certificate, key): a valid proof of possession of that pair."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from edge_agent.identity import make_csr, sign_proof
    from protocols import renewal_proof_bytes

    csr = make_csr(ec.generate_private_key(ec.SECP256R1()), csr_for).decode()
    body: dict[str, object] = {
        "v": 1, "kind": "cert_req", "device_id": device_id, "request_id": 1,
        "csr_pem": csr, "ts": time.time(),
    }  # fmt: skip
    if proof_with is not None:
        cert, key = proof_with
        body["certificate_pem"] = cert.read_text()
        body["proof"] = sign_proof(key, renewal_proof_bytes(device_id, 1, csr))
    return _json(body)


def garbage(me: str, victim: str) -> list[tuple[str, bytes, str]]:
    """Pure: ``(topic, payload, the hub's rejection reason)`` for garbage on ``me``'s own
    topics, which the broker lets through and the hub must refuse."""
    reported, born = topic(me, Channel.REPORTED), topic(me, Channel.BIRTH)
    return [
        (reported, b"{not json", "malformed"),
        (reported, b"[1, 2, 3]", "malformed"),
        (born, b"\xff\xfe binary", "malformed"),
        (reported, birth(me), "wrong_kind"),
        (born, report(me, seq=1), "wrong_kind"),
        (reported, report(me, seq=1, v=99), "unsupported_version"),
        (reported, b"{" + b" " * (MAX_PAYLOAD_BYTES + 1024) + b"}", "oversized"),
        (reported, report(me, seq=1, generation=-1), "invalid_fields"),
        (reported, report(victim, seq=10**6), "device_mismatch"),
        (born, birth(victim), "device_mismatch"),
        (topic(me, Channel.CERT_REQ), cert_request(victim, csr_for=victim), "device_mismatch"),
    ]


def forgeries(victim: str) -> list[tuple[str, bytes, bool]]:
    """Pure: ``(topic, payload, retain)`` in ``victim``'s name on ``victim``'s topics."""
    return [
        (topic(victim, Channel.BIRTH), birth(victim), False),
        (topic(victim, Channel.REPORTED), report(victim, seq=10**6, generation=FORGED), False),
        (topic(victim, Channel.STATUS), status(victim), True),
        (topic(victim, Channel.DESIRED), desired(victim), True),
        (topic(victim, Channel.BUNDLE_REQ), b'{"v": 1}', False),
        (topic(victim, Channel.CERT_REQ), cert_request(victim, csr_for=victim), False),
    ]
