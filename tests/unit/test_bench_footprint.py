"""The footprint benchmark's pure parts: /proc figures and the import-time log."""

from __future__ import annotations

import os

from simulator.bench.footprint import imported_packages, memory_of

LOG = """\
{"event": "agent starting"}
import time: self [us] | cumulative | imported package
import time:       120 |        120 |   _io
import time:      2000 |      35000 | cryptography
import time:       500 |       4000 |   cryptography.hazmat.primitives
import time:      1000 |      12000 | paho.mqtt.client
not an import line | 1 | x
"""


def test_import_log_is_grouped_by_top_level_package() -> None:
    packages, count = imported_packages(LOG)
    assert count == 4  # the header and other lines are not imports
    assert packages == {"cryptography": 35.0, "paho": 12.0, "_io": 0.12}
    assert list(packages) == ["cryptography", "paho", "_io"]  # slowest first


def test_memory_of_this_process_is_consistent() -> None:
    memory = memory_of(os.getpid())
    assert 0 < memory.uss_mib <= memory.pss_mib <= memory.rss_mib


def test_config_refuses_what_cannot_be_measured() -> None:
    import pytest

    from simulator.bench.footprint import FootprintConfig

    for bad in ({"agents": 0}, {"idle_s": 0}, {"bundle_mib": -1}):
        with pytest.raises(ValueError, match="bundle_mib >= 0"):
            FootprintConfig(**bad)  # type: ignore[arg-type]


def test_the_apply_figures_are_summarised_with_their_medians() -> None:
    from simulator.bench.footprint_apply import ApplyResult, proc_status_mib

    result = ApplyResult(apply_s=3.21, workload_start_s=[0.5, 0.7, 0.6], install_s=0.0)
    figures = result.as_dict()
    assert figures["median_workload_start_s"] == 0.6
    assert figures["apply_s"] == 3.21 and figures["min_healthy_ms"] == 1000
    assert proc_status_mib(os.getpid(), "VmHWM") >= proc_status_mib(os.getpid(), "VmRSS") > 0
