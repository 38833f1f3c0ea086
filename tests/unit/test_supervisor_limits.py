"""Resource limits: prlimit wrapping enforced on real children; cgroup v2 detection and writing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from edge_agent.supervisor.limits import (
    CgroupSupport,
    Limits,
    cgroup_support,
    place_in_cgroup,
    wrap_argv,
)
from edge_agent.supervisor.processes import SpawnError
from tests.unit.supervisor_support import Exits, python_launch, table_in, wait_for

MiB = 1 << 20
HUNGRY = "b = bytearray(500 * 2**20); print('allocated', len(b) // 2**20, 'MiB')"


def test_without_limits_the_command_is_unchanged() -> None:
    assert wrap_argv(["app", "-x"], Limits()) == ["app", "-x"]


def test_the_rlimits_asked_for_prefix_the_command() -> None:
    limits = Limits(memory_bytes=200 * MiB, cpu_seconds=30, open_files=64)
    assert wrap_argv(["app", "--", "-x"], limits, prlimit="/p") == [
        "/p", f"--as={200 * MiB}", "--cpu=30", "--nofile=64:64", "--", "app", "--", "-x",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"memory_bytes": 0}, "memory_bytes must be a positive integer", id="zero"),
        pytest.param({"open_files": -1}, "open_files must be a positive integer", id="negative"),
        pytest.param({"cpu_seconds": 1.5}, "cpu_seconds must be a positive integer", id="float"),
        pytest.param({"cpu_seconds": True}, "cpu_seconds must be a positive integer", id="bool"),
        pytest.param({"cgroup_cpu_max": 0}, "cgroup_cpu_max must be cores", id="no-cores"),
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_prlimit_sets_the_limits_on_the_workloads_own_pid(tmp_path: Path) -> None:
    limits = Limits(memory_bytes=300 * MiB, cpu_seconds=7, open_files=33)
    child = subprocess.Popen(wrap_argv(["sleep", "30"], limits), cwd=tmp_path)
    try:
        comm = Path(f"/proc/{child.pid}/comm")
        wait_for(lambda: comm.read_text().strip() == "sleep", what="prlimit exec'd sleep")
        text = Path(f"/proc/{child.pid}/limits").read_text()
        rows = {line[:26].strip(): line[26:].split()[:2] for line in text.splitlines()[1:]}
        assert rows["Max address space"] == [str(300 * MiB)] * 2
        assert rows["Max cpu time"] == ["7", "7"]
        assert rows["Max open files"] == ["33", "33"]
    finally:
        child.kill()
        child.wait()


def test_a_memory_limit_is_enforced_and_the_same_child_succeeds_without_it(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        table.start(python_launch(HUNGRY, tmp_path, limits=Limits(memory_bytes=200 * MiB)))
        limited = exits.next()
        assert limited.exit_code == 1
        assert "MemoryError" in table.log_tail("web")[-1]
        table.start(python_launch(HUNGRY, tmp_path, workload="free", instance="free.g1"))
        free = exits.next()
        assert free.exit_code == 0
        assert table.log_tail("free") == ["allocated 500 MiB"]


def test_an_open_files_limit_is_enforced(tmp_path: Path) -> None:
    code = (
        "import os\nfds = []\n"
        "try:\n    for _ in range(100): fds.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError as e: print('stopped at', len(fds), e.strerror); raise SystemExit(4)\n"
    )
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        table.start(python_launch(code, tmp_path, limits=Limits(open_files=20)))
        assert exits.next().exit_code == 4
        (line,) = table.log_tail("web")
        assert line.startswith("stopped at") and line.endswith("Too many open files")
        assert int(line.split()[2]) < 20


# ------------------------------------------------------------------ cgroup v2


def _fake_cgroup2(root: Path, controllers: str = "cpuset cpu io memory pids") -> Path:
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (root / "cgroup.subtree_control").write_text("\n")
    (root / "cgroup.procs").write_text("")
    return root


def test_this_machine_says_why_it_has_no_cgroup_v2() -> None:
    support = cgroup_support()
    if support.available:  # a machine with a delegated cgroup v2: nothing to explain
        assert support.root == Path("/sys/fs/cgroup") and support.reason == ""
    else:
        assert support.root is None and "cgroup" in support.reason


V1_REASON = r"no cgroup v2 hierarchy at .* \(cgroup v1 controllers mounted there: memory, cpu\)"


@pytest.mark.parametrize(
    ("layout", "reason"),
    [
        pytest.param("v1", V1_REASON, id="cgroup-v1"),
        pytest.param("empty", r"no cgroup v2 hierarchy at .* \(nothing\)", id="nothing"),
        pytest.param("no-memory", "lacks the memory controller", id="v2-without-memory"),
        pytest.param("none", "lacks the memory and cpu controllers", id="hybrid-unified"),
    ],
)
def test_cgroup_support_says_why_not(tmp_path: Path, layout: str, reason: str) -> None:
    root = tmp_path / "cg"
    if layout == "v1":
        for name in ("memory", "cpu", "cpuacct"):
            (root / name).mkdir(parents=True)
    elif layout == "empty":
        root.mkdir()
    elif layout == "no-memory":
        _fake_cgroup2(root, "cpuset cpu io pids")
    else:
        _fake_cgroup2(root, "")
    support = cgroup_support(root)
    assert not support.available and support.root is None
    assert support.reason
    assert re.search(reason, support.reason), support.reason


def test_without_cgroup_v2_a_cgroup_limit_is_a_reported_no_op(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not available: no cgroup v2"):
        place_in_cgroup(cgroup_support(tmp_path), "t", "web.g1", 1, Limits(cgroup_memory_max=1))
    exits = Exits()
    with table_in(tmp_path / "sup", exits, cgroup_root=tmp_path / "none") as table:
        assert not table.cgroups.available and "no cgroup v2" in table.cgroups.reason
        running = table.start(
            python_launch("pass", tmp_path, limits=Limits(cgroup_memory_max=64 * MiB))
        )
        assert running.cgroup is None
        assert exits.next().exit_code == 0


def test_on_a_writable_cgroup2_tree_the_workload_gets_its_group(tmp_path: Path) -> None:
    root = _fake_cgroup2(tmp_path / "cg")
    assert cgroup_support(root) == CgroupSupport(True, root, "")
    exits = Exits()
    with table_in(tmp_path / "sup", exits, cgroup_root=root, tag="agent1") as table:
        limits = Limits(cgroup_memory_max=64 * MiB, cgroup_cpu_max=0.5)
        running = table.start(python_launch("import time; time.sleep(60)", tmp_path, limits=limits))
        group = root / "driftless.agent1" / "web.g1"
        assert running.cgroup == group
        assert (group / "memory.max").read_text() == f"{64 * MiB}\n"
        assert (group / "cpu.max").read_text() == "50000 100000\n"
        assert (group / "cgroup.procs").read_text() == f"{running.pid}\n"
        for level in (root, root / "driftless.agent1"):
            assert (level / "cgroup.subtree_control").read_text() == "+memory +cpu\n"
        assert table.running()["web.g1"].cgroup == group


def test_a_refused_cgroup_write_stops_the_workload_and_says_why(tmp_path: Path) -> None:
    root = _fake_cgroup2(tmp_path / "cg")
    (root / "driftless.agent1").write_text("a file where the agent's group should be")
    exits = Exits()
    with table_in(tmp_path / "sup", exits, cgroup_root=root, tag="agent1") as table:
        with pytest.raises(SpawnError, match="cannot set up cgroup"):
            table.start(
                python_launch(
                    "import time; time.sleep(60)", tmp_path, limits=Limits(cgroup_cpu_max=1)
                )
            )
        assert table.running() == {}
        assert exits.empty()
