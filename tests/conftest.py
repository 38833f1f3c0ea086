"""Shared fixtures: a real Mosquitto with mutual TLS per test, and process cleanup."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pki import TestBroker
from tests.support import HubProcess, kill_workloads_under


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


@pytest.fixture
def hub(broker: TestBroker, tmp_path: Path) -> Iterator[HubProcess]:
    """A hub on ``broker`` (its MQTT link up), killed afterwards; files that need another
    hub (a fleet root, signing keys) define their own."""
    instance = HubProcess(tmp_path / "hub", broker)
    instance.start()
    try:
        yield instance
    finally:
        instance.kill()
        instance.api.close()


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A command run in-process (``driftless.cli.main``) points the root logger at the
    stderr pytest captured for that test; a later test's background thread logging
    through it would write to a closed file ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _no_workload_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Workloads outlive their agent on purpose (edge autonomy), so a test that kills its
    agent would leave them running: afterwards every supervised process whose working
    directory lies in the test's ``tmp_path`` is killed with its group."""
    yield
    tmp = request.node.funcargs.get("tmp_path")
    if isinstance(tmp, Path):
        kill_workloads_under(tmp)
