"""Shared fixtures: a real Mosquitto with mutual TLS per test, and process cleanup."""

from __future__ import annotations

import functools
import logging
import sys
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


@pytest.fixture(autouse=True)
def _fastapi_lets_go_of_each_tests_app() -> Iterator[None]:
    """FastAPI memoises what kind of callable each dependency is in module-level LRU caches
    (4,096 entries each, ``fastapi.dependencies.models``). A hub's dependencies are
    closures over its app, so every app a test creates stays alive until 4,096 later
    callables push it out: hundreds of apps, millions of objects, and each full garbage
    collection then takes seconds (the unit tests ran a third slower, and the process
    spent a minute in its final collection). A hub process creates one app, so only tests
    pay for this; after each test the caches are emptied and its apps can go."""
    yield
    models = sys.modules.get("fastapi.dependencies.models")
    for cached in vars(models).values() if models is not None else ():
        if isinstance(cached, functools._lru_cache_wrapper):
            cached.cache_clear()
