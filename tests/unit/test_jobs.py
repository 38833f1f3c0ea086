"""One-shot jobs (issue 13, item 8): the pure decisions as tables, the runner with real
child processes (own process groups, deadlines, a restart), the core's reports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import jobs
from edge_agent.core import (
    AgentCore,
    AgentState,
    Booted,
    Connected,
    Connecting,
    DesiredPayload,
    Disconnected,
    JobUpdate,
    Publish,
    RunJobs,
    Subscribed,
)
from edge_agent.job_runner import JobRunner, JobSettings, process_start_time, save_table
from edge_agent.jobs import JobRecord, JobsInDocument, JobSpec, JobTable
from edge_agent.outbox import Lane
from protocols import Desired, JobStatus, Reported, decode, encode

PY = sys.executable


def spec(job_id: str, code: str, deadline_s: float = 20, **kw: object) -> JobSpec:
    return JobSpec(job_id, (PY, "-c", code), deadline_s, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------- pure decisions


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        pytest.param({"id": "a", "deadline_s": 5}, "command", id="no-command"),
        pytest.param({"id": "a", "command": [], "deadline_s": 5}, "command", id="empty-command"),
        pytest.param({"id": "a", "command": [""], "deadline_s": 5}, "command", id="empty-argv0"),
        pytest.param({"id": "a", "command": ["x", 1], "deadline_s": 5}, "command", id="not-str"),
        pytest.param({"id": "a", "command": ["x"]}, "deadline_s", id="no-deadline"),
        pytest.param({"id": "a", "command": ["x"], "deadline_s": 0}, "deadline_s", id="zero"),
        pytest.param({"id": "a", "command": ["x"], "deadline_s": True}, "deadline_s", id="bool"),
        pytest.param(
            {"id": "a", "command": ["x"], "deadline_s": 1, "env": {"A-B": "x"}}, "env", id="env"
        ),
        pytest.param(
            {"id": "a", "command": ["x"], "deadline_s": 1, "idempotent": "yes"},
            "idempotent",
            id="idempotent",
        ),
    ],
)
def test_an_invalid_job_is_refused_with_its_reason(entry: dict[str, object], why: str) -> None:
    found = jobs.job_specs({"jobs": [entry]})
    assert found.specs == () and len(found.invalid) == 1
    job_id, reason = found.invalid[0]
    assert job_id == "a" and why in reason


def test_entries_without_a_usable_id_are_ignored_and_ids_are_unique() -> None:
    ok = {"command": ["true"], "deadline_s": 1}
    found = jobs.job_specs(
        {"jobs": [{"id": "../x", **ok}, {"id": "a", **ok}, {"id": "a", **ok}, 5]}
    )
    assert [s.id for s in found.specs] == ["a"]
    assert len(found.ignored) == 3
    assert jobs.job_specs({"jobs": "nope"}).ignored == ("jobs must be a list",)
    assert jobs.job_specs({}) == JobsInDocument()


def test_a_job_is_started_never_twice_and_the_table_is_bounded() -> None:
    doc = jobs.job_specs({"jobs": [{"id": i, "command": ["x"], "deadline_s": 1} for i in "abc"]})
    table = JobTable()
    assert [s.id for s in jobs.to_start(table, doc)] == ["a", "b", "c"]
    for s in jobs.to_start(table, doc):
        table = jobs.remember(table, JobRecord(s.id, 0, "succeeded"), keep=2)
    assert [r.id for r in table.records] == ["b", "c"]  # the oldest finished forgotten
    assert [s.id for s in jobs.to_start(table, doc)] == ["a"]  # documented: keep ids recent
    running = jobs.remember(JobTable(), JobRecord("r", 0, "running"), keep=1)
    running = jobs.remember(running, JobRecord("f", 0, "failed"), keep=1)
    assert [r.id for r in running.records] == ["r"]  # a running job is kept over a finished one


def test_after_a_restart_running_jobs_fail_unless_idempotent() -> None:
    table = JobTable(
        (
            JobRecord("done", 0, "succeeded"),
            JobRecord("once", 1, "running", spec=JobSpec("once", ("x",), 1), pid=5, pid_start=9),
            JobRecord("again", 2, "running", spec=JobSpec("again", ("x",), 1, idempotent=True)),
        ),
        3,
    )
    after, rerun = jobs.after_restart(table, 50.0)
    assert [s.id for s in rerun] == ["again"]
    assert [(r.id, r.state, r.pid) for r in after.records] == [
        ("done", "succeeded", None),
        ("once", "failed", None),
    ]


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        pytest.param("DRIFTLESS_PROGRESS 40 writing flash\n", (40, "writing flash"), id="msg"),
        pytest.param("DRIFTLESS_PROGRESS 100", (100, None), id="bare"),
        pytest.param("DRIFTLESS_PROGRESS 101", None, id="over-100"),
        pytest.param("DRIFTLESS_PROGRESS -1", None, id="negative"),
        pytest.param("DRIFTLESS_PROGRESS forty", None, id="word"),
        pytest.param("  DRIFTLESS_PROGRESS 5", None, id="indented"),
        pytest.param("progress 5", None, id="other"),
    ],
)
def test_progress_lines(line: str, parsed: tuple[int, str | None] | None) -> None:
    assert jobs.parse_progress(line) == parsed


def test_progress_pacing_outcomes_and_tail() -> None:
    assert jobs.progress_due(None, 0, 0.0, 1.0)
    assert not jobs.progress_due((10, 0.0), 10, 5.0, 1.0)  # unchanged
    assert not jobs.progress_due((10, 0.0), 20, 0.5, 1.0)  # too soon
    assert jobs.progress_due((10, 0.0), 100, 0.5, 1.0)  # 100 always
    assert jobs.outcome(0, timed_out=False) == ("succeeded", None)
    assert jobs.outcome(3, timed_out=False)[0] == "failed"
    assert jobs.outcome(-9, timed_out=False) == ("failed", "ended by signal 9")
    assert jobs.outcome(-15, timed_out=True)[0] == "timed_out"
    assert jobs.tail("abc", "defg\n", max_chars=4) == "efg\n"


# ---------------------------------------------------------------- the runner, real processes


class Updates:
    """Collects a runner's updates; waits for one with a deadline."""

    def __init__(self) -> None:
        self.items: list[JobStatus] = []
        self._cond = threading.Condition()

    def __call__(self, status: JobStatus) -> None:
        with self._cond:
            self.items.append(status)
            self._cond.notify_all()

    def wait_for(self, job_id: str, state: str, timeout_s: float = 20) -> JobStatus:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for item in self.items:
                    if item.id == job_id and item.state == state:
                        return item
                left = deadline - time.monotonic()
                assert left > 0, f"no {state} for {job_id}: {self.items}"
                self._cond.wait(left)


