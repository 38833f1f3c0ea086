"""Update locks with leases (issue 13, item 4): the rules, the files, the gate, the CLI,
and the hub's override, which the core honours only from a verified document.

Files are real (tmp_path); both clocks are inputs where the rule is about time.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.core import (
    AgentCore,
    AgentState,
    Booted,
    Connected,
    Connecting,
    DesiredPayload,
    Ignored,
    LocksChanged,
    OverrideLocks,
    Publish,
    Rejected,
    Subscribed,
)
from edge_agent.supervisor import lockfiles, locks
from edge_agent.supervisor.lockfiles import FileLockGate, LockConflict, LockWatcher
from edge_agent.supervisor.locks import (
    Lease,
    LockFileError,
    LockOverride,
    LockOverrideError,
    LockRequest,
    blocking,
    lease_end,
    parse_lock,
    parse_override,
    switch_wait_s,
)
from protocols import Desired, LockStatus, Reported, decode, encode
from protocols.signed import seal
from tests.unit.test_bundles_support import NOW, Fleet

T0 = 1_800_000_000.0


class Clock:
    """Wall and monotonic readings the test moves (a wall step moves only the wall)."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 100.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def write_lock(directory: Path, workload: str, holder: str, lease_s: float, at: float) -> Path:
    """A lock file as a workload writes it (rename), with its mtime at ``at``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{workload}.lock"
    tmp = directory / f".{workload}.lock.tmp"
    tmp.write_text(json.dumps({"holder": holder, "lease_s": lease_s}))
    os.utime(tmp, (at, at))
    tmp.rename(path)
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate(tmp_path: Path, clock: Clock) -> FileLockGate:
    return FileLockGate(tmp_path / "locks", max_lease_s=3600, monotonic=lambda: clock.mono)


# ---------------------------------------------------------------- pure rules


def test_locks_module_is_pure() -> None:
    source = Path(locks.__file__).read_text()
    banned = {"os", "time", "pathlib", "subprocess", "threading", "socket", "asyncio"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = (
                [a.name.split(".")[0] for a in node.names]
                if isinstance(node, ast.Import)
                else [(node.module or "").split(".")[0]]
            )
            assert not banned.intersection(names), names


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"{nope", "not_json", id="not-json"),
        pytest.param(b"[1, 2]", "not_an_object", id="array"),
        pytest.param(b'{"lease_s": 5}', "bad_holder", id="no-holder"),
        pytest.param(b'{"holder": "", "lease_s": 5}', "bad_holder", id="empty-holder"),
        pytest.param(b'{"holder": "x\\n", "lease_s": 5}', "bad_holder", id="holder-newline"),
        pytest.param(b'{"holder": "x", "lease_s": "5"}', "bad_lease", id="lease-string"),
        pytest.param(b'{"holder": "x", "lease_s": 0}', "bad_lease", id="lease-zero"),
        pytest.param(b'{"holder": "x", "lease_s": true}', "bad_lease", id="lease-bool"),
        pytest.param(b'{"holder": "x", "lease_s": 1e999}', "bad_lease", id="lease-infinite"),
        pytest.param(b'{"holder": "x", "lease_s": NaN}', "bad_lease", id="lease-nan"),
        pytest.param(b" " * 4097, "oversized", id="oversized"),
        pytest.param(b"\xff\xfe", "not_json", id="not-utf8"),
    ],
)
def test_a_bad_lock_file_is_refused_with_its_reason(data: bytes, reason: str) -> None:
    with pytest.raises(LockFileError) as caught:
        parse_lock(data)
    assert caught.value.reason == reason


def test_a_lease_ends_at_the_earlier_of_the_two_clocks_and_the_cap() -> None:
    ask = LockRequest("backup", 600)
    # written 100 s ago, first seen now: the wall clock's end is the earlier
    assert lease_end(
        ask, written_at=T0 - 100, seen_mono=50, now=T0, now_mono=50, max_lease_s=3600
    ) == pytest.approx(T0 + 500)
    # the wall clock stepped back an hour (mtime in the future): the agent's own clock wins
    assert lease_end(
        ask, written_at=T0 + 3600, seen_mono=50, now=T0, now_mono=50, max_lease_s=3600
    ) == pytest.approx(T0 + 600)
    # a lease of a year is capped
    year = LockRequest("backup", 365 * 86400)
    assert lease_end(
        year, written_at=T0, seen_mono=50, now=T0, now_mono=50, max_lease_s=3600
    ) == pytest.approx(T0 + 3600)


def test_blocking_the_override_and_the_wait() -> None:
    held = [Lease("web", "backup", T0 + 30), Lease("db", "dump", T0 - 1)]
    assert blocking(held, "web", T0, None) == held[0]
    assert blocking(held, "db", T0, None) is None  # expired
    assert blocking(held, "other", T0, None) is None
    assert blocking(held, "web", T0, LockOverride(T0 + 10)) is None  # all lifted
    assert blocking(held, "web", T0, LockOverride(T0 + 10, frozenset({"db"}))) == held[0]
    assert blocking(held, "web", T0 + 10, LockOverride(T0 + 10)) == held[0]  # override over
    assert switch_wait_s(held[0], T0, recheck_s=5) == 5
    assert switch_wait_s(held[0], T0 + 28, recheck_s=5) == pytest.approx(2)
    assert switch_wait_s(held[0], T0 + 40, recheck_s=5) == locks.MIN_WAIT_S


@pytest.mark.parametrize(
    ("member", "expected"),
    [
        pytest.param({"until": T0}, LockOverride(T0), id="all"),
        pytest.param(
            {"until": T0, "workloads": ["web"]}, LockOverride(T0, frozenset({"web"})), id="named"
        ),
        pytest.param({"until": T0, "workloads": None}, LockOverride(T0), id="null-is-all"),
    ],
)
def test_an_override_parses(member: object, expected: LockOverride) -> None:
    assert parse_override({"lock_override": member}) == expected
    assert parse_override({}) is None


@pytest.mark.parametrize(
    "member",
    [
        pytest.param([], id="not-object"),
        pytest.param({}, id="no-until"),
        pytest.param({"until": "soon"}, id="until-string"),
        pytest.param({"until": True}, id="until-bool"),
        pytest.param({"until": T0, "workloads": "web"}, id="workloads-string"),
        pytest.param({"until": T0, "workloads": ["Web!"]}, id="bad-name"),
    ],
)
def test_a_malformed_override_is_refused(member: object) -> None:
    with pytest.raises(LockOverrideError):
        parse_override({"lock_override": member})


# ---------------------------------------------------------------- the gate on real files


def test_a_held_lock_blocks_and_release_frees(
    tmp_path: Path, gate: FileLockGate, clock: Clock
) -> None:
    directory = tmp_path / "locks"
    lockfiles.take(directory, "web", "backup", 60, now=clock.wall)
    os.utime(directory / "web.lock", (clock.wall, clock.wall))
    said = gate.blocking("web", clock.wall)
    assert said == f"held by backup until {clock.wall + 60:.0f}"
    assert gate.blocking("db", clock.wall) is None
    assert lockfiles.release(directory, "web", "backup") is True
    assert gate.blocking("web", clock.wall) is None
    assert lockfiles.release(directory, "web", "backup") is False  # nothing left


def test_renewal_extends_and_an_expired_lease_stops_blocking(
    tmp_path: Path, gate: FileLockGate, clock: Clock
) -> None:
    directory = tmp_path / "locks"
    write_lock(directory, "web", "backup", 60, at=clock.wall)
    assert gate.blocking("web", clock.wall) is not None
    clock.advance(50)
    write_lock(directory, "web", "backup", 60, at=clock.wall)  # renewed: 60 s from now
    clock.advance(50)
    assert gate.blocking("web", clock.wall) is not None  # past the first lease, within the new
    clock.advance(11)
    assert gate.blocking("web", clock.wall) is None  # expired: the file stays, blocks nothing
    assert (directory / "web.lock").exists()


def test_a_touch_is_a_renewal(tmp_path: Path, gate: FileLockGate, clock: Clock) -> None:
    directory = tmp_path / "locks"
    path = write_lock(directory, "web", "backup", 60, at=clock.wall)
    assert gate.blocking("web", clock.wall) is not None
    clock.advance(59)
    os.utime(path, (clock.wall, clock.wall))
    clock.advance(59)
    assert gate.blocking("web", clock.wall) is not None


def test_a_lock_left_by_a_dead_holder_found_after_a_restart_has_expired(
    tmp_path: Path, gate: FileLockGate, clock: Clock
) -> None:
    """balena-supervisor#1758: a stale lock file blocked updates forever."""
    write_lock(tmp_path / "locks", "web", "crashed", 600, at=clock.wall - 3 * 3600)
    assert gate.blocking("web", clock.wall) is None  # the gate never saw it before


