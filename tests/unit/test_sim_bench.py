"""The convergence benchmark's pure parts: document sizing, medians, ratio, table, polling."""

from __future__ import annotations

import json
import math

import pytest

from protocols import Desired, encode
from simulator.bench.converge import (
    DOCUMENT_BYTES,
    BenchConfig,
    BenchError,
    BenchResult,
    Round,
    bench_config,
    format_table,
    parse_args,
    poll,
)


def result(*pairs: tuple[float, float]) -> BenchResult:
    out = BenchResult(config=BenchConfig(devices=10, repeats=len(pairs)), payload_bytes=256)
    for i, (baseline, ours) in enumerate(pairs, start=1):
        out.rounds.append(Round(i, baseline, ours, ours / 10, ours / 2, ours / 1.5))
    return out


@pytest.mark.parametrize("round_no", [1, 12, 12345])
@pytest.mark.parametrize("device_id", ["sim-00000", "sim-123456"])
def test_documents_are_padded_to_the_target_size(round_no: int, device_id: str) -> None:
    config = bench_config(round_no, device_id)
    size = len(encode(Desired(device_id=device_id, generation=999, config=config, issued_at=1.8e9)))
    assert abs(size - DOCUMENT_BYTES) <= 12
    assert config["round"] == round_no


def test_medians_and_ratio() -> None:
    r = result((1.0, 3.0), (2.0, 5.0), (9.0, 4.0))
    assert r.medians()["baseline_s"] == 2.0
    assert r.medians()["ours_s"] == 4.0
    assert r.ratio() == 2.0


def test_ratio_with_a_zero_baseline_is_infinite_not_a_crash() -> None:
    assert math.isinf(result((0.0, 1.0)).ratio())


def test_table_shows_every_run_the_median_and_the_ratio() -> None:
    table = format_table(result((1.0, 3.0), (2.0, 5.0), (9.0, 4.0)))
    assert "run 3" in table and "median" in table
    baseline_row = next(line for line in table.splitlines() if line.startswith("baseline"))
    assert baseline_row.split()[-4:] == ["1.000", "2.000", "9.000", "2.000"]
    assert table.splitlines()[-1] == "ratio ours/baseline (median): 2.00x"


def test_json_is_serialisable_and_carries_the_command() -> None:
    doc = json.loads(json.dumps(result((1.0, 2.0)).as_json("python -m x --devices 10")))
    assert doc["command"] == "python -m x --devices 10"
    assert doc["median"]["ours_s"] == 2.0 and doc["ratio_ours_over_baseline"] == 2.0
    assert doc["rounds"][0]["baseline_s"] == 1.0


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"devices": 0}, id="no-devices"),
        pytest.param({"devices": 5, "repeats": 0}, id="no-repeats"),
        pytest.param({"devices": 5, "deadline_s": 0}, id="no-deadline"),
    ],
)
def test_config_refuses_unbounded_or_empty_runs(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BenchConfig(**kwargs)  # type: ignore[arg-type]


def test_defaults_match_the_documented_command() -> None:
    args = parse_args(["--devices", "1000"])
    assert (args.devices, args.repeats, args.deadline_s, args.poll_interval_s) == (
        1000,
        3,
        120.0,
        0.02,
    )


async def test_poll_returns_the_first_value_that_is_done() -> None:
    values = iter(range(100))

    async def fetch() -> int:
        return next(values)

    assert await poll(fetch, lambda v: v >= 3, timeout_s=5, interval_s=0.001, what="3") == 3


async def test_poll_gives_up_at_the_deadline_with_the_last_value() -> None:
    async def fetch() -> dict[str, int]:
        return {"in_sync": 1}

    with pytest.raises(BenchError, match=r"in sync.*'in_sync': 1"):
        await poll(fetch, lambda v: False, timeout_s=0.05, interval_s=0.01, what="in sync")
