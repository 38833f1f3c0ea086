"""The process table with real child processes: sessions, stop, exits, orphans, adoption, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.supervisor.processes import Launch, ProcessTable, SpawnError
from tests.unit.supervisor_support import (
    PY,
    Exits,
    alive,
    exists,
    kill_marked,
    python_launch,
    table_in,
    wait_for,
)

SLEEPER = "import time; print('ready', flush=True); time.sleep(60)"


def _ready(table: ProcessTable, workload: str = "web", word: str = "ready") -> None:
    wait_for(lambda: word in table.log_path(workload).read_text(), what=f"{word!r} in the log")


def test_a_workload_runs_in_its_own_session_with_its_output_in_its_log(tmp_path: Path) -> None:
    exits = Exits()
    code = (
        "import sys, time; print('to stdout'); print('to stderr', file=sys.stderr); time.sleep(60)"
    )
    with table_in(tmp_path / "sup", exits) as table:
        running = table.start(python_launch(code, tmp_path))
        assert os.getsid(running.pid) == running.pid == os.getpgid(running.pid)
        wait_for(lambda: len(table.log_tail("web")) == 2)
        assert sorted(table.log_tail("web")) == ["to stderr", "to stdout"]
        environ = Path(f"/proc/{running.pid}/environ").read_bytes().split(b"\0")
        assert f"DRIFTLESS_INSTANCE={table.tag}:web.g1".encode() in environ
        record = json.loads((tmp_path / "sup" / "processes.json").read_text())
        assert [(p["instance"], p["pid"]) for p in record["processes"]] == [("web.g1", running.pid)]
        assert record["processes"][0]["start_ticks"] == running.start_ticks > 0
        assert table.running() == {"web.g1": running}
        with pytest.raises(SpawnError, match="already running"):
            table.start(python_launch(code, tmp_path))


def test_an_exit_is_reported_promptly_with_its_code_and_the_record_emptied(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        running = table.start(python_launch("import sys; sys.exit(3)", tmp_path))
        exited = exits.next()
        assert (exited.instance, exited.pid, exited.exit_code, exited.signal) == (
            "web.g1",
            running.pid,
            3,
            None,
        )
        assert table.running() == {}
        assert not exists(running.pid)  # reaped, no zombie
        record = json.loads((tmp_path / "sup" / "processes.json").read_text())
        assert record["processes"] == []


def test_a_death_by_signal_is_reported_as_the_signal(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        table.start(python_launch("import os; os.kill(os.getpid(), 9)", tmp_path))
        exited = exits.next()
        assert (exited.exit_code, exited.signal) == (None, signal.SIGKILL)


def test_a_workload_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    exits = Exits()
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + SLEEPER
    with table_in(tmp_path / "sup", exits) as table:
        running = table.start(python_launch(code, tmp_path, stop_grace_s=0.5))
        _ready(table)
        began = time.monotonic()
        exited = table.stop("web.g1")
        took = time.monotonic() - began
        assert exited is not None and exited.signal == signal.SIGKILL
        assert 0.5 <= took < 1.5
        assert not exists(running.pid)
        assert table.running() == {}
        assert exits.empty()  # a stop we asked for is not an on_exit
        assert table.stop("web.g1") is None


def test_a_workload_that_honours_sigterm_stops_at_once(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        table.start(python_launch(SLEEPER, tmp_path, stop_grace_s=10))
        _ready(table)
        began = time.monotonic()
        exited = table.stop("web.g1")
        assert time.monotonic() - began < 2
        assert exited is not None and exited.signal == signal.SIGTERM


FORKER = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "open('grandchild.pid', 'w').write(str(child.pid))\n"
    "print('ready', flush=True)\n"
)


def test_stop_leaves_neither_the_workload_nor_its_grandchild(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        running = table.start(python_launch(FORKER + "time.sleep(60)\n", tmp_path, stop_grace_s=2))
        _ready(table)
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        assert os.getpgid(grandchild) == running.pid
        table.stop("web.g1")
        assert not exists(running.pid)
        assert not exists(grandchild)  # killed, and reaped: it was reparented to us


def test_a_workload_that_exits_takes_its_group_with_it(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        table.start(python_launch(FORKER + "sys.exit(0)\n", tmp_path))
        exited = exits.next()
        assert exited.exit_code == 0
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        wait_for(lambda: not exists(grandchild), what="grandchild gone")


DAEMON = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    if os.fork() == 0:\n"
    "        open('daemon.tmp', 'w').write(str(os.getpid()))\n"
    "        os.rename('daemon.tmp', 'daemon.pid')\n"
    "        time.sleep(float(sys.argv[1]))\n"
    "    os._exit(0)\n"
    "os.wait()\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_double_forked_daemon_is_reaped_by_the_agent_not_left_a_zombie(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        assert table.subreaper, table.subreaper_reason
        launch = python_launch(DAEMON, tmp_path)
        table.start(Launch(**{**launch.__dict__, "argv": (*launch.argv, "1.0")}))
        _ready(table)
        daemon = _daemon_pid(tmp_path)
        wait_for(lambda: _ppid(daemon) == os.getpid(), what="the daemon reparented to us")
        wait_for(lambda: not exists(daemon), timeout_s=5, what="the daemon exited and reaped")


def test_stop_also_kills_the_workloads_daemons(tmp_path: Path) -> None:
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        launch = python_launch(DAEMON, tmp_path)
        table.start(Launch(**{**launch.__dict__, "argv": (*launch.argv, "60")}))
        _ready(table)
        daemon = _daemon_pid(tmp_path)
        assert os.getsid(daemon) != os.getsid(table.running()["web.g1"].pid)  # left the group
        wait_for(lambda: _ppid(daemon) == os.getpid(), what="the daemon reparented to us")
        wait_for(lambda: daemon in table._orphans, what="the scan noticed it")
        table.stop("web.g1", grace_s=1)
        wait_for(lambda: not exists(daemon), what="the daemon killed and reaped")


def _daemon_pid(tmp_path: Path) -> int:
    path = tmp_path / "daemon.pid"
    wait_for(path.exists, what="the daemon wrote its pid")
    return int(path.read_text())


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


@pytest.mark.parametrize(
    ("argv", "cwd", "reason"),
    [
        pytest.param(("./missing",), None, "no such file", id="missing-file"),
        pytest.param(("./plain.txt",), None, "not executable", id="not-executable"),
        pytest.param(("./sub",), None, "not a regular file", id="a-directory"),
        pytest.param(("no-such-command-xyz",), None, "no such command on PATH", id="not-on-path"),
        pytest.param(
            (PY, "-c", "pass"), "gone", "working directory .* does not exist", id="no-cwd"
        ),
    ],
)
def test_a_command_that_cannot_start_raises_spawn_error(
    tmp_path: Path, argv: tuple[str, ...], cwd: str | None, reason: str
) -> None:
    (tmp_path / "plain.txt").write_text("#!/bin/sh\n")
    (tmp_path / "sub").mkdir()
    launch = Launch(
        "web", "web.g1", argv, tmp_path / cwd if cwd else tmp_path, {"PATH": "/usr/bin"}
    )
    exits = Exits()
    with table_in(tmp_path / "sup", exits) as table:
        with pytest.raises(SpawnError, match=reason):
            table.start(launch)
        assert table.running() == {}
        assert not (tmp_path / "sup" / "processes.json").exists()


def test_bad_launches_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"launch.instance must match"):
        Launch("web", "web/../x", (PY,), tmp_path, {})
    with pytest.raises(ValueError, match="needs a command"):
        Launch("web", "web.g1", (), tmp_path, {})
    with pytest.raises(ValueError, match="log_max_bytes"):
        Launch("web", "web.g1", (PY,), tmp_path, {}, log_max_bytes=0)


# ------------------------------------------------------------------ adoption


def test_a_restarted_agent_adopts_its_workload_watches_it_and_can_stop_its_group(
    tmp_path: Path,
) -> None:
    first_exits, exits = Exits(), Exits()
    state = tmp_path / "sup"
    with table_in(state, first_exits) as first:
        running = first.start(python_launch(FORKER + "time.sleep(60)\n", tmp_path, stop_grace_s=3))
        _ready(first)
        grandchild = int((tmp_path / "grandchild.pid").read_text())
        first.close()  # the agent is gone; its workloads are not ("lose" the table)
        first._entries.clear()  # as after a SIGKILL: nothing stopped at exit
        with table_in(state, exits) as second:
            adopted = second.adopt()
            assert [(r.instance, r.pid, r.adopted) for r in adopted] == [
                ("web.g1", running.pid, True)
            ]
            assert adopted[0].launch == running.launch  # from the record
            assert second.adopt() == []  # never twice
            exited = second.stop("web.g1")
            assert exited is not None
            assert not exists(running.pid)
            assert not exists(grandchild)


def test_an_adopted_workload_that_exits_is_reported(tmp_path: Path) -> None:
    code = (
        "import os, sys, time\nprint('ready', flush=True)\n"
        "while not os.path.exists('go'): time.sleep(0.01)\nsys.exit(5)\n"
    )
    state = tmp_path / "sup"
    with table_in(state, Exits()) as first:
        running = first.start(python_launch(code, tmp_path))
        _ready(first)
        first.close()
        first._entries.clear()
        exits = Exits()
        with table_in(state, exits) as second:
            assert [r.pid for r in second.adopt()] == [running.pid]
            (tmp_path / "go").touch()
            exited = exits.next()
            assert (exited.instance, exited.pid) == ("web.g1", running.pid)
            # our own child here (same test process), so the code is known; an agent that
            # really restarted gets None
            assert exited.exit_code in (5, None)
            assert not exists(running.pid)


def test_a_workload_whose_record_was_never_written_is_found_by_its_marker(tmp_path: Path) -> None:
    state = tmp_path / "sup"
    with table_in(state, Exits()) as first:
        running = first.start(python_launch(SLEEPER, tmp_path, workload="api", instance="api.g4"))
        _ready(first, "api")
        first.close()
        first._entries.clear()
        (state / "processes.json").unlink()  # died between spawn and write
        with table_in(state, Exits()) as second:
            adopted = second.adopt()
            assert [(r.workload, r.instance, r.pid, r.launch) for r in adopted] == [
                ("api", "api.g4", running.pid, None)
            ]
            assert abs(adopted[0].started_at - running.started_at) < 2
            record = json.loads((state / "processes.json").read_text())
            assert [p["pid"] for p in record["processes"]] == [running.pid]
            assert second.stop("api.g4", grace_s=1) is not None
            assert not exists(running.pid)


def test_a_record_whose_pid_was_reused_is_dropped_and_that_process_left_alone(
    tmp_path: Path,
) -> None:
    state = tmp_path / "sup"
    state.mkdir()
    stranger = subprocess.Popen([PY, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        real_ticks = int(
            Path(f"/proc/{stranger.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        )
        records = {
            "version": 1,
            "tag": "x",
            "processes": [
                _record("web.g1", stranger.pid, real_ticks + 1),  # the pid, another process
                _record("db.g1", 2**22 + 7, 1),  # gone (beyond pid_max)
            ],
        }
        (state / "processes.json").write_text(json.dumps(records))
        with table_in(state, Exits()) as table:
            assert table.adopt() == []
            assert table.running() == {}
            assert json.loads((state / "processes.json").read_text())["processes"] == []
            time.sleep(0.2)
            assert alive(stranger.pid)
            assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def _record(instance: str, pid: int, ticks: int) -> dict[str, object]:
    return {
        "workload": instance.split(".", maxsplit=1)[0],
        "instance": instance,
        "pid": pid,
        "start_ticks": ticks,
        "started_at": 0.0,
        "cgroup": None,
        "launch": None,
    }


def test_two_agents_on_one_machine_never_adopt_each_others_processes(tmp_path: Path) -> None:
    with table_in(tmp_path / "a", Exits()) as a:
        a.start(python_launch(SLEEPER, tmp_path))
        _ready(a)
        with table_in(tmp_path / "b", Exits()) as b:
            assert a.tag != b.tag
            assert b.adopt() == []
        assert "web.g1" in a.running()


def test_the_process_table_is_light_to_import() -> None:
    code = (
        "import sys, edge_agent.supervisor.processes, edge_agent.supervisor.probes\n"
        "heavy = {'cryptography', 'paho', 'asyncio', 'urllib.request', 'http.client', 'msgspec',"
        " 'ctypes'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_fixture_cleanup_finds_marked_processes(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "sup", on_exit=Exits(), orphan_scan_s=0.1)
    running = table.start(python_launch(SLEEPER, tmp_path))
    table.close()
    kill_marked(table.tag)
    wait_for(lambda: not alive(running.pid))
    os.waitpid(running.pid, 0)
