"""What signed desired documents cost: the hub's seal and the device's check, per document.

Baseline, measured in the same run on the same documents: the codec alone
(``protocols.encode`` on the hub, ``protocols.decode`` on the device), which
every document pays anyway. Figures are microseconds per document, medians of
``--repeats`` timed loops of ``--count`` documents each, for a small document
(a typical config) and one at the hub's size limit (200 KiB of config).

    python -m simulator.bench.signing --count 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from firmware_bundles.devfleet import DevFleet
from firmware_bundles.trust import TrustedRoot
from protocols import Desired, decode, encode
from protocols.signed import open_sealed, seal
from simulator.bench.common import command_line, host_info, median, ratio, write_results

SIZES = {"small": 256, "limit": 200 * 1024}


def document(size: int) -> Desired:
    config: dict[str, Any] = {"sample_rate_hz": 10, "threshold": 0.75, "pad": ""}
    base = len(encode(Desired(device_id="pump-17", generation=42, config=config, issued_at=1.0)))
    config["pad"] = "x" * max(0, size - base)
    return Desired(device_id="pump-17", generation=42, config=config, issued_at=1.0)


def per_item_us(work: Callable[[], object], count: int, repeats: int) -> float:
    """Median over ``repeats`` loops of ``count`` calls, in microseconds per call."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(count):
            work()
        samples.append((time.perf_counter() - start) / count * 1e6)
    return median(samples)


def measure(size: int, count: int, repeats: int, fleet: DevFleet) -> dict[str, float]:
    root = TrustedRoot.from_bytes(fleet.root_path.read_bytes())
    doc = document(size)
    raw = encode(doc)
    sealed = seal(raw, [fleet.hub_key])
    now = time.time()
    figures = {
        "bytes": float(len(raw)),
        "sealed_bytes": float(len(sealed)),
        "hub_encode_us": per_item_us(lambda: encode(doc), count, repeats),
        "hub_encode_seal_us": per_item_us(
            lambda: seal(encode(doc), [fleet.hub_key]), count, repeats
        ),
        "device_decode_us": per_item_us(lambda: decode(raw, Desired), count, repeats),
        "device_open_decode_us": per_item_us(
            lambda: decode(open_sealed(sealed, root, now=now, clock_skew_s=300), Desired),
            count,
            repeats,
        ),
    }
    figures["hub_ratio"] = ratio(figures["hub_encode_seal_us"], figures["hub_encode_us"])
    figures["device_ratio"] = ratio(figures["device_open_decode_us"], figures["device_decode_us"])
    return figures


def format_table(results: dict[str, dict[str, float]]) -> str:
    lines = [
        f"{'(µs per document)':<22}{'bytes':>9}{'encode':>9}{'+seal':>9}{'ratio':>7}"
        f"{'decode':>9}{'+verify':>9}{'ratio':>7}"
    ]
    for name, f in results.items():
        lines.append(
            f"{name:<22}{f['bytes']:>9.0f}{f['hub_encode_us']:>9.1f}"
            f"{f['hub_encode_seal_us']:>9.1f}{f['hub_ratio']:>6.1f}x"
            f"{f['device_decode_us']:>9.1f}{f['device_open_decode_us']:>9.1f}"
            f"{f['device_ratio']:>6.1f}x"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulator.bench.signing", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--count", type=int, default=2000, help="documents per timed loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeats < 1:
        print("signing: --count and --repeats must be at least 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="driftless-signing-") as work:
        fleet = DevFleet(Path(work) / "fleet")
        results = {
            f"{name} ({size} B)": measure(
                size, max(1, args.count // (size // 4096 + 1)), args.repeats, fleet
            )
            for name, size in SIZES.items()
        }
    print(format_table(results))
    path = args.json or Path("bench-results") / "signing.json"
    write_results(
        path,
        {
            "bench": "signing",
            "command": command_line("simulator.bench.signing", argv),
            "host": host_info(),
            "count": args.count,
            "repeats": args.repeats,
            "results": results,
        },
    )
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
