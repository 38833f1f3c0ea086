"""The only module that imports paho: a thin MQTT 5 face with no paho types leaking out.

Rules:
- Callbacks run on the network thread and are turned into plain transport events.
- ``connect`` raises TransportError (never a paho return code) so the caller can back off.
- :meth:`MqttTransport.unacknowledged` names what this client sent at QoS 1 and
  the broker never acknowledged (a ``token`` per message, given to ``send``), so
  the driver can keep it when the connection is lost. paho calls ``on_publish``
  holding its own message lock: that callback takes only this module's small
  lock, never the driver's (a thread that publishes holds the driver's lock and
  waits for paho's: the other order would deadlock).
- Keepalive, session expiry and the connect timeout come from
  :class:`edge_agent.settings.MqttSettings`; nothing here has its own.
- TCP_NODELAY on the connection: paho leaves Nagle's algorithm on, and small
  messages (bundle chunk requests, PUBACKs) would otherwise wait for the
  peer's delayed ACK, tens of milliseconds per round trip.
- All socket I/O happens on the thread that drives :meth:`MqttTransport.loop`.
  A publish from another thread (the fetcher's chunk requests, renewal) only
  queues the packet and wakes the loop. Left to itself, paho writes such a
  packet at once from the calling thread while the loop reads: harmless on
  TCP, but OpenSSL forbids two threads on one TLS connection, and over mutual
  TLS the agent dropped its connection mid-transfer ("Unspecified error").
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edge_agent.settings import MqttSettings
from plumbing.net import parse_broker_url

MAX_QUEUED_OUTGOING = 1000
_NOT_SENT = object()


class TransportError(Exception):
    """The broker could not be reached or refused the connection; retry later."""


@dataclass(frozen=True)
class TConnected:
    session_present: bool


@dataclass(frozen=True)
class TConnectRefused:
    reason: str


@dataclass(frozen=True)
class TSubscribed:
    granted: bool


@dataclass(frozen=True)
class TMessage:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class TDisconnected:
    reason: str


TransportEvent = TConnected | TConnectRefused | TSubscribed | TMessage | TDisconnected


def _loop_writes(_client: mqtt.Client, _userdata: object, _sock: object) -> None:
    """Nothing to do: the loop's select already watches the socket when paho wants to write."""


class MqttTransport:
    """One persistent MQTT 5 session for one device."""

    def __init__(
        self,
        client_id: str,
        broker_url: str,
        on_event: Callable[[TransportEvent], None],
        tls_context: ssl.SSLContext | None = None,
        settings: MqttSettings | None = None,
    ) -> None:
        """``settings``: keepalive, session expiry and connect timeout (defaults if None)."""
        address = parse_broker_url(broker_url)
        self.host, self.port, tls = address.host, address.port, address.tls
        self.settings = settings or MqttSettings()
        self._on_event = on_event
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self._client.connect_timeout = self.settings.connect_timeout_s
        self._client.max_queued_messages_set(MAX_QUEUED_OUTGOING)
        if tls:
            self._client.tls_set_context(tls_context or ssl.create_default_context())
        self._client.on_connect = self._connected
        self._client.on_subscribe = self._subscribed
        self._client.on_message = self._message
        self._client.on_disconnect = self._disconnected
        self._client.on_publish = self._published
        self._acks = threading.Lock()
        self._unacked: dict[int, object] = {}  # QoS 1 message id -> token, in send order
        self._early: set[int] = set()  # acknowledged before send() had recorded them
        # With a register-write callback set, paho's publish() no longer writes from
        # the caller's thread: it wakes the loop (its socket pair), which writes.
        self._client.on_socket_register_write = _loop_writes
        self._client.on_socket_unregister_write = _loop_writes

    def set_will(self, topic: str, payload: bytes) -> None:
        self._client.will_set(topic, payload, qos=1, retain=True)

    def connect(self) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.session_expiry_s
        try:
            self._client.connect(
                self.host,
                self.port,
                keepalive=self.settings.keepalive_s,
                clean_start=False,
                properties=props,
            )
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot reach {self.host}:{self.port}: {exc}") from exc
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # paho leaves Nagle on; chunk requests would wait
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def loop(self, timeout_s: float) -> bool:
        """Run network I/O for up to ``timeout_s``; False once the connection is gone."""
        return self._client.loop(timeout=timeout_s) == mqtt.MQTT_ERR_SUCCESS

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> bool:
        """Hand a message to the session; False when its queue is full (the message is lost).

        Without a connection a QoS 1 message waits in this client's queue in memory
        and goes out after its next CONNACK.
        """
        return self.send(topic, payload, qos=qos, retain=retain)

    def send(
        self, topic: str, payload: bytes, *, qos: int, retain: bool, token: object = None
    ) -> bool:
        """:meth:`publish`; a QoS 1 message with a ``token`` is listed by
        :meth:`unacknowledged` until the broker acknowledges it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            return False
        self._record(info.mid, token if qos > 0 else None)  # QoS 0: its on_publish clears it
        return True

    def unacknowledged(self) -> list[object]:
        """The tokens of QoS 1 messages this client took and the broker has not acknowledged,
        in the order they were sent. A client is used for one connection: call this once it
        is lost, then make a new one (this one would send them again after its next CONNACK)."""
        with self._acks:
            return [token for token in self._unacked.values() if token is not None]

    def _record(self, mid: int, token: object) -> None:
        with self._acks:
            if mid in self._early:  # its PUBACK came before publish() returned to us
                self._early.discard(mid)
            else:
                self._unacked[mid] = token

    def publish_and_wait(self, topic: str, payload: bytes, *, timeout_s: float) -> bool:
        """Publish QoS 1 and wait for the PUBACK while driving the loop ourselves."""
        info = self._client.publish(topic, payload, qos=1, retain=True)
        self._record(info.mid, None)
        deadline_loops = max(1, int(timeout_s / 0.05))
        for _ in range(deadline_loops):
            if info.is_published():
                return True
            if not self.loop(0.05):
                return False
        return info.is_published()

    def subscribe(self, topics: Sequence[str]) -> None:
        """One SUBSCRIBE for all ``topics`` (QoS 1); TSubscribed says whether all were granted."""
        self._client.subscribe([(name, 1) for name in topics])

    def disconnect(self) -> None:
        self._client.disconnect()
        self.loop(0.1)

    def request_disconnect(self) -> None:
        """A clean DISCONNECT without driving the loop: safe inside a paho callback."""
        self._client.disconnect()

    # paho callbacks (network thread)

    def _connected(self, _c: object, _u: object, flags: object, reason: object, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            self._on_event(TConnectRefused(str(reason)))
        else:
            self._on_event(TConnected(bool(getattr(flags, "session_present", False))))

    def _subscribed(
        self, _c: object, _u: object, _mid: int, codes: list[ReasonCode], _p: object
    ) -> None:
        self._on_event(TSubscribed(all(not getattr(c, "is_failure", False) for c in codes)))

    def _message(self, _c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        self._on_event(TMessage(message.topic, bytes(message.payload)))

    def _disconnected(
        self, _c: object, _u: object, _flags: object, reason: object, _p: object
    ) -> None:
        self._on_event(TDisconnected(str(reason)))

    def _published(self, _c: object, _u: object, mid: int, _reason: object, _p: object) -> None:
        with self._acks:  # paho holds its message lock here: take nothing else
            if self._unacked.pop(mid, _NOT_SENT) is _NOT_SENT:
                self._early.add(mid)
