"""Shared fixtures: a real Mosquitto per test (mutual TLS by default), and process cleanup."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import TestBroker


def _running(broker: TestBroker) -> Iterator[TestBroker]:
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TestBroker]:
    """The secure setup: a real Mosquitto with mutual TLS, the device ACL and a CRL
    (``tests/pki.py``) on a free loopback port, killed afterwards."""
    yield from _running(TestBroker(tmp_path))


@pytest.fixture
def plain_broker(tmp_path: Path) -> Iterator[TestBroker]:
    """The plain loopback listener, for the tests that are about it."""
    yield from _running(TestBroker(tmp_path, plain=True))