def test_a_wall_clock_stepped_back_cannot_stretch_a_lease(
    tmp_path: Path, gate: FileLockGate, clock: Clock
) -> None:
    write_lock(tmp_path / "locks", "web", "backup", 60, at=clock.wall)
    assert gate.blocking("web", clock.wall) is not None
    clock.wall -= 3600  # NTP steps the wall clock back an hour; the mtime is now "future"
    clock.mono += 61
    assert gate.blocking("web", clock.wall) is None  # 61 s by the agent's own clock


def test_the_cap_applies_to_a_lease_of_a_year(tmp_path: Path, clock: Clock) -> None:
    gate = FileLockGate(tmp_path / "locks", max_lease_s=120, monotonic=lambda: clock.mono)
    write_lock(tmp_path / "locks", "web", "greedy", 365 * 86400, at=clock.wall)
    assert gate.blocking("web", clock.wall) == f"held by greedy until {clock.wall + 120:.0f}"
    clock.advance(121)
    assert gate.blocking("web", clock.wall) is None


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: p.write_text("not json"), id="not-json"),
        pytest.param(lambda p: p.write_bytes(b"{" + b" " * 100_000 + b"}"), id="oversized"),
        pytest.param(lambda p: p.write_text('{"holder": 5, "lease_s": 60}'), id="wrong-field"),
        pytest.param(os.mkfifo, id="fifo"),
        pytest.param(lambda p: p.symlink_to("/dev/zero"), id="symlink"),
        pytest.param(lambda p: p.mkdir(), id="directory"),
    ],
)
def test_a_broken_lock_file_blocks_nothing_and_says_why(
    tmp_path: Path, gate: FileLockGate, clock: Clock, make: object
) -> None:
    directory = tmp_path / "locks"
    directory.mkdir()
    make(directory / "web.lock")  # type: ignore[operator]
    assert gate.blocking("web", clock.wall) is None
    assert list(gate.problems) == ["web.lock"]


