"""The MQTT session's pure parts: topic filters as patterns, and which handler a topic goes to."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from hub.mqtt.session import Incoming, _Routes, filter_pattern


def matches(topic_filter: str, topic_name: str) -> bool:
    return re.fullmatch(filter_pattern(topic_filter), topic_name) is not None


@pytest.mark.parametrize(
    ("topic_filter", "topic_name", "expected"),
    [
        pytest.param("a/b", "a/b", True, id="exact"),
        pytest.param("a/b", "a/bc", False, id="exact-is-whole-level"),
        pytest.param("a/+/c", "a/x/c", True, id="plus-one-level"),
        pytest.param("a/+/c", "a//c", True, id="plus-empty-level"),
        pytest.param("a/+/c", "a/x/y/c", False, id="plus-not-two-levels"),
        pytest.param("a/#", "a", True, id="hash-includes-parent"),
        pytest.param("a/#", "a/x/y", True, id="hash-many-levels"),
        pytest.param("a/#", "ab", False, id="hash-whole-level"),
        pytest.param("#", "$SYS/x", False, id="hash-not-dollar"),
        pytest.param("+/x", "$SYS/x", False, id="plus-not-dollar"),
        pytest.param("$SYS/#", "$SYS/x", True, id="dollar-explicit"),
        pytest.param(
            "$share/hub/driftless/v1/devices/+/birth",
            "driftless/v1/devices/pump-1/birth",
            True,
            id="shared-group-stripped",
        ),
        pytest.param(
            "$share/hub/driftless/v1/devices/+/birth",
            "driftless/v1/devices/pump-1/reported",
            False,
            id="shared-other-channel",
        ),
        pytest.param("a.b/c", "aXb/c", False, id="dots-are-literal"),
        pytest.param(
            "$CONTROL/dynamic-security/v1/response",
            "$CONTROL/dynamic-security/v1/response",
            True,
            id="control-topic",
        ),
    ],
)
def test_filters_match_as_mqtt_says(topic_filter: str, topic_name: str, expected: bool) -> None:
    assert matches(topic_filter, topic_name) is expected


@pytest.mark.parametrize(
    "topic_filter",
    [
        pytest.param("a/#/b", id="hash-not-last"),
        pytest.param("a/b+", id="plus-in-a-level"),
        pytest.param("a/#b", id="hash-in-a-level"),
        pytest.param("$share/hub", id="share-without-filter"),
        pytest.param("", id="empty"),
    ],
)
def test_what_is_not_a_filter_is_refused(topic_filter: str) -> None:
    with pytest.raises(ValueError):
        filter_pattern(topic_filter)


async def _nothing(batch: Sequence[Incoming]) -> None:
    return None


def test_a_topic_goes_to_the_first_route_whose_filter_matches() -> None:
    routes = _Routes()
    birth, status = "$share/hub/driftless/v1/devices/+/birth", "driftless/v1/devices/+/status"
    routes.add([birth, status], _nothing)
    routes.add(["$share/hub/driftless/v1/devices/+/cert_req"], _nothing)
    routes.add(["driftless/v1/#"], _nothing)  # overlaps the first two: they win
    assert routes.filters == [
        birth,
        status,
        "$share/hub/driftless/v1/devices/+/cert_req",
        "driftless/v1/#",
    ]
    assert routes.route("driftless/v1/devices/d/birth") == 0
    assert routes.route("driftless/v1/devices/d/status") == 0
    assert routes.route("driftless/v1/devices/d/cert_req") == 1
    assert routes.route("driftless/v1/devices/d/reported") == 2
    assert routes.route("elsewhere/d/birth") == -1
    assert _Routes().route("anything") == -1
