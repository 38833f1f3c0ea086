"""A job's ``expires_at`` on the device (issue 15, item 8): never started after it.

The pure rules as tables, and the runner with real child processes: an expired job is
reported failed ("expired") and its command never runs, a live one beside it runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from edge_agent import jobs
from edge_agent.job_runner import JobRunner
from edge_agent.jobs import JobsInDocument, JobSpec, JobTable
from tests.unit.test_jobs import runner_at, runners  # noqa: F401 (a fixture)

NOW = 1_000_000.0


def entry(job_id: str, **extra: object) -> dict[str, object]:
    return {"id": job_id, "command": ["true"], "deadline_s": 5, **extra}


def test_expires_at_is_read_from_the_entry() -> None:
    found = jobs.job_specs({"jobs": [entry("a", expires_at=NOW), entry("b")]})
    assert [(s.id, s.expires_at) for s in found.specs] == [("a", NOW), ("b", None)]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param("soon", id="string"),
        pytest.param(True, id="bool"),
        pytest.param(-1, id="negative"),
        pytest.param(float("inf"), id="infinite"),
    ],
)
def test_a_bad_expires_at_is_refused_with_its_reason(bad: object) -> None:
    found = jobs.job_specs({"jobs": [entry("a", expires_at=bad)]})
    assert found.specs == ()
    assert found.invalid == (("a", "invalid job: expires_at must be a number of epoch seconds"),)


@pytest.mark.parametrize(
    ("expires_at", "now", "starts", "refused"),
    [
        pytest.param(None, NOW, True, False, id="no-expiry"),
        pytest.param(NOW + 1, NOW, True, False, id="before"),
        pytest.param(NOW, NOW, False, True, id="at"),
        pytest.param(NOW - 1, NOW, False, True, id="after"),
    ],
)
def test_an_expired_job_is_refused_not_started(
    expires_at: float | None, now: float, starts: bool, refused: bool
) -> None:
    document = JobsInDocument((JobSpec("a", ("true",), 5.0, expires_at=expires_at),))
    table = JobTable()
    assert bool(jobs.to_start(table, document, now)) is starts
    assert bool(jobs.to_expire(table, document, now)) is refused
    assert jobs.to_start(table, document) == document.specs  # no clock: no expiry check


def test_a_job_already_seen_is_neither_started_nor_refused_again() -> None:
    spec = JobSpec("a", ("true",), 5.0, expires_at=NOW - 1)
    table = jobs.remember(JobTable(), jobs.JobRecord("a", 0, "succeeded", spec=spec))
    document = JobsInDocument((spec,))
    assert jobs.to_start(table, document, NOW) == ()
    assert jobs.to_expire(table, document, NOW) == ()


def test_the_runner_refuses_an_expired_job_and_runs_the_live_one(
    tmp_path: Path,
    runners: list[JobRunner],  # noqa: F811 (the fixture)
) -> None:
    ran = tmp_path / "ran"
    code = f"import sys; open({str(ran)!r}, 'a').write(sys.argv[1])"
    now = time.time()
    stale = JobSpec("stale", (sys.executable, "-c", code, "stale"), 10.0, expires_at=now - 5)
    live = JobSpec("live", (sys.executable, "-c", code, "live"), 10.0, expires_at=now + 3600)
    runner, updates = runner_at(tmp_path / "data", runners)
    runner.offer(JobsInDocument((stale, live)))
    refused = updates.wait_for("stale", "failed")
    assert refused.message == jobs.EXPIRED and refused.started_at is None
    assert updates.wait_for("live", "succeeded").exit_code == 0
    runner.offer(JobsInDocument((stale, live)))  # delivered again: nothing new
    assert runner.wait_idle(10)
    assert ran.read_text() == "live"  # the expired job's command never ran
    assert [u.state for u in updates.items if u.id == "stale"] == ["failed"]
    record = runner.table.get("stale")
    assert record is not None and record.state == "failed"