def test_names_that_are_not_locks_are_not_read(
    tmp_path: Path, gate: FileLockGate, clock: Clock
) -> None:
    directory = tmp_path / "locks"
    write_lock(directory, "web", "backup", 60, at=clock.wall)
    (directory / ".web.lock.tmp").write_text("half")  # a writer's temporary
    (directory / "Bad Name.lock").write_text("{}")
    (directory / "notes.txt").write_text("hello")
    assert [lease.workload for lease in gate.leases(clock.wall)] == ["web"]
    assert gate.problems == {}


def test_the_override_lifts_a_lock_until_its_time(
    tmp_path: Path, gate: FileLockGate, clock: Clock
) -> None:
    write_lock(tmp_path / "locks", "web", "backup", 600, at=clock.wall)
    gate.set_override(LockOverride(clock.wall + 30, frozenset({"web"})))
    assert gate.blocking("web", clock.wall) is None
    (status,) = gate.statuses(clock.wall)
    assert status == LockStatus(
        workload="web", holder="backup", until=status.until, overridden=True
    )
    clock.advance(31)
    assert gate.blocking("web", clock.wall) is not None


def test_take_renew_release_refuse_another_holder(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    now = time.time()  # take and renew judge the file's real mtime
    lockfiles.take(directory, "web", "backup", 60, now=now)
    with pytest.raises(LockConflict, match="held by backup"):
        lockfiles.take(directory, "web", "intruder", 60, now=now)
    with pytest.raises(LockConflict):
        lockfiles.renew(directory, "web", "intruder", 60, now=now)
    with pytest.raises(LockConflict):
        lockfiles.release(directory, "web", "intruder")
    lockfiles.renew(directory, "web", "backup", 90, now=now)
    assert json.loads((directory / "web.lock").read_text()) == {"holder": "backup", "lease_s": 90}
    with pytest.raises(LockConflict, match="not held"):
        lockfiles.renew(directory, "db", "backup", 60, now=now)
    with pytest.raises(ValueError, match="workload must match"):
        lockfiles.take(directory, "../etc", "x", 60, now=now)
    with pytest.raises(LockFileError, match="bad_lease"):
        lockfiles.take(directory, "web", "backup", -1, now=now)
    # an expired lease of another holder may be taken over
    later = now + 7200
    lockfiles.take(directory, "web", "next", 60, now=later)


def test_the_watcher_reports_changes_only(tmp_path: Path, gate: FileLockGate, clock: Clock) -> None:
    seen: list[list[LockStatus]] = []
    watcher = LockWatcher(gate, seen.append, clock=lambda: clock.wall)
    watcher.look()
    watcher.look()  # nothing held at start: nothing to report (a hub assumes none)
    write_lock(tmp_path / "locks", "web", "backup", 60, at=clock.wall)
    watcher.look()
    clock.advance(1)
    watcher.look()  # the same lock: nothing new
    clock.advance(60)
    watcher.look()  # expired: none held
    assert [[(s.workload, s.holder) for s in one] for one in seen] == [[("web", "backup")], []]


# ---------------------------------------------------------------- the CLI


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "driftless.cli", "agent", "lock", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_the_cli_takes_shows_renews_and_releases(tmp_path: Path) -> None:
    data = str(tmp_path)
    who = ("--workload", "web", "--holder", "backup")
    assert cli("take", "--data-dir", data, *who, "--lease-s", "60").returncode == 0
    other = cli("take", "--data-dir", data, "--workload", "web", "--holder", "x", "--lease-s", "9")
    assert other.returncode == 1 and "held by backup" in other.stderr
    shown = cli("show", env={"DRIFTLESS_LOCK_DIR": str(tmp_path / "locks")})
    (line,) = [json.loads(x) for x in shown.stdout.splitlines()]
    assert (line["workload"], line["holder"], line["expired"]) == ("web", "backup", False)
    assert cli("renew", "--data-dir", data, *who, "--lease-s", "120").returncode == 0
    assert cli("release", "--data-dir", data, *who).returncode == 0
    assert cli("show", "--data-dir", data).stdout == ""
    nowhere = cli("show", env={"DRIFTLESS_LOCK_DIR": ""})
    assert nowhere.returncode == 2 and "DRIFTLESS_LOCK_DIR" in nowhere.stderr


def test_the_shell_recipe_in_the_docs_takes_a_lock(tmp_path: Path, clock: Clock) -> None:
    """docs/runtime.md's recipe for workloads without Python: printf and mv only."""
    doc = (Path(__file__).parents[2] / "docs" / "runtime.md").read_text()
    recipe = doc.split("```sh\n", 1)[1].split("```", 1)[0]
    directory = tmp_path / "locks"
    directory.mkdir()
    env = {"PATH": os.environ["PATH"], "DRIFTLESS_LOCK_DIR": str(directory)}
    subprocess.run(["sh", "-ec", recipe], env=env, check=True, timeout=10)
    gate = FileLockGate(directory, monotonic=lambda: clock.mono)
    (lease,) = gate.leases(os.path.getmtime(directory / "web.lock"))
    assert (lease.workload, lease.holder) == ("web", "backup.sh")


# ---------------------------------------------------------------- the core and the override

FLEET = Fleet()


def online_core(fleet: Fleet | None) -> AgentCore:
    trusted = fleet.trusted() if fleet is not None else None
    core = AgentCore("d1", AgentState(), "test", trusted_root=trusted, clock_skew_s=0)
    for event in (Booted(NOW), Connecting(NOW), Connected(NOW, False), Subscribed(NOW)):
        core.handle(event)
    return core


def override_doc(generation: int = 1) -> bytes:
    config = {"lock_override": {"until": NOW + 600, "workloads": ["web"]}}
    return encode(Desired(device_id="d1", generation=generation, config=config, issued_at=1.0))


def test_a_signed_override_reaches_the_gate() -> None:
    actions = online_core(FLEET).handle(
        DesiredPayload(seal(override_doc(), FLEET.hub_keys), float(NOW))
    )
    assert OverrideLocks(LockOverride(NOW + 600, frozenset({"web"}))) in actions


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(override_doc(), id="unsigned"),
        pytest.param(seal(override_doc(), Fleet().hub_keys), id="signed-by-strangers"),
        pytest.param(
            seal(override_doc(), FLEET.hub_keys).replace(b'"web"', b'"db"'), id="tampered"
        ),
    ],
)
def test_an_attackers_override_is_not_honoured(payload: bytes) -> None:
    """The core refuses the whole document before it reads the override."""
    actions = online_core(FLEET).handle(DesiredPayload(payload, float(NOW)))
    assert [type(a) for a in actions] == [Rejected]
    assert not any(isinstance(a, OverrideLocks) for a in actions)


