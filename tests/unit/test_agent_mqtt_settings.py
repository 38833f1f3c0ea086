"""The agent's MQTT settings: the keepalive reaches the CONNECT on the wire; bad ones stop it.

No broker: a loopback socket plays one and reads the CONNECT packet paho writes
(MQTT 5, section 3.1: fixed header, protocol name, level, flags, keepalive, then
the properties, among them the Session Expiry Interval).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from driftless import cli
from edge_agent.driver import AgentDriver
from edge_agent.settings import KEEPALIVE_MAX_S, KEEPALIVE_MIN_S, MqttSettings
from edge_agent.transport import MqttTransport

SESSION_EXPIRY_PROPERTY = 0x11
# CONNECT properties of fixed size (MQTT 5, section 3.1.2.11): identifier -> value bytes.
PROPERTY_SIZES = {0x11: 4, 0x21: 2, 0x22: 2, 0x27: 4, 0x19: 1, 0x17: 1}


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(5)
    yield server
    server.close()


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7


def read_connect(server: socket.socket, transport: MqttTransport) -> dict[str, int]:
    """Accept the transport's connection, drive its loop until CONNECT is in, parse it."""
    transport.connect()
    peer, _ = server.accept()
    peer.settimeout(0.05)
    data = b""
    try:
        for _ in range(100):
            transport.loop(0.02)
            try:
                data += peer.recv(4096)
            except TimeoutError:
                continue
            if len(data) >= 2:
                length, start = _varint(data, 1)
                if len(data) >= start + length:
                    break
        else:
            raise AssertionError(f"no whole CONNECT packet arrived: {data!r}")
    finally:
        peer.close()
    assert data[0] == 0x10, "not a CONNECT packet"
    _, at = _varint(data, 1)
    name_length = struct.unpack_from(">H", data, at)[0]
    assert data[at + 2 : at + 2 + name_length] == b"MQTT"
    at += 2 + name_length
    level, flags, keepalive = struct.unpack_from(">BBH", data, at)
    at += 4
    properties_length, at = _varint(data, at)
    properties = data[at : at + properties_length]
    fields = {"level": level, "clean_start": (flags >> 1) & 1, "keepalive": keepalive}
    index = 0
    while index < len(properties):
        identifier = properties[index]
        size = PROPERTY_SIZES[identifier]  # a KeyError: a property this test does not know
        if identifier == SESSION_EXPIRY_PROPERTY:
            fields["session_expiry"] = struct.unpack_from(">I", properties, index + 1)[0]
        index += 1 + size
    return fields


def test_the_keepalive_setting_is_the_one_in_the_connect_packet(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    settings = MqttSettings(keepalive_s=17, session_expiry_s=3600)
    transport = MqttTransport("d1", f"mqtt://127.0.0.1:{port}", lambda _event: None, None, settings)
    assert read_connect(listener, transport) == {
        "level": 5,
        "clean_start": 0,
        "keepalive": 17,
        "session_expiry": 3600,
    }


def test_the_agent_connects_with_the_default_keepalive_of_30_s(
    listener: socket.socket, tmp_path: Path
) -> None:
    port = listener.getsockname()[1]
    driver = AgentDriver(device_id="d1", broker_url=f"mqtt://127.0.0.1:{port}", data_dir=tmp_path)
    fields = read_connect(listener, driver.transport)
    assert (fields["keepalive"], fields["session_expiry"]) == (30, 7 * 24 * 3600)


def test_the_agent_passes_its_keepalive_to_its_transport(
    listener: socket.socket, tmp_path: Path
) -> None:
    port = listener.getsockname()[1]
    driver = AgentDriver(
        device_id="d1",
        broker_url=f"mqtt://127.0.0.1:{port}",
        data_dir=tmp_path,
        mqtt=MqttSettings(keepalive_s=600),
    )
    assert read_connect(listener, driver.transport)["keepalive"] == 600


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(KEEPALIVE_MIN_S - 1, id="below-the-minimum"),
        pytest.param(KEEPALIVE_MAX_S + 1, id="above-the-maximum"),
        pytest.param(0, id="zero-turns-keepalive-off"),
        pytest.param(-30, id="negative"),
        pytest.param(30.5, id="fraction"),
        pytest.param(True, id="bool"),
    ],
)
def test_a_keepalive_out_of_range_is_refused(value: object) -> None:
    with pytest.raises(
        ValueError, match=r"keepalive must be a whole number of seconds within 5\.\.3600"
    ):
        MqttSettings(keepalive_s=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [KEEPALIVE_MIN_S, 30, KEEPALIVE_MAX_S])
def test_a_keepalive_in_range_is_taken(value: int) -> None:
    assert MqttSettings(keepalive_s=value).keepalive_s == value


# ---------------------------------------------------------------- driftless agent run


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """What ``driftless agent run`` would start the agent with (it is not started)."""
    calls: dict[str, object] = {}

    def fake_run_agent(**kwargs: object) -> int:
        calls.update(kwargs)
        return 0

    monkeypatch.setattr("edge_agent.driver.run_agent", fake_run_agent)
    monkeypatch.delenv("DRIFTLESS_KEEPALIVE_S", raising=False)
    return calls


RUN = ["--log-format", "console", "agent", "run", "--device-id", "d1", "--insecure-unsigned"]


def keepalive_of(started: dict[str, object]) -> int:
    settings = started["mqtt"]
    assert isinstance(settings, MqttSettings)
    return settings.keepalive_s


def test_agent_run_takes_the_keepalive_from_its_flag(started: dict[str, object]) -> None:
    assert cli.main([*RUN, "--keepalive-s", "120"]) == 0
    assert keepalive_of(started) == 120


def test_agent_run_takes_the_keepalive_from_the_environment(
    started: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DRIFTLESS_KEEPALIVE_S", "45")
    assert cli.main(RUN) == 0
    assert keepalive_of(started) == 45


def test_agent_run_keepalive_defaults_to_30_s(started: dict[str, object]) -> None:
    assert cli.main(RUN) == 0
    assert keepalive_of(started) == 30


def test_agent_run_refuses_a_keepalive_out_of_range(
    started: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*RUN, "--keepalive-s", "4"]) == 2
    assert not started, "the agent started anyway"
    err = capsys.readouterr().err
    assert "driftless agent run: keepalive must be a whole number of seconds within 5..3600" in err
    assert "got 4" in err


def test_agent_run_refuses_a_keepalive_that_is_not_a_number(
    started: dict[str, object], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DRIFTLESS_KEEPALIVE_S", "thirty")
    with pytest.raises(SystemExit) as caught:
        cli.main(RUN)
    assert caught.value.code == 2 and not started
    assert "--keepalive-s: invalid int value: 'thirty'" in capsys.readouterr().err
