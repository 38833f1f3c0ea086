"""The report script on results built by the benchmarks' own result types (so the schemas agree)."""

from __future__ import annotations

import json
from pathlib import Path

from simulator.bench import api_latency, converge, ingest, report, storm


def write(path: Path, document: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**document, "recorded_at": "2026-11-29 12:00"}))


def ingest_doc(mode: ingest.Mode, hub_rate: float) -> dict[str, object]:
    result = ingest.IngestResult(
        config=ingest.IngestConfig(mode=mode, repeats=2), payload_bytes=181
    )
    for index in (1, 2):
        for kind, rate in (("broker", 8000), ("bare", 4000), ("hub", hub_rate),
                           ("bare_x2", 6000), ("hub_x2", hub_rate * 1.5)):  # fmt: skip
            seconds = 50_000 / rate
            result.rounds.append(
                ingest.Measurement(kind, index, 50_000, seconds, 9000.0, seconds / 2, 0.5)
            )
    return result.as_json(f"python -m simulator.bench.ingest --mode {mode}")


def api_doc() -> dict[str, object]:
    result = api_latency.ApiResult(config=api_latency.ApiConfig(repeats=1))
    for phase, ms in (("idle", 4.0), ("steady", 9.0), ("saturated", 61.0)):
        lat = api_latency.Latencies(n=500, p50_ms=ms / 2, p99_ms=ms, max_ms=ms * 2)
        result.runs.append(
            api_latency.PhaseRun(phase, 1, {"list": lat, "get": lat}, 5.0, 100.0, True, 1.0)
        )
    return result.as_json("python -m simulator.bench.api_latency")


def storm_doc() -> dict[str, object]:
    result = storm.StormResult(config=storm.StormConfig(repeats=1), payload_bytes=256)
    result.storms.append(
        storm.Storm(
            index=1,
            echo_s=1.5,
            bare_s=4.0,
            bare_connected_s=3.5,
            bare_received=5000,
            bare_wills_after_cut_s=1.0,
            bare_published_before_return_s=3.0,
            bare_clients_cpu_s=6.0,
            bare_broker_cpu_s=1.5,
            bare_connect_failures=0,
            storm_s=12.0,
            connected_s=9.0,
            online_s=10.0,
            all_offline_after_cut_s=0.4,
            put_before_return_s=3.0,
            hub_cpu_s=20.0,
            workers_cpu_s=30.0,
            broker_cpu_s=4.0,
            hub_received_per_device=4.0,
            hub_published_per_device=2.0,
            device_in_per_device=3.0,
            device_out_per_device=3.0,
            connect_failures=0,
        )
    )
    return result.as_json("python -m simulator.bench.storm")


def old_storm_doc() -> dict[str, object]:
    """A storm result as written before the bare reconnect baseline (one baseline: the echo)."""
    row = {
        "index": 1,
        "baseline_s": 5.27,
        "storm_s": 28.98,
        "connected_s": 27.79,
        "online_s": 27.93,
        "all_offline_after_cut_s": 2.9,
        "put_before_return_s": 2.44,
        "hub_cpu_s": 18.9,
        "hub_received_per_device": 4.0,
        "hub_published_per_device": 2.0,
        "device_in_per_device": 3.0,
        "device_out_per_device": 3.0,
        "connect_failures": 0,
    }
    return {
        "benchmark": "storm",
        "command": "python -m simulator.bench.storm --devices 5000 --repeats 1",
        "devices": 5000,
        "workers": 2,
        "repeats": 1,
        "payload_bytes": 256,
        "config": {"offline_s": 6.0, "reconnect_window_s": 1.0},
        "storms": [row],
        "median": {k: v for k, v in row.items() if k != "index"},
        "ratio_storm_over_baseline": 5.5,
    }


def converge_doc(devices: int) -> dict[str, object]:
    result = converge.BenchResult(
        config=converge.BenchConfig(devices=devices, repeats=1), payload_bytes=257
    )
    result.rounds.append(converge.Round(1, 2.0, 2.6, 0.5, 1.5, 2.2))
    return result.as_json(f"python -m simulator.bench.converge --devices {devices}")


def test_report_fills_the_generated_part_and_keeps_the_rest(tmp_path: Path) -> None:
    results = tmp_path / "bench-results"
    write(results / "ingest-live.json", ingest_doc("live", 3000))
    write(results / "ingest-drain.json", ingest_doc("drain", 3200))
    write(results / "before" / "ingest-live.json", ingest_doc("live", 1500))
    write(results / "api-10000.json", api_doc())
    write(results / "storm-5000.json", storm_doc())
    write(results / "converge-5000.json", converge_doc(5000))
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\nHand-written text stays.\n")
    argv = ["--results", str(results), "--doc", str(doc), "--img-dir", str(tmp_path / "docs/img")]

    assert report.main(argv) == 0
    first = doc.read_text()
    assert first.startswith("# Benchmarks\n\nHand-written text stays.\n")
    assert first.count(report.BEGIN) == 1 and first.count(report.END) == 1
    assert ".venv/bin/python -m simulator.bench.ingest --mode live" in first
    assert "| ingest ≥ 0.7x bare subscriber (live) | 0.75x | **met** |" in first
    api_goal = "| API p99 < 50 ms while busy (one hub process) | 61.0 ms (worst) | **not met** |"
    assert api_goal in first
    assert "| reconnect storm within 2x of bare reconnects | 3.00x | **not met** |" in first
    assert "**Ratio storm / bare reconnect (medians): 3.00x**; storm / bare echo: 8.00x." in first
    assert "| **bare reconnect**: every client has its message | 4.00 | 4.00 |" in first
    assert "| baseline: bare MQTT publish/echo | 1.50 | 1.50 |" in first
    assert "| CPU s, storm: the devices' workers | 30.0 | 30.0 |" in first
    assert "| convergence at 5,000 within 1.5x of baseline | 1.30x | **met** |" in first
    assert "before: reports/s" in first and "2026-11-29 12:00" in first
    for name in ("ingest", "api", "storm", "converge"):
        png = tmp_path / "docs" / "img" / f"bench-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](img/bench-{name}.png)" in first

    doc.write_text(first + "\nA note after the generated part.\n")
    assert report.main([*argv, "--no-plots"]) == 0
    second = doc.read_text()
    assert second.count(report.BEGIN) == 1
    assert second.endswith("\nA note after the generated part.\n")
    assert "Hand-written text stays." in second


def test_a_benchmark_without_results_is_left_out(tmp_path: Path) -> None:
    results = tmp_path / "bench-results"
    write(results / "api-10000.json", api_doc())
    text = report.render(report.load(results), images=[])
    assert "API latency" in text
    assert "Reconnect storm" not in text and "Hub ingest" not in text


def test_a_storm_result_from_before_the_bare_reconnect_baseline_still_renders(
    tmp_path: Path,
) -> None:
    results = tmp_path / "bench-results"
    write(results / "storm-5000.json", old_storm_doc())
    text = report.render(report.load(results), images=[])
    assert "| reconnect storm within 2x of baseline (bare echo) | 5.50x | **not met** |" in text
    assert "| baseline: bare MQTT publish/echo | 5.27 | 5.27 |" in text
    assert "bare reconnect" not in text and "CPU s, storm: broker" not in text
    assert "**Ratio storm / bare echo (medians): 5.50x.**" in text


def test_no_results_writes_nothing(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n")
    argv = ["--results", str(tmp_path / "none"), "--doc", str(doc), "--no-plots"]
    assert report.main(argv) == 1
    assert doc.read_text() == "# Benchmarks\n"
