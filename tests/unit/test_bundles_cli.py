"""The operator's commands, run in-process through ``main(argv)`` on real files and keys."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from firmware_bundles import archive
from firmware_bundles.cli import main
from firmware_bundles.keydir import ROOT_FILE, versioned_root_file
from firmware_bundles.trust import TrustedRoot

PASS_ENV = "TEST_BUNDLES_PASSPHRASE"


class Operator:
    """A key directory, a release key and an app source tree in one tmp_path."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.fleet = root / "fleet"
        self.release_key = root / "release.pem"
        self.src = root / "src"
        self.bundle = root / "thermostat.bundle"
        self.capsys = capsys
        (self.src / "bin").mkdir(parents=True)
        (self.src / "bin" / "thermostat").write_text("#!/bin/sh\nexec sleep 1000\n")

    def run(self, *argv: str | Path) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = main([str(arg) for arg in argv])
        out, err = self.capsys.readouterr()
        return status, out, err

    def ok(self, *argv: str | Path) -> str:
        status, out, err = self.run(*argv)
        assert (status, err) == (0, ""), err
        return out

    def setup(self) -> None:
        self.ok("keys", "init-root", "--dir", self.fleet)
        self.ok("keys", "add", "--dir", self.fleet, "--role", "release", "--out", self.release_key)
        self.ok(
            "bundle", "build", self.src, "--name", "thermostat", "--version", "1.4.2",
            "--command", "bin/thermostat --port 8081", "--out", self.bundle,
        )  # fmt: skip
        self.ok("bundle", "sign", self.bundle, "--key", self.release_key)


@pytest.fixture
def op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Operator:
    return Operator(tmp_path, capsys)


def assert_one_line_failure(result: tuple[int, str, str], status: int, kind: str) -> str:
    code, out, err = result
    assert code == status
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith(f"error: {kind}: "), err
    return err


def test_init_add_build_sign_verify_succeeds(op: Operator) -> None:
    op.setup()
    out = op.ok("bundle", "verify", op.bundle, "--root", op.fleet / ROOT_FILE)
    assert out.startswith("ok: thermostat 1.4.2 (app, security version 0")


def test_verify_of_a_tampered_bundle_fails_with_one_line(op: Operator) -> None:
    op.setup()
    data = bytearray(op.bundle.read_bytes())
    data[-50] ^= 0xFF
    op.bundle.write_bytes(bytes(data))
    result = op.run("bundle", "verify", op.bundle, "--root", op.fleet / ROOT_FILE)
    assert_one_line_failure(result, 1, "HashMismatchError")


def test_verify_against_another_fleets_root_fails(op: Operator, tmp_path: Path) -> None:
    op.setup()
    op.ok("keys", "init-root", "--dir", tmp_path / "other")
    result = op.run("bundle", "verify", op.bundle, "--root", tmp_path / "other" / ROOT_FILE)
    assert_one_line_failure(result, 1, "ThresholdNotMetError")


def test_verify_with_a_missing_root_file_is_a_local_error(op: Operator) -> None:
    op.setup()
    result = op.run("bundle", "verify", op.bundle, "--root", op.fleet / "absent.json")
    assert_one_line_failure(result, 3, "LocalError")


def test_key_files_written_by_the_cli_are_mode_0600(op: Operator) -> None:
    op.setup()
    key_files = [op.release_key, *(op.fleet / "keys").glob("*.pem")]
    assert len(key_files) == 2
    for path in key_files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((op.fleet / "keys").stat().st_mode) == 0o700


def test_sign_with_the_wrong_passphrase_fails_with_one_line(
    op: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASS_ENV, "correct horse")
    op.ok("keys", "init-root", "--dir", op.fleet)
    op.ok(
        "keys", "add", "--dir", op.fleet, "--role", "release", "--out", op.release_key,
        "--passphrase-env", PASS_ENV,
    )  # fmt: skip
    op.ok("bundle", "build", op.src, "--name", "t", "--version", "1", "--command", "x",
          "--out", op.bundle)  # fmt: skip
    before = op.bundle.read_bytes()
    monkeypatch.setenv(PASS_ENV, "battery staple")
    result = op.run("bundle", "sign", op.bundle, "--key", op.release_key, "--passphrase-env",
                    PASS_ENV)  # fmt: skip
    assert_one_line_failure(result, 3, "PassphraseError")
    assert op.bundle.read_bytes() == before
    monkeypatch.setenv(PASS_ENV, "correct horse")
    op.ok("bundle", "sign", op.bundle, "--key", op.release_key, "--passphrase-env", PASS_ENV)


