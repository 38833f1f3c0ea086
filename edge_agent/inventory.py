"""What this device is and has left, read at each connect and sent in the birth.

Rules:
- Cheap (a few small reads, no subprocesses): it runs on every connect.
- Never fails the connect: a value that cannot be read is reported as 0 (and
  ``os`` as ``unknown``), because a birth without inventory is worse than one
  with a gap.
- ``mem_free_bytes`` is ``MemAvailable`` from ``/proc/meminfo`` (what new
  processes can get without swapping), not ``MemFree``; disk figures are for
  the file system that holds the agent's data directory, which is where
  bundles land.
- ``firmware_slot`` and ``firmware_version`` say which A/B slot runs
  (:mod:`edge_agent.slots`); absent on a device that never installed firmware.
"""

from __future__ import annotations

import os
import platform
import shutil
from pathlib import Path

from protocols import Inventory

MEMINFO = Path("/proc/meminfo")
SHORT = 64


def memory(meminfo: Path = MEMINFO) -> tuple[int, int]:
    """(total, available) bytes from ``meminfo``; (0, 0) when it cannot be read."""
    fields: dict[str, int] = {}
    try:
        with open(meminfo, encoding="ascii", errors="replace") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("MemTotal", "MemAvailable"):
                    fields[name] = int(rest.split()[0]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return 0, 0
    return fields.get("MemTotal", 0), fields.get("MemAvailable", 0)


def collect(data_dir: Path, *, arch: str, meminfo: Path = MEMINFO) -> Inventory:
    """The inventory now; ``data_dir`` is measured for disk space.

    ``arch`` is the architecture as bundle manifests spell it (the agent's
    setting), so what the hub shows is what the device checks targets against.
    """
    total_mem, free_mem = memory(meminfo)
    try:
        disk = shutil.disk_usage(data_dir)
        disk_total, disk_free = disk.total, disk.free
    except OSError:
        disk_total = disk_free = 0
    system = f"{platform.system()} {platform.release()}".strip() or "unknown"
    from edge_agent.slots import running_firmware  # firmware A/B: one small read

    slot, firmware_version = running_firmware(data_dir) or (None, None)
    from edge_agent.supervisor.limits import cgroup_support  # a few reads under /sys/fs/cgroup

    support = cgroup_support()
    return Inventory(
        arch=arch[:SHORT],
        os=system[:SHORT],
        cpu_count=os.cpu_count() or 0,
        mem_total_bytes=total_mem,
        mem_free_bytes=free_mem,
        disk_total_bytes=disk_total,
        disk_free_bytes=disk_free,
        firmware_slot=slot,
        firmware_version=firmware_version,
        cgroups="v2" if support.available else support.reason[:256],
    )
