"""``driftless broker run``: stops promptly on SIGTERM, and what it held survives a restart.

The launcher used to block SIGINT/SIGTERM for ``sigwait`` before starting
Mosquitto, which inherited the mask, ignored SIGTERM, was SIGKILLed after ten
seconds and never saved its persistence file.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devtools.broker import BrokerError, MosquittoBroker, free_port

pytestmark = pytest.mark.integration

TOPIC = "driftless/v1/devices/keep-1/desired"


def broker_run(data_dir: Path, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "driftless.cli", "broker", "run", "--plain",
         "--data-dir", str(data_dir), "--port", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "mosquitto listening on mqtt://127.0.0.1:" in line, line
    return proc


def mosquittos_of(data_dir: Path) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if "mosquitto" in text and str(data_dir) in text:
            found.append(text)
    return found


def mqtt_client(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_broker_run_stops_within_a_second_and_keeps_retained_messages(tmp_path: Path) -> None:
    data_dir, port = tmp_path / "broker", free_port()
    proc = broker_run(data_dir, port)
    try:
        publisher = mqtt_client(port)
        info = publisher.publish(TOPIC, b"kept", qos=1, retain=True)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        publisher.disconnect()
        publisher.loop_stop()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        took_s = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert took_s < 1.0, f"broker run took {took_s:.2f}s to stop (a SIGKILL after a wait?)"
    assert mosquittos_of(data_dir) == []

    again = broker_run(data_dir, port)  # the same data directory: its persistence file
    try:
        received = threading.Event()
        subscriber = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        subscriber.on_message = lambda _c, _u, m: m.payload == b"kept" and received.set()
        subscriber.on_connect = lambda c, *_a: c.subscribe(TOPIC, qos=1)
        subscriber.connect("127.0.0.1", port)
        subscriber.loop_start()
        try:
            assert received.wait(10), "the retained message did not survive the restart"
        finally:
            subscriber.disconnect()
            subscriber.loop_stop()
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=15)


def test_a_broker_is_not_started_with_sigterm_blocked(tmp_path: Path) -> None:
    """The mask is inherited: refused loudly rather than a broker that never stops."""
    errors: list[BaseException] = []

    def start_blocked() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread only
        broker = MosquittoBroker(tmp_path / "broker")
        try:
            broker.start()
        except BrokerError as exc:
            errors.append(exc)
        finally:
            broker.kill()

    thread = threading.Thread(target=start_blocked)
    thread.start()
    thread.join(timeout=30)
    assert errors and "SIGTERM blocked" in str(errors[0])