def test_unset_passphrase_variable_is_a_local_error(op: Operator) -> None:
    result = op.run("keys", "init-root", "--dir", op.fleet, "--passphrase-env", "NO_SUCH_VAR_X")
    assert_one_line_failure(result, 3, "LocalError")
    assert not (op.fleet / ROOT_FILE).exists()


def test_inspect_prints_unverified_json(op: Operator) -> None:
    op.setup()
    document = json.loads(op.ok("bundle", "inspect", op.bundle))
    assert document["verified"] is False
    assert document["manifest"]["name"] == "thermostat"
    assert document["manifest"]["run"]["command"] == ["bin/thermostat", "--port", "8081"]
    assert len(document["signatures"]) == 1
    assert document["payload_offset"] + document["payload_bytes"] == op.bundle.stat().st_size


def test_init_root_refuses_to_replace_an_existing_root(op: Operator) -> None:
    op.ok("keys", "init-root", "--dir", op.fleet)
    before = (op.fleet / ROOT_FILE).read_bytes()
    result = op.run("keys", "init-root", "--dir", op.fleet)
    assert_one_line_failure(result, 3, "LocalError")
    assert (op.fleet / ROOT_FILE).read_bytes() == before


def test_threshold_above_key_count_is_refused(op: Operator) -> None:
    result = op.run("keys", "init-root", "--dir", op.fleet, "--threshold", "3", "--keys", "2")
    assert_one_line_failure(result, 3, "InvalidArgument")


def test_app_bundle_without_a_command_is_refused(op: Operator) -> None:
    result = op.run("bundle", "build", op.src, "--name", "t", "--version", "1", "--out", op.bundle)
    assert_one_line_failure(result, 3, "InvalidArgument")
    assert not op.bundle.exists()


def test_firmware_bundle_without_an_architecture_is_refused(op: Operator) -> None:
    result = op.run("bundle", "build", op.src, "--name", "fw", "--version", "1", "--kind",
                    "firmware", "--out", op.bundle)  # fmt: skip
    assert_one_line_failure(result, 3, "InvalidArgument")


def test_bad_usage_exits_2(op: Operator) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bundle", "verify", str(op.bundle)])  # --root is required
    assert exited.value.code == 2


def test_rotate_root_keeps_bundles_valid_and_chains_from_version_1(
    op: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASS_ENV, "root secret")
    op.ok("keys", "init-root", "--dir", op.fleet, "--threshold", "2", "--keys", "3",
          "--passphrase-env", PASS_ENV)  # fmt: skip
    op.ok("keys", "add", "--dir", op.fleet, "--role", "release", "--out", op.release_key,
          "--root-passphrase-env", PASS_ENV)  # fmt: skip
    op.ok("bundle", "build", op.src, "--name", "t", "--version", "1", "--command", "x",
          "--out", op.bundle)  # fmt: skip
    op.ok("bundle", "sign", op.bundle, "--key", op.release_key)
    op.ok("keys", "rotate-root", "--dir", op.fleet, "--root-passphrase-env", PASS_ENV)
    op.ok("keys", "add", "--dir", op.fleet, "--role", "hub", "--out", op.fleet.parent / "hub.pem",
          "--root-passphrase-env", PASS_ENV)  # fmt: skip

    # A device provisioned with version 1 walks every published version to the newest.
    device = TrustedRoot.from_bytes((op.fleet / versioned_root_file(1)).read_bytes())
    chain = [(op.fleet / versioned_root_file(v)).read_bytes() for v in (2, 3, 4)]
    device.update_chain(chain, time.time())
    assert device.envelope == (op.fleet / ROOT_FILE).read_bytes()
    assert set(device.root.roles) == {"root", "release", "hub"}
    assert archive.verify(op.bundle, device, time.time()).name == "t"
    out = op.ok("bundle", "verify", op.bundle, "--root", op.fleet / ROOT_FILE)
    assert "root version 4" in out


def test_keys_add_without_enough_root_keys_fails_and_leaves_no_key(
    op: Operator, monkeypatch: pytest.MonkeyPatch
) -> None:
    op.ok("keys", "init-root", "--dir", op.fleet, "--threshold", "2", "--keys", "2")
    next(iter((op.fleet / "keys").glob("*.pem"))).unlink()  # one root key went offline
    result = op.run("keys", "add", "--dir", op.fleet, "--role", "release", "--out",
                    op.release_key)  # fmt: skip
    assert_one_line_failure(result, 3, "KeyFileError")
    assert not op.release_key.exists()
    assert not (op.fleet / versioned_root_file(2)).exists()


# ---------------------------------------------------------------- bundle build --run FILE

