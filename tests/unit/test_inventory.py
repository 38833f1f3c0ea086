"""Inventory: what the agent measures, what the simulator makes up, what the hub keeps."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edge_agent.core import AgentCore, AgentState, Booted, Connected, Connecting, Publish
from edge_agent.inventory import collect, memory
from hub.devices.models import Device, DevicePublic
from hub.devices.rules import Tracking, on_birth
from protocols import Birth, Inventory, decode, encode
from simulator.inventory import HARDWARE, DeviceInventory

NOW = datetime(2026, 11, 29, tzinfo=UTC)
SAMPLE = Inventory(
    arch="aarch64",
    os="Linux 6.1.0",
    cpu_count=4,
    mem_total_bytes=2 * 1024**3,
    mem_free_bytes=1024**3,
    disk_total_bytes=16 * 1024**3,
    disk_free_bytes=8 * 1024**3,
)


def birth(session: int, inventory: Inventory | None) -> Birth:
    return Birth(
        device_id="d1",
        session=session,
        boot_epoch=1,
        seq=session,
        applied_generation=0,
        agent_version="0.1.0",
        inventory=inventory,
        ts=1.0,
    )


# ---------------------------------------------------------------- the wire


def test_the_birth_carries_the_inventory_the_driver_collected() -> None:
    core = AgentCore("d1", AgentState(), "0.1.0")
    core.handle(Booted(1.0))
    core.handle(Connecting(1.0))
    actions = core.handle(Connected(1.0, False, SAMPLE))
    (sent,) = [a for a in actions if isinstance(a, Publish) and a.topic.endswith("/birth")]
    assert decode(sent.payload, Birth).inventory == SAMPLE


def test_a_birth_without_inventory_still_decodes() -> None:
    """An older agent sends none: compatible, the field is optional."""
    raw = encode(birth(1, None)).replace(b',"inventory":null', b"")
    assert b"inventory" not in raw
    assert decode(raw, Birth).inventory is None


def test_a_negative_size_in_the_inventory_is_refused() -> None:
    raw = encode(birth(1, SAMPLE)).replace(b'"cpu_count":4', b'"cpu_count":-4')
    with pytest.raises(ValueError, match="invalid_fields"):
        decode(raw, Birth)


# ---------------------------------------------------------------- the agent


def test_memory_reads_memavailable_not_memfree(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal: 2048 kB\nMemFree: 100 kB\nMemAvailable: 1024 kB\n")
    assert memory(meminfo) == (2048 * 1024, 1024 * 1024)


@pytest.mark.parametrize("content", [None, "MemTotal: lots\n", "garbage"])
def test_an_unreadable_meminfo_reports_zero_and_does_not_fail(
    tmp_path: Path, content: str | None
) -> None:
    meminfo = tmp_path / "meminfo"
    if content is not None:
        meminfo.write_text(content)
    inventory = collect(tmp_path, arch="x86_64", meminfo=meminfo)
    assert (inventory.mem_total_bytes, inventory.mem_free_bytes) == (0, 0)
    assert inventory.disk_total_bytes > 0  # the rest is still measured


def test_collect_measures_this_machine(tmp_path: Path) -> None:
    inventory = collect(tmp_path, arch="x86_64")
    assert inventory.arch == "x86_64" and inventory.cpu_count >= 1
    assert 0 < inventory.mem_free_bytes <= inventory.mem_total_bytes
    assert 0 < inventory.disk_free_bytes <= inventory.disk_total_bytes
    # cgroup limits: what this machine allows, said the way the runtime found it
    from edge_agent.supervisor.limits import cgroup_support

    support = cgroup_support()
    assert inventory.cgroups == ("v2" if support.available else support.reason)
    assert inventory.cgroups  # never silent


def test_a_missing_data_dir_reports_zero_disk(tmp_path: Path) -> None:
    inventory = collect(tmp_path / "gone", arch="x86_64")
    assert (inventory.disk_total_bytes, inventory.disk_free_bytes) == (0, 0)


# ---------------------------------------------------------------- the simulator


def test_simulated_hardware_depends_only_on_seed_and_device() -> None:
    one, again = DeviceInventory(7, "sim-1"), DeviceInventory(7, "sim-1")
    assert [one.reading() for _ in range(3)] == [again.reading() for _ in range(3)]
    readings = [one.reading() for _ in range(20)]
    assert len({(r.arch, r.mem_total_bytes, r.disk_total_bytes) for r in readings}) == 1
    assert len({r.mem_free_bytes for r in readings}) > 1  # what is free drifts per connect
    for r in readings:
        assert 0.2 * r.mem_total_bytes <= r.mem_free_bytes <= 0.8 * r.mem_total_bytes
        assert 0.1 * r.disk_total_bytes <= r.disk_free_bytes <= 0.9 * r.disk_total_bytes


def test_a_simulated_fleet_is_a_plausible_mix() -> None:
    archs = Counter(DeviceInventory(1, f"sim-{i}").arch for i in range(2000))
    assert set(archs) == {h.arch for h in HARDWARE}
    assert archs.most_common(1)[0][0] == "aarch64"


# ---------------------------------------------------------------- the hub


def test_the_hub_keeps_the_newest_births_inventory() -> None:
    first = on_birth(Tracking(), birth(1, SAMPLE), now=NOW).tracking
    assert first.inventory is not None and first.inventory["arch"] == "aarch64"
    # A later birth without inventory (a minimal agent) keeps what was known.
    second = on_birth(first, birth(2, None), now=NOW).tracking
    assert second.inventory == first.inventory
    # A stale birth (older session) changes nothing, its inventory included.
    newer = Inventory(**{**first.inventory, "mem_free_bytes": 1})
    stale = on_birth(second, birth(1, newer), now=NOW)
    assert stale.stale is not None and stale.tracking.inventory == first.inventory


def test_the_api_shows_the_inventory() -> None:
    tracking = on_birth(Tracking(), birth(1, SAMPLE), now=NOW).tracking
    row = Device(id="d1", created_at=NOW, inventory=tracking.inventory)
    public = DevicePublic.from_row(row)
    assert public.inventory is not None and public.inventory.disk_free_bytes == 8 * 1024**3
    assert DevicePublic.from_row(Device(id="d2", created_at=NOW)).inventory is None
