"""``driftless sim``: arguments, profile printing, and clear refusals before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driftless.cli import build_parser, main
from simulator.profiles import BUILTIN, load_profile_file


def test_run_arguments_and_their_defaults() -> None:
    args = build_parser().parse_args(["sim", "run", "--devices", "5"])
    assert (args.devices, args.profile, args.seed, args.prefix) == (5, "stable", 0, "sim")
    assert args.respawn is True and args.duration_s is None and args.change_every_s is None
    assert args.workers >= 1
    args = build_parser().parse_args(["sim", "run", "--devices", "5", "--no-respawn"])
    assert args.respawn is False


def test_profile_prints_a_builtin_as_a_loadable_template(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["sim", "profile", "storm"]) == 0
    template = tmp_path / "mine.json"
    template.write_text(capsys.readouterr().out)
    assert load_profile_file(template) == BUILTIN["storm"]
    assert json.loads(template.read_text())["storm"]["reconnect_window_s"] == 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        pytest.param(["--profile", "hurricane"], "unknown profile 'hurricane'", id="profile"),
        pytest.param(["--broker", "http://x"], "must start with mqtt://", id="broker-url"),
        pytest.param(["--devices", "0"], "--devices must be at least 1", id="no-devices"),
        pytest.param(["--prefix", "a/b"], "device id", id="bad-prefix"),
        pytest.param(["--hub", "http://127.0.0.1:1"], "POST /devices/batch", id="no-hub"),
    ],
)
def test_bad_runs_are_refused_with_status_2_and_a_reason(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], message: str
) -> None:
    argv = ["sim", "run", "--devices", "3", "--state-dir", str(tmp_path / "state"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_bad_profile_file_is_refused_naming_the_field(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\n[storm]\noffline_s = "long"\n')
    assert main(["sim", "run", "--devices", "3", "--profile", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "$.storm.offline_s" in err


def test_two_runs_cannot_share_a_state_directory(tmp_path: Path) -> None:
    from simulator.runner import RunError, state_lock

    with (
        state_lock(tmp_path),
        pytest.raises(RunError, match="another driftless sim run"),
        state_lock(tmp_path),
    ):
        pass
    with state_lock(tmp_path):  # released afterwards
        pass


def test_token_defaults_to_the_environment_and_stays_out_of_reprs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simulator.runner import RunConfig

    monkeypatch.delenv("DRIFTLESS_TOKEN", raising=False)
    assert build_parser().parse_args(["sim", "run", "--devices", "5"]).token is None
    monkeypatch.setenv("DRIFTLESS_TOKEN", "from-env")
    assert build_parser().parse_args(["sim", "run", "--devices", "5"]).token == "from-env"
    args = build_parser().parse_args(["sim", "run", "--devices", "5", "--token", "given"])
    assert args.token == "given"
    cfg = RunConfig(
        devices=1, broker_url="mqtt://h:1", hub_url="http://hub", profile=BUILTIN["stable"]
    )
    assert cfg.api_headers == {}
    cfg = RunConfig(
        devices=1,
        broker_url="mqtt://h:1",
        hub_url="http://hub",
        profile=BUILTIN["stable"],
        token="s3cret",
    )
    assert cfg.api_headers == {"Authorization": "Bearer s3cret"}
    assert "s3cret" not in repr(cfg)


def test_root_is_a_path_and_off_by_default() -> None:
    assert build_parser().parse_args(["sim", "run", "--devices", "5"]).root is None
    args = build_parser().parse_args(["sim", "run", "--devices", "5", "--root", "fleet/root.json"])
    assert args.root == Path("fleet/root.json")


@pytest.mark.parametrize(
    "content, message",
    [
        pytest.param(None, "cannot read the trusted root", id="missing"),
        pytest.param(b"{not json", "is not usable", id="not-a-root"),
    ],
)
def test_an_unusable_root_is_refused_with_status_2_before_anything_starts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes | None, message: str
) -> None:
    root = tmp_path / "root.json"
    if content is not None:
        root.write_bytes(content)
    argv = [
        *("sim", "run", "--devices", "3", "--state-dir", str(tmp_path / "state")),
        *("--hub", "http://127.0.0.1:1", "--root", str(root)),  # no hub: refused before it
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "POST /devices/batch" not in err