WEB_RUN: dict[str, object] = {
    "command": ["bin/thermostat", "--port", "8081"],
    "env": {"MODE": "eco"},
    "checks": [
        {"type": "alive", "for_ms": 500},
        {"type": "http", "port": 8081, "path": "/health", "interval_ms": 500},
        {"type": "command", "command": ["bin/thermostat", "--check"]},
    ],
    "min_healthy_ms": 1000,
    "health_deadline_s": 5,
    "backoff": {"attempts": 2, "delay_ms": 200, "max_delay_ms": 400, "jitter_pct": 0},
    "stop_signal": "SIGINT",
    "stop_timeout_s": 3,
    "reload_signal": "SIGHUP",
    "limits": {"memory_bytes": 268435456, "open_files": 256},
    "logs": {"max_bytes": 65536, "keep": 2},
    "update": "start-then-stop",
    "handover_timeout_s": 10,
}


def write_run(op: Operator, run: object, name: str = "run.json") -> Path:
    path = op.src.parent / name
    path.write_text(json.dumps(run) if not isinstance(run, str) else run)
    return path


def build_with_run(op: Operator, run_file: Path, *extra: str) -> tuple[int, str, str]:
    return op.run(
        "bundle", "build", op.src, "--name", "thermostat", "--version", "2.0",
        "--run", run_file, "--out", op.bundle, *extra,
    )  # fmt: skip


def test_build_with_a_run_file_signs_every_field_as_written(op: Operator) -> None:
    (op.src / "bin" / "thermostat").chmod(0o755)
    op.ok("keys", "init-root", "--dir", op.fleet)
    op.ok("keys", "add", "--dir", op.fleet, "--role", "release", "--out", op.release_key)
    assert build_with_run(op, write_run(op, WEB_RUN))[0] == 0
    op.ok("bundle", "sign", op.bundle, "--key", op.release_key)
    manifest = archive.verify(op.bundle, TrustedRoot.from_bytes(
        (op.fleet / ROOT_FILE).read_bytes()), time.time())  # fmt: skip
    run = manifest.run
    assert run is not None
    assert run.command == ["bin/thermostat", "--port", "8081"] and run.update == "start-then-stop"
    assert [c.__struct_config__.tag for c in run.checks] == ["alive", "http", "command"]
    assert (run.min_healthy_ms, run.health_deadline_s, run.stop_signal) == (1000, 5, "SIGINT")
    assert (run.backoff.attempts, run.limits.open_files, run.logs.keep) == (2, 256, 2)
    shown = json.loads(op.ok("bundle", "inspect", op.bundle))["manifest"]["run"]
    assert {k: shown[k] for k in WEB_RUN if k not in ("checks", "backoff", "limits", "logs")} == {
        k: v for k, v in WEB_RUN.items() if k not in ("checks", "backoff", "limits", "logs")
    }


