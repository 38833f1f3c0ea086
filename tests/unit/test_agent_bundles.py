"""The agent's bundles on disk: cache budget and eviction, security versions, installs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.bundles import (
    BundleCache,
    CacheFull,
    InstallError,
    SecurityVersions,
    Workloads,
)
from edge_agent.plan import WorkloadSpec, WorkloadSpecError, workload_specs
from edge_agent.runtime import ApplyError, WorkloadApplier
from edge_agent.settings import BundleSettings
from firmware_bundles import archive
from firmware_bundles.model import RunSpec
from protocols import Desired
from tests.unit.hub_bundles_support import sha256_of
from tests.unit.test_bundles_support import DAY, NOW, Fleet

A, B, C = "aa" * 32, "bb" * 32, "cc" * 32


def cached(cache: BundleCache, sha: str, size: int, *, age_s: float, partial: bool = False) -> Path:
    cache.prepare()
    path = cache.partial_path(sha) if partial else cache.path(sha)
    path.write_bytes(bytes(size))
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_make_room_evicts_only_unreferenced_files_oldest_first(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path, max_bytes=1000)
    cached(cache, A, 400, age_s=30)
    cached(cache, B, 300, age_s=20, partial=True)
    cached(cache, C, 200, age_s=10)
    assert cache.make_room(300, keep={C}) == [f"{A}.bundle"]  # 900 -> 500 + 300 fits
    assert cache.make_room(500, keep={C}) == []  # 500 + 500 is exactly the budget
    assert cache.make_room(501, keep={C}) == [f"{B}.part"]
    with pytest.raises(CacheFull, match="cannot hold 900 more"):
        cache.make_room(900, keep={C})
    assert cache.has(C)


def test_evict_unreferenced_keeps_what_desired_state_references(tmp_path: Path) -> None:
    cache = BundleCache(tmp_path, max_bytes=10**6)
    cached(cache, A, 1, age_s=0)
    cached(cache, B, 1, age_s=0, partial=True)
    assert sorted(cache.evict_unreferenced({A})) == [f"{B}.part"]
    assert cache.has(A)


def test_security_versions_only_grow(tmp_path: Path) -> None:
    record = SecurityVersions(tmp_path)
    assert record.load() == {}
    assert record.raise_to({"x": 3, "y": 1}) == {"x": 3, "y": 1}
    assert record.raise_to({"x": 2}) == {"x": 3, "y": 1}
    assert SecurityVersions(tmp_path).load() == {"x": 3, "y": 1}
    record.path.write_text("{broken")
    with pytest.raises(ValueError, match="refusing to guess"):
        record.load()


@pytest.mark.parametrize(
    ("config", "error"),
    [
        pytest.param({"workloads": [{"bundle": A}]}, "name", id="no-name"),
        pytest.param({"workloads": [{"name": "../x", "bundle": A}]}, "name", id="path-name"),
        pytest.param({"workloads": [{"name": "a", "bundle": "xyz"}]}, "SHA-256", id="bad-ref"),
        pytest.param(
            {"workloads": [{"name": "a", "bundle": A}, {"name": "a", "bundle": B}]},
            "twice",
            id="duplicate-name",
        ),
    ],
)
def test_workload_specs_refuse_what_cannot_be_installed(config: dict[str, Any], error: str) -> None:
    with pytest.raises(WorkloadSpecError, match=error):
        workload_specs(config)


def test_workload_specs() -> None:
    config = {"workloads": [{"name": "a", "bundle": A.upper()}, {"name": "b"}, "x"], "k": 1}
    assert workload_specs(config) == [WorkloadSpec("a", A)]


class Device:
    """A data directory with a trusted root and real signed bundles in its cache."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.fleet = Fleet()
        self.data = tmp_path / "data"
        self.applier = WorkloadApplier(
            self.data,
            settings=BundleSettings(clock_skew_s=0),
            trusted_root=self.fleet.trusted(),
            agent_version="0.1.0",
            clock=lambda: float(NOW),
        )
        self.built = 0

    def bundle(self, version: str, security_version: int = 1, text: str = "v") -> str:
        self.built += 1
        src = self.tmp / f"src{self.built}"
        (src / "bin").mkdir(parents=True)
        (src / "bin" / "app").write_text(text)
        out = self.tmp / f"b{self.built}.bundle"
        archive.build(
            src,
            name="thermo",
            version=version,
            security_version=security_version,
            kind="app",
            architectures=["any"],
            created=NOW - DAY,
            expires=NOW + DAY,
            out=out,
            run=RunSpec(command=["bin/app"]),
        )
        for key in self.fleet.release_keys:
            archive.sign(out, key)
        sha = sha256_of(out)
        cache = self.applier.cache
        cache.prepare()
        os.replace(out, cache.path(sha))
        return sha

    def apply(self, generation: int, **slots: str) -> None:
        config = {"workloads": [{"name": n, "bundle": s} for n, s in slots.items()]}
        self.applier.apply(
            Desired(device_id="d", generation=generation, config=config, issued_at=1.0)
        )


