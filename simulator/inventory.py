"""Plausible inventories for simulated devices: a fleet of mixed gateways and sensors.

Rules:
- Deterministic under the run's seed: a device's hardware (architecture, CPU
  count, memory and disk size) depends only on the seed and its id; what it
  has *free* drifts a little from one connect to the next, also from a seeded
  rng, so a rerun shows the same fleet.
- The mix is data (:data:`HARDWARE`, weighted), modelled on a typical
  industrial fleet: mostly 64-bit ARM gateways, some 32-bit ARM sensors, a few
  x86 edge servers.
- Free memory stays within 20-80% of the total and free disk within 10-90%:
  numbers a dashboard has to show sensibly, not edge cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from protocols import Inventory
from simulator.profiles import device_rng

MiB = 1024 * 1024
GiB = 1024 * MiB


@dataclass(frozen=True)
class Hardware:
    arch: str
    os: str
    cpu_count: int
    mem_total_bytes: int
    disk_total_bytes: int
    weight: int


HARDWARE: tuple[Hardware, ...] = (
    Hardware("aarch64", "Linux 6.1.0-rpi", 4, 2 * GiB, 16 * GiB, 35),
    Hardware("aarch64", "Linux 6.6.23-yocto", 4, 4 * GiB, 32 * GiB, 20),
    Hardware("armv7l", "Linux 5.15.92-yocto", 2, 512 * MiB, 4 * GiB, 20),
    Hardware("armv7l", "Linux 5.10.184-buildroot", 1, 256 * MiB, 2 * GiB, 10),
    Hardware("x86_64", "Linux 6.8.0-ubuntu", 8, 16 * GiB, 256 * GiB, 10),
    Hardware("riscv64", "Linux 6.6.0-debian", 4, 4 * GiB, 32 * GiB, 5),
)


class DeviceInventory:
    """One simulated device's hardware, and a fresh reading at each connect."""

    __slots__ = ("_hardware", "_rng")

    def __init__(self, seed: int, device_id: str) -> None:
        pick = device_rng(seed, device_id, "hardware")
        self._hardware = pick.choices(HARDWARE, weights=[h.weight for h in HARDWARE])[0]
        self._rng: random.Random = device_rng(seed, device_id, "inventory")

    @property
    def arch(self) -> str:
        return self._hardware.arch

    def reading(self) -> Inventory:
        hw = self._hardware
        return Inventory(
            arch=hw.arch,
            os=hw.os,
            cpu_count=hw.cpu_count,
            mem_total_bytes=hw.mem_total_bytes,
            mem_free_bytes=int(hw.mem_total_bytes * self._rng.uniform(0.2, 0.8)),
            disk_total_bytes=hw.disk_total_bytes,
            disk_free_bytes=int(hw.disk_total_bytes * self._rng.uniform(0.1, 0.9)),
        )
