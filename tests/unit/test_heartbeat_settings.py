"""Heartbeat and liveness settings: bad values stop the start with a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.settings import MqttSettings
from hub.settings import HubSettings
from simulator.fleet import FleetConfig


@pytest.mark.parametrize("value", [0.5, 0.0, -1.0, 86401.0, True])
def test_the_agent_refuses_a_heartbeat_outside_the_protocols_bounds(value: float) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_s must be within 1\.\.86400 s"):
        MqttSettings(heartbeat_s=value)


def test_the_agent_default_heartbeat_is_30_s() -> None:
    assert MqttSettings().heartbeat_s == 30.0


@pytest.mark.parametrize("value", [0.5, 100000.0])
def test_a_fleet_refuses_a_heartbeat_outside_the_protocols_bounds(value: float) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_s .* is not within"):
        FleetConfig(broker_url="mqtt://127.0.0.1:1883", device_ids=("d1",), heartbeat_s=value)


def test_a_fleet_may_run_without_heartbeats() -> None:
    config = FleetConfig(broker_url="mqtt://127.0.0.1:1883", device_ids=("d1",), heartbeat_s=None)
    assert config.heartbeat_s is None


@pytest.mark.parametrize(("name", "value"), [("heartbeat_s", 0.0), ("offline_after_missed", 0)])
def test_the_hub_refuses_non_positive_liveness_settings(
    name: str, value: float, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match=name):
        HubSettings(
            broker_url="mqtt://127.0.0.1:1883",
            db_url=f"sqlite:///{tmp_path}/hub.db",
            **{name: value},
        )  # type: ignore[arg-type]


def test_the_hub_defaults(tmp_path: Path) -> None:
    settings = HubSettings(
        broker_url="mqtt://127.0.0.1:1883", db_url=f"sqlite:///{tmp_path}/hub.db"
    )
    assert (settings.heartbeat_s, settings.offline_after_missed) == (30.0, 3)