def test_install_unpacks_a_version_and_switches_current(tmp_path: Path) -> None:
    device = Device(tmp_path)
    one = device.bundle("1.0", text="one")
    device.apply(1, thermo=one)
    workloads = device.data / "workloads" / "thermo"
    assert os.readlink(workloads / "current") == "1.0"
    assert (workloads / "current" / "bin" / "app").read_text() == "one"
    two = device.bundle("2.0", security_version=2, text="two")
    device.apply(2, thermo=two)
    assert os.readlink(workloads / "current") == "2.0"
    assert (workloads / "1.0" / "bin" / "app").read_text() == "one"  # old version untouched
    assert SecurityVersions(device.data).load() == {"thermo": 2}
    device.apply(3, thermo=two)  # idempotent
    names = sorted(p.name for p in workloads.iterdir())
    assert names == [".1.0.payload", ".2.0.payload", "1.0", "2.0", "current"]


def test_a_lower_security_version_is_refused_and_nothing_switches(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.apply(1, thermo=device.bundle("2.0", security_version=2))
    old = device.bundle("1.0", security_version=1)
    with pytest.raises(ApplyError, match="RollbackError"):
        device.apply(2, thermo=old)
    workloads = device.data / "workloads" / "thermo"
    assert os.readlink(workloads / "current") == "2.0"
    assert not (workloads / "1.0").exists()


def test_a_version_installed_from_another_payload_is_refused(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.apply(1, thermo=device.bundle("1.0", text="one"))
    with pytest.raises(ApplyError, match="another payload"):
        device.apply(2, thermo=device.bundle("1.0", text="not one"))


def test_a_bundle_missing_from_the_cache_fails_the_apply(tmp_path: Path) -> None:
    device = Device(tmp_path)
    with pytest.raises(ApplyError, match="not in the cache"):
        device.apply(1, thermo=A)
    assert not (device.data / "config.json").exists()


def test_without_a_root_bundles_cannot_be_applied(tmp_path: Path) -> None:
    applier = WorkloadApplier(
        tmp_path,
        settings=BundleSettings(),
        trusted_root=None,
        agent_version="0.1.0",
        clock=time.time,
    )
    config = {"workloads": [{"name": "a", "bundle": A}]}
    with pytest.raises(ApplyError, match="--root"):
        applier.apply(Desired(device_id="d", generation=1, config=config, issued_at=1.0))


def test_a_version_named_like_the_pointer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="collides"):
        Workloads(tmp_path).version_dir("thermo", "current")


def _loaded(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


def test_an_agent_that_sees_no_bundle_loads_no_verification_stack() -> None:
    # FIELD-NOTES: cryptography costs a device ~8 MB; only the fetch step needs it.
    code = (
        "import sys, edge_agent.driver\n"
        "lazy = ('cryptography', 'tarfile', 'firmware_bundles.trust', 'edge_agent.fetch_thread')\n"
        "print(sorted(m for m in lazy if m in sys.modules))\n"
    )
    assert _loaded(code) == "[]"


def test_the_fetch_path_imports_nothing_heavy() -> None:
    code = (
        "import sys, edge_agent.fetch_thread, edge_agent.runtime\n"
        "heavy = {'pydantic', 'sqlmodel', 'fastapi', 'sqlalchemy', 'aiomqtt', 'httpx',"
        " 'starlette'}\n"
        "print(sorted(heavy & {name.split('.')[0] for name in sys.modules}))\n"
    )
    assert _loaded(code) == "[]"