def test_an_override_in_an_older_document_is_not_honoured() -> None:
    core = online_core(None)
    core.handle(DesiredPayload(encode(Desired(device_id="d1", generation=5, config={},
                                              issued_at=1.0)), float(NOW)))  # fmt: skip
    actions = core.handle(DesiredPayload(override_doc(generation=3), float(NOW)))
    assert not any(isinstance(a, OverrideLocks) for a in actions)


def test_a_malformed_override_is_ignored_with_a_reason_and_the_apply_goes_on() -> None:
    doc = Desired(device_id="d1", generation=1, config={"lock_override": []}, issued_at=1.0)
    actions = online_core(None).handle(DesiredPayload(encode(doc), float(NOW)))
    assert any(isinstance(a, Ignored) and "lock override refused" in a.why for a in actions)
    assert not any(isinstance(a, OverrideLocks) for a in actions)


def test_the_core_reports_who_holds_which_lock() -> None:
    core = online_core(None)
    held = (LockStatus(workload="web", holder="backup", until=NOW + 60.0),)
    (publish,) = [a for a in core.handle(LocksChanged(held, NOW)) if isinstance(a, Publish)]
    report = decode(publish.payload, Reported)
    assert report.locks == list(held) and report.jobs is None
    assert publish.key == "locks"  # state: kept newest-only while offline
