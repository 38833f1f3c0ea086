"""Shared fixtures: a real Mosquitto with mutual TLS per test, and process cleanup."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import TestBroker


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TestBroker]:
    """The secure setup: a real Mosquitto with mutual TLS, the device ACL and a CRL
    (``tests/pki.py``) on a free loopback port, killed afterwards."""
    instance = TestBroker(tmp_path)
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()
