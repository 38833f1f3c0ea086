"""The trust anchor is verified once per content: a remembered digest spares ``cryptography``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.root import RootFileError, load_trusted_root, marker_path, remember_verified
from firmware_bundles.devfleet import DevFleet


@pytest.fixture
def fleet(tmp_path: Path) -> DevFleet:
    return DevFleet(tmp_path / "fleet")


def _data_dir(tmp_path: Path, fleet: DevFleet) -> Path:
    """A data directory as enrollment leaves it (the parts the root rule looks at)."""
    data_dir = tmp_path / "agent"
    (data_dir / "identity").mkdir(parents=True)
    (data_dir / "identity" / "enrollment.json").write_text(json.dumps({"device_id": "d-1"}))
    (data_dir / "root.json").write_bytes(fleet.root_path.read_bytes())
    return data_dir


def test_a_root_verified_before_loads_as_the_same_root(tmp_path: Path, fleet: DevFleet) -> None:
    root = _data_dir(tmp_path, fleet) / "root.json"
    first = load_trusted_root(root)  # verified in full, then remembered
    assert marker_path(root).read_text().startswith("sha256:")
    again = load_trusted_root(root)  # parsed only
    assert (again.version, again.envelope, again.root) == (
        first.version,
        first.envelope,
        first.root,
    )


def test_a_changed_root_is_verified_again_and_a_broken_one_refused(
    tmp_path: Path, fleet: DevFleet
) -> None:
    root = _data_dir(tmp_path, fleet) / "root.json"
    load_trusted_root(root)
    data = root.read_bytes()
    sig = json.loads(data)["signatures"][0]["sig"]
    root.write_bytes(data.replace(sig.encode(), b"00" * 64))  # same bytes but a broken signature
    with pytest.raises(RootFileError, match="ThresholdNotMetError"):
        load_trusted_root(root)


def test_a_marker_for_other_bytes_does_not_vouch(tmp_path: Path, fleet: DevFleet) -> None:
    root = _data_dir(tmp_path, fleet) / "root.json"
    remember_verified(root, b"some other root")
    data = root.read_bytes()
    sig = json.loads(data)["signatures"][0]["sig"]
    root.write_bytes(data.replace(sig.encode(), b"00" * 64))
    with pytest.raises(RootFileError, match="ThresholdNotMetError"):
        load_trusted_root(root)


def test_no_marker_is_left_beside_a_root_outside_a_data_dir(fleet: DevFleet) -> None:
    load_trusted_root(fleet.root_path)  # --root pointing into an operator's fleet directory
    assert not marker_path(fleet.root_path).exists()


def test_a_marker_the_agent_cannot_write_only_costs_a_full_check(
    tmp_path: Path, fleet: DevFleet
) -> None:
    data_dir = _data_dir(tmp_path, fleet)
    marker_path(data_dir / "root.json").mkdir()  # unwritable as a file
    assert load_trusted_root(data_dir / "root.json").version == 1
