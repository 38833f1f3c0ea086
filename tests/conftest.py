"""Shared fixtures: a real Mosquitto per test, and process cleanup."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.devbroker import MosquittoBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, stopped (and killed if need be) afterwards."""
    instance = MosquittoBroker(tmp_path / "broker")
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()
