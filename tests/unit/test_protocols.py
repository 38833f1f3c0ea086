"""The wire contract: topics, codec, and every way a payload can be bad."""

from __future__ import annotations

import json

import pytest

from protocols import (
    MAX_PAYLOAD_BYTES,
    Birth,
    Channel,
    Desired,
    ProtocolError,
    Reason,
    Reported,
    Status,
    decode,
    encode,
    is_valid_device_id,
    parse_topic,
    topic,
)
from protocols.topics import shared_subscription, subscription


@pytest.mark.parametrize(
    "device_id, ok",
    [
        pytest.param("dev-1", True, id="plain"),
        pytest.param("A.b_c-9", True, id="punctuation"),
        pytest.param("x" * 64, True, id="64-chars"),
        pytest.param("x" * 65, False, id="65-chars"),
        pytest.param("", False, id="empty"),
        pytest.param("-lead", False, id="leading-dash"),
        pytest.param("a/b", False, id="slash"),
        pytest.param("+", False, id="plus-wildcard"),
        pytest.param("#", False, id="hash-wildcard"),
        pytest.param("dev 1", False, id="space"),
        pytest.param("dév", False, id="non-ascii"),
    ],
)
def test_device_id_rule(device_id: str, ok: bool) -> None:
    assert is_valid_device_id(device_id) is ok


@pytest.mark.parametrize("channel", list(Channel))
def test_topic_round_trip(channel: Channel) -> None:
    assert parse_topic(topic("dev-1", channel)) == ("dev-1", channel)


def test_topic_refuses_bad_device_id() -> None:
    with pytest.raises(ProtocolError) as err:
        topic("a/b", Channel.DESIRED)
    assert err.value.reason is Reason.BAD_DEVICE_ID


@pytest.mark.parametrize(
    "name, reason",
    [
        pytest.param("other/v1/devices/d/desired", Reason.BAD_TOPIC, id="foreign-root"),
        pytest.param("driftless/v1/devices/d/nope", Reason.BAD_TOPIC, id="unknown-channel"),
        pytest.param("driftless/v1/devices/d/reported/x", Reason.BAD_TOPIC, id="too-deep"),
        pytest.param("driftless/v1/devices/d", Reason.BAD_TOPIC, id="too-shallow"),
        pytest.param("driftless/v1/devices/-d/birth", Reason.BAD_DEVICE_ID, id="bad-id"),
    ],
)
def test_parse_topic_rejects(name: str, reason: Reason) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_topic(name)
    assert err.value.reason is reason


def test_subscription_filters() -> None:
    assert subscription(Channel.BIRTH) == "driftless/v1/devices/+/birth"
    assert (
        shared_subscription("hub", Channel.REPORTED) == "$share/hub/driftless/v1/devices/+/reported"
    )


SAMPLES = [
    Desired(device_id="d1", generation=4, config={"a": [1, 2], "b": {"c": None}}, issued_at=1.5),
    Birth(
        device_id="d1",
        session=3,
        boot_epoch=7,
        seq=1,
        applied_generation=2,
        failed_generation=0,
        agent_version="0.1.0",
        ts=2.0,
    ),
    Status(device_id="d1", online=False, session=3, ts=3.0),
    Reported(
        device_id="d1",
        boot_epoch=7,
        seq=2,
        phase="failed",
        generation=4,
        applied_generation=2,
        failed_generation=4,
        error="disk full",
        ts=4.0,
    ),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_codec_round_trip(message: object) -> None:
    data = encode(message)  # type: ignore[arg-type]
    assert decode(data, type(message)) == message  # type: ignore[type-var]
    assert json.loads(data)["v"] == 1


def _status_doc(**overrides: object) -> bytes:
    doc: dict[str, object] = {
        "kind": "status",
        "v": 1,
        "device_id": "d1",
        "online": True,
        "session": 1,
        "ts": 1.0,
    }
    doc.update(overrides)
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "payload, reason",
    [
        pytest.param(b"{not json", Reason.MALFORMED, id="malformed-json"),
        pytest.param(b"", Reason.MALFORMED, id="empty"),
        pytest.param(b"[1, 2]", Reason.MALFORMED, id="not-an-object"),
        pytest.param(b"\xff\xfe", Reason.MALFORMED, id="not-utf8"),
        pytest.param(_status_doc(v=2), Reason.UNSUPPORTED_VERSION, id="future-version"),
        pytest.param(_status_doc(v=...), Reason.UNSUPPORTED_VERSION, id="no-version"),
        pytest.param(_status_doc(kind="birth"), Reason.WRONG_KIND, id="wrong-kind"),
        pytest.param(_status_doc(online="yes"), Reason.INVALID_FIELDS, id="wrong-type"),
        pytest.param(_status_doc(session=-1), Reason.INVALID_FIELDS, id="negative-session"),
        pytest.param(_status_doc(device_id="a/b"), Reason.INVALID_FIELDS, id="bad-device-id"),
        pytest.param(_status_doc(ts=...), Reason.INVALID_FIELDS, id="missing-field"),
        pytest.param(b"x" * (MAX_PAYLOAD_BYTES + 1), Reason.OVERSIZED, id="oversized"),
    ],
)
def test_decode_rejects_with_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(ProtocolError) as err:
        decode(payload, Status)
    assert err.value.reason is reason
    assert reason.value in str(err.value)


def test_unknown_fields_are_tolerated_for_minor_additions() -> None:
    assert decode(_status_doc(extra_field=1), Status).online is True


def test_encode_refuses_oversized() -> None:
    big = Desired(device_id="d", generation=1, config={"x": "y" * MAX_PAYLOAD_BYTES}, issued_at=0)
    with pytest.raises(ProtocolError) as err:
        encode(big)
    assert err.value.reason is Reason.OVERSIZED


def test_desired_generation_must_be_positive() -> None:
    doc = b'{"kind":"desired","v":1,"device_id":"d","generation":0,"config":{},"issued_at":1}'
    with pytest.raises(ProtocolError) as err:
        decode(doc, Desired)
    assert err.value.reason is Reason.INVALID_FIELDS


def test_protocols_imports_nothing_heavy() -> None:
    """Every device pays for what protocols/ imports (FIELD-NOTES: pydantic ~10 MB)."""
    import subprocess
    import sys

    code = (
        "import sys, protocols, edge_agent.core, edge_agent.driver;"
        "bad = [m for m in ('pydantic', 'sqlmodel', 'fastapi', 'sqlalchemy', 'aiomqtt') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