@pytest.fixture
def runners() -> Iterator[list[JobRunner]]:
    made: list[JobRunner] = []
    yield made
    for runner in made:
        runner.stop()


def runner_at(
    data: Path, runners: list[JobRunner], **settings: object
) -> tuple[JobRunner, Updates]:
    updates = Updates()
    knobs = {"progress_interval_s": 0.0, "kill_grace_s": 0.3, **settings}
    runner = JobRunner(data, updates, settings=JobSettings(**knobs))  # type: ignore[arg-type]
    runners.append(runner)
    runner.start()
    return runner, updates


def gone(pid: int, timeout_s: float = 10) -> bool:
    """The process ended (a zombie counts: when another test made this process a
    subreaper, a killed grandchild is reparented here and waits to be reaped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.02)
    return False


def test_a_job_runs_once_across_an_agent_restart(tmp_path: Path, runners: list[JobRunner]) -> None:
    marker = tmp_path / "runs"
    job = spec("count", f"open({str(marker)!r}, 'a').write('x')")
    first, updates = runner_at(tmp_path, runners)
    first.offer(JobsInDocument((job,)))
    done = updates.wait_for("count", "succeeded")
    assert done.exit_code == 0 and done.finished_at is not None
    first.offer(JobsInDocument((job,)))  # the same document again
    assert first.wait_idle(10)
    first.stop()
    second, again = runner_at(tmp_path, runners)  # a new agent on the same data
    second.offer(JobsInDocument((job,)))
    assert second.wait_idle(10)
    assert marker.read_text() == "x"  # ran exactly once
    assert again.items == []
    assert json.loads((tmp_path / "jobs.json").read_text())["records"][0]["state"] == "succeeded"


def test_a_deadline_kills_the_group_and_reports_timed_out(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    pids = tmp_path / "pids"
    code = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"  # ignores the polite ask
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(pids)!r}, 'w').write(str(child.pid))\n"
        "print('DRIFTLESS_PROGRESS 40 waiting', flush=True)\n"
        "time.sleep(60)\n"
    )
    runner, updates = runner_at(tmp_path, runners)
    started = time.monotonic()
    runner.offer(JobsInDocument((spec("slow", code, deadline_s=1.0),)))
    result = updates.wait_for("slow", "timed_out")
    assert time.monotonic() - started < 8
    assert result.exit_code == -signal.SIGKILL and result.progress == 40
    assert result.log_tail is not None and "DRIFTLESS_PROGRESS 40" in result.log_tail
    assert gone(int(pids.read_text()))  # the grandchild in its group went too


def test_progress_arrives_in_order(tmp_path: Path, runners: list[JobRunner]) -> None:
    code = "\n".join(
        [f"print('DRIFTLESS_PROGRESS {p} step {p}', flush=True)" for p in (10, 50, 100)]
        + ["print('DRIFTLESS_PROGRESS 500 nonsense')", "print('done')"]
    )
    runner, updates = runner_at(tmp_path, runners)
    runner.offer(JobsInDocument((spec("steps", code),)))
    last = updates.wait_for("steps", "succeeded")
    seen = [(u.state, u.progress, u.message) for u in updates.items]
    assert seen[:-1] == [
        ("running", 0, None),
        ("running", 10, "step 10"),
        ("running", 50, "step 50"),
        ("running", 100, "step 100"),
    ]
    assert last.progress == 100 and last.log_tail is not None and last.log_tail.endswith("done\n")


def test_a_job_left_running_by_a_dead_agent_is_ended_and_reported_failed(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    orphan = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record = JobRecord(
            "left", 0, "running", spec=JobSpec("left", ("sleep", "60"), 60),
            started_at=1.0, pid=orphan.pid, pid_start=process_start_time(orphan.pid),
        )  # fmt: skip
        save_table(tmp_path / "jobs.json", JobTable((record,), 1))
        runner, updates = runner_at(tmp_path, runners)
        failed = updates.wait_for("left", "failed")
        assert failed.message == jobs.AGENT_RESTARTED
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        runner.offer(JobsInDocument((record.spec,)))  # type: ignore[arg-type]
        assert runner.wait_idle(10) and len(updates.items) == 1  # not run again
    finally:
        if orphan.poll() is None:
            os.killpg(orphan.pid, signal.SIGKILL)
            orphan.wait()


def test_an_idempotent_job_left_running_runs_again(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    again = spec("again", "print('hello')", idempotent=True)
    save_table(tmp_path / "jobs.json", JobTable((JobRecord("again", 0, "running", spec=again),), 1))
    _, updates = runner_at(tmp_path, runners)
    assert updates.wait_for("again", "succeeded").log_tail == "hello\n"


def test_an_invalid_job_and_a_missing_program_are_reported_failed_once(
    tmp_path: Path, runners: list[JobRunner]
) -> None:
    runner, updates = runner_at(tmp_path, runners)
    doc = JobsInDocument(
        (JobSpec("missing", ("/nonexistent/program",), 5),), (("bad", "invalid job: command"),)
    )
    runner.offer(doc)
    assert "invalid job" in (updates.wait_for("bad", "failed").message or "")
    assert "could not start" in (updates.wait_for("missing", "failed").message or "")
    runner.offer(doc)
    assert runner.wait_idle(10) and len(updates.items) == 2


# ---------------------------------------------------------------- the core


def test_the_core_hands_a_documents_jobs_over_and_reports_updates_in_order() -> None:
    core = AgentCore("d1", AgentState(), "test")
    core.handle(Booted(1.0))
    config = {"jobs": [{"id": "flash", "command": ["true"], "deadline_s": 5}]}
    doc = Desired(device_id="d1", generation=1, config=config, issued_at=1.0)
    for event in (Connecting(1.0), Connected(1.0, False), Subscribed(1.0)):
        core.handle(event)
    actions = core.handle(DesiredPayload(encode(doc), 2.0))
    (run,) = [a for a in actions if isinstance(a, RunJobs)]
    assert [s.id for s in run.jobs.specs] == ["flash"]
    # offline: the job's updates go into the outbox as events, in order
    core.handle(Disconnected(3.0))
    for progress in (0, 50):
        status = JobStatus(id="flash", state="running", progress=progress)
        core.handle(JobUpdate(status, 4.0))
    core.handle(JobUpdate(JobStatus(id="flash", state="succeeded", exit_code=0), 5.0))
    kept = [e for e in core.outbox.snapshot().entries if e.lane is Lane.EVENT]
    assert len(kept) == 3
    flushed = [a for a in core.handle(Connected(6.0, False)) if isinstance(a, Publish)]
    reports = [decode(p.payload, Reported) for p in flushed if p.topic.endswith("/reported")]
    assert [(r.jobs or [])[0].state for r in reports] == ["running", "running", "succeeded"]
    assert [r.seq for r in reports] == sorted(r.seq for r in reports)