def test_the_run_file_may_come_on_stdin(op: Operator, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Stdin:
        buffer = io.BytesIO(json.dumps({"command": ["sleep", "1000"]}).encode())

    monkeypatch.setattr("sys.stdin", Stdin)
    assert build_with_run(op, Path("-"))[0] == 0
    assert json.loads(op.ok("bundle", "inspect", op.bundle))["manifest"]["run"]["command"] == [
        "sleep", "1000"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("run", "says"),
    [
        pytest.param({"cmd": ["x"]}, "unknown field `cmd`", id="unknown-field"),
        pytest.param({"env": {}}, "missing required field `command`", id="no-command"),
        pytest.param({"command": []}, "`run.command`", id="empty-command"),
        pytest.param(
            {"command": ["x"], "health_deadline_s": 2.5}, "`run.health_deadline_s`", id="fraction"
        ),
        pytest.param(
            {"command": ["x"], "checks": [{"type": "http", "port": 70000}]},
            "`run.checks[0].port`",
            id="port-out-of-range",
        ),
        pytest.param(
            {"command": ["x"], "checks": [{"type": "tcp", "port": 80}]},
            "Invalid value 'tcp'",
            id="unknown-check-type",
        ),
        pytest.param(
            {"command": ["x"], "update": "blue-green"}, "`run.update`", id="unknown-strategy"
        ),
        pytest.param(
            {"command": ["x"], "backoff": {"delay_ms": 500, "max_delay_ms": 100}},
            "max_delay_ms must be >= delay_ms",
            id="backoff-upside-down",
        ),
        pytest.param(
            {"command": ["x"], "limits": {"memory_bytes": 0}},
            "`run.limits.memory_bytes`",
            id="zero-limit",
        ),
        pytest.param(
            {"command": ["x"], "min_healthy_ms": 10000, "health_deadline_s": 5},
            "could never turn healthy in time",
            id="min-healthy-past-deadline",
        ),
        pytest.param(
            {
                "command": ["x"],
                "health_deadline_s": 1,
                "min_healthy_ms": 0,
                "checks": [{"type": "alive", "for_ms": 2000}],
            },
            "run.checks[0].for_ms 2000",
            id="alive-past-deadline",
        ),
        pytest.param(
            {"command": ["x"], "env": {"DRIFTLESS_CONFIG": "/etc/x"}},
            "run.env.DRIFTLESS_CONFIG: DRIFTLESS_* names are reserved",
            id="reserved-env",
        ),
        pytest.param({"command": ["bin/absent"]}, "'bin/absent' is not a file", id="no-program"),
        pytest.param(
            {"command": ["bin/thermostat"]}, "is not executable (chmod +x it)", id="not-executable"
        ),
        pytest.param(
            {"command": ["x"], "working_dir": "srv"},
            "run.working_dir 'srv' is not a directory",
            id="no-working-dir",
        ),
        pytest.param('{"command": ["x"], "command": ["y"]}', "'command' appears twice", id="twice"),
        pytest.param('["x"]', "must hold one JSON object, not list", id="not-an-object"),
        pytest.param('{"command": ["x"],}', "not valid JSON", id="bad-json"),
    ],
)
def test_a_bad_run_file_is_refused_naming_the_field(op: Operator, run: object, says: str) -> None:
    err = assert_one_line_failure(build_with_run(op, write_run(op, run)), 3, "InvalidArgument")
    assert says in err, err
    assert "run.json" in err
    assert not op.bundle.exists()


def test_run_file_and_run_flags_are_exclusive(op: Operator) -> None:
    run_file = write_run(op, {"command": ["x"]})
    result = build_with_run(op, run_file, "--command", "y", "--restart", "never")
    err = assert_one_line_failure(result, 3, "InvalidArgument")
    assert "--run FILE replaces --command, --restart" in err
    assert not op.bundle.exists()


def test_run_flags_without_a_command_are_refused(op: Operator) -> None:
    result = op.run("bundle", "build", op.src, "--name", "t", "--version", "1", "--env", "A=1",
                    "--out", op.bundle)  # fmt: skip
    assert "--env given without --command" in assert_one_line_failure(result, 3, "InvalidArgument")


def test_a_missing_run_file_is_a_local_error(op: Operator) -> None:
    result = build_with_run(op, op.src.parent / "absent.json")
    assert "cannot read run file" in assert_one_line_failure(result, 3, "LocalError")


# ---------------------------------------------------------------- the documented fields


def doc_table(text: str, header: str) -> list[str]:
    """The first column (backticks dropped) of the table whose header row is ``header``."""
    lines = text[text.index(header) :].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append(line.strip("|").split("|")[0].strip().strip("`"))
    return rows


def test_the_docs_list_every_run_field_and_entry_member() -> None:
    """``--run`` takes what docs/bundles.md documents; both docs list the entry's members."""
    import msgspec

    from edge_agent.supervisor.spec import ENTRY_FIELDS
    from firmware_bundles.model import AliveCheck, CommandCheck, HttpCheck, RunSpec

    docs = Path(__file__).resolve().parents[2] / "docs"
    bundles, protocol = (docs / "bundles.md").read_text(), (docs / "protocol.md").read_text()
    run_section = bundles[bundles.index("### The run specification") :]
    fields = [f.encode_name for f in msgspec.structs.fields(RunSpec)]
    assert doc_table(run_section, "| field | type | default | rule |") == fields
    checks = doc_table(run_section, "| `type` | fields | passes |")
    assert checks == [c.__struct_config__.tag for c in (AliveCheck, HttpCheck, CommandCheck)]
    for check in (AliveCheck, HttpCheck, CommandCheck):
        table = run_section[run_section.index("| `type` | fields | passes |") :]
        row = table.split(f"| `{check.__struct_config__.tag}` |", 1)[1].split("\n", 1)[0]
        for name in (f.encode_name for f in msgspec.structs.fields(check)):
            assert f"`{name}`" in row, (check.__name__, name)
    example = run_section.split("```json\n", 1)[1].split("```", 1)[0]
    assert msgspec.json.decode(example.encode(), type=RunSpec).update == "start-then-stop"
    demo_run = Path(__file__).resolve().parents[2] / "devtools" / "demo_web" / "run-1.0.json"
    assert json.loads(example) == json.loads(demo_run.read_text())
    for text in (bundles, protocol):
        assert set(doc_table(text, "| member | type | default | rule |")) == ENTRY_FIELDS
