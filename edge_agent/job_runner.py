"""Runs one-shot jobs as child processes and reports them (the I/O of :mod:`edge_agent.jobs`).

Rules:
- One runner thread takes the documents' jobs (:meth:`JobRunner.offer`, which
  never blocks: the driver calls it under its lock) and starts those the
  table never saw (:func:`edge_agent.jobs.to_start`), refusing those whose
  ``expires_at`` passed (:func:`edge_agent.jobs.to_expire`); each started job gets a
  watcher thread (its deadline, its exit) and a reader thread (its output).
- A job is written to ``<data>/jobs.json`` as ``running`` BEFORE its process
  is spawned (atomically, mode 0600), so a crash at any instant never lets it
  run twice; its pid and the kernel's start time of that pid follow once it
  runs, so an agent that restarts can end a job's process group it left
  behind (and not some other process that reuses the pid).
- A job runs in its own session and process group (``start_new_session``),
  with stdin from ``/dev/null``, stdout and stderr into one pipe, in
  ``<data>/jobs/``, with ``PATH`` (and ``LANG``) from the agent, the job's
  ``env`` and ``DRIFTLESS_JOB_ID``; nothing else of the agent's environment.
- At its deadline the group gets SIGTERM, then SIGKILL after ``kill_grace_s``;
  when the job's main process ends, whatever is left in its group is killed.
- Updates (started, progress, finished with the exit code and the log tail)
  go to ``on_update`` in order, from the job's own threads; the driver turns
  each into a :class:`edge_agent.core.JobUpdate`, which the core reports
  through the outbox.
- At start (:meth:`JobRunner.start`) the table is loaded: jobs left running by
  a previous agent have their group killed and are reported ``failed``, or
  run again when ``idempotent`` (:func:`edge_agent.jobs.after_restart`). An
  unreadable table is logged and replaced by an empty one.
- :meth:`JobRunner.stop` ends running jobs' groups without recording a result:
  the next start reports them (the agent stopped while they ran).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import msgspec

from edge_agent import jobs
from edge_agent.jobs import JobRecord, JobsInDocument, JobSpec, JobTable
from edge_agent.store import atomic_write_bytes
from protocols import JobStatus

log = logging.getLogger("driftless.agent.jobs")
JOBS_FILE = "jobs.json"


@dataclass(frozen=True)
class JobSettings:
    """Bounds and pacing of the job runner."""

    max_remembered: int = jobs.MAX_REMEMBERED_JOBS
    progress_interval_s: float = 1.0
    kill_grace_s: float = 5.0
    log_tail_chars: int = 4096

    def __post_init__(self) -> None:
        if self.max_remembered < 1 or self.kill_grace_s < 0 or self.progress_interval_s < 0:
            raise ValueError("max_remembered >= 1, kill_grace_s and progress_interval_s >= 0")
        if not 0 < self.log_tail_chars <= 4096:
            raise ValueError("log_tail_chars must be in 1..4096 (the report's limit)")


class _JobsFile(msgspec.Struct):
    records: list[JobRecord]
    next_order: int = 0


def load_table(path: Path) -> JobTable:
    """The remembered table; empty when there is none. Raises OSError or
    msgspec.DecodeError / ValidationError for a file that is not one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return JobTable()
    saved = msgspec.json.decode(data, type=_JobsFile)
    return JobTable(tuple(saved.records), saved.next_order)


def save_table(path: Path, table: JobTable) -> None:
    """Replace the table on disk atomically and durably; raises OSError."""
    atomic_write_bytes(path, msgspec.json.encode(_JobsFile(list(table.records), table.next_order)))


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])  # field 22 of the file; the fields after ``comm`` start at 3


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class JobRunner:
    """Runs jobs once each, reports them through ``on_update``; see the module rules."""

    def __init__(
        self,
        data_dir: Path,
        on_update: Callable[[JobStatus], None],
        *,
        settings: JobSettings | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.data_dir = data_dir
        self.path = data_dir / JOBS_FILE
        self.workdir = data_dir / "jobs"
        self.on_update = on_update
        self.settings = settings or JobSettings()
        self.clock = clock
        self.monotonic = monotonic
        self._table = JobTable()
        self._mutex = threading.Lock()
        self._offers: queue.Queue[JobsInDocument | None] = queue.Queue()
        self._running: dict[str, subprocess.Popen[bytes]] = {}
        self._watchers: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the driver's side

    def start(self) -> None:
        """Load the table, deal with jobs a previous agent left, start the thread."""
        self._thread = threading.Thread(target=self._run, name="jobs", daemon=True)
        self._thread.start()

    def offer(self, document: JobsInDocument) -> None:
        """A verified document's jobs; never blocks (the runner thread starts them)."""
        self._offers.put(document)

    def stop(self) -> None:
        """End running jobs' groups (no result recorded) and the threads."""
        self._stopping.set()
        self._offers.put(None)
        with self._mutex:
            running = list(self._running.values())
        for process in running:
            _kill_group(process.pid, signal.SIGKILL)
        if self._thread is not None:
            self._thread.join(timeout=10)
        for watcher in list(self._watchers.values()):
            watcher.join(timeout=10)

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until every offered job has finished; False on timeout."""
        deadline = self.monotonic() + timeout_s
        while self.monotonic() < deadline:
            with self._mutex:
                busy = bool(self._running) or not self._offers.empty()
            if not busy:
                return True
            time.sleep(0.01)
        return False

    @property
    def table(self) -> JobTable:
        with self._mutex:
            return self._table

    # -- the runner thread

    def _run(self) -> None:
        again = self._recover()
        if again:
            self._start_all(again)
        while True:
            document = self._offers.get()
            if document is None or self._stopping.is_set():
                return
            with self._mutex:
                table = self._table
            for job_id, reason in jobs.to_refuse(table, document):
                self._refuse(job_id, reason)
            now = self.clock()
            for spec in jobs.to_expire(table, document, now):
                self._refuse(spec.id, jobs.EXPIRED)
            self._start_all(jobs.to_start(table, document, now))

    def _recover(self) -> tuple[JobSpec, ...]:
        try:
            table = load_table(self.path)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("job table unreadable; starting empty", extra={"error": str(exc)})
            table = JobTable()
        for record in table.running():
            if record.pid is not None and process_start_time(record.pid) == record.pid_start:
                log.warning("ending a job the previous agent left", extra={"job": record.id})
                _kill_group(record.pid, signal.SIGKILL)
        was_running = {record.id for record in table.running()}
        table, again = jobs.after_restart(table, self.clock())
        with self._mutex:
            self._table = table
        failed = [r for r in table.records if r.id in was_running]
        self._save()
        for record in failed:
            self.on_update(jobs.status(record, message=jobs.AGENT_RESTARTED))
        return again

    def _save(self) -> None:
        with self._mutex:
            table = self._table
        save_table(self.path, table)

    def _remember(self, record: JobRecord) -> JobRecord:
        with self._mutex:
            self._table = jobs.remember(self._table, record, keep=self.settings.max_remembered)
            stored = self._table.get(record.id)
        self._save()
        return stored or record

    def _refuse(self, job_id: str, reason: str) -> None:
        record, report = jobs.refused(job_id, reason, 0, self.clock())
        self._remember(record)
        self.on_update(report)

    def _start_all(self, specs: tuple[JobSpec, ...]) -> None:
        for spec in specs:
            if self._stopping.is_set():
                return
            self._start(spec)

    def _start(self, spec: JobSpec) -> None:
        now = self.clock()
        record = self._remember(JobRecord(spec.id, 0, "running", spec=spec, started_at=now))
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: os.environ[k] for k in ("PATH", "LANG") if k in os.environ}
        env.update(spec.env)
        env["DRIFTLESS_JOB_ID"] = spec.id
        started_mono = self.monotonic()
        try:
            process = subprocess.Popen(
                list(spec.command),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            done = replace(record, state="failed", finished_at=self.clock())
            self._remember(done)
            self.on_update(jobs.status(done, message=f"could not start: {exc}"[:256]))
            return
        record = self._remember(
            replace(record, pid=process.pid, pid_start=process_start_time(process.pid))
        )
        with self._mutex:
            self._running[spec.id] = process
        log.info("job started", extra={"job": spec.id, "pid": process.pid})
        self.on_update(jobs.status(record, progress=0))
        watcher = threading.Thread(
            target=self._watch, args=(record, process, started_mono), name=f"job-{spec.id}"
        )
        self._watchers[spec.id] = watcher
        watcher.start()

    # -- one job's threads

    def _watch(self, record: JobRecord, process: subprocess.Popen[bytes], started: float) -> None:
        output = _Output(self, record)
        reader = threading.Thread(target=output.read, args=(process,), daemon=True)
        reader.start()
        spec = record.spec
        assert spec is not None
        timed_out = False
        left = jobs.deadline_left_s(started, spec.deadline_s, self.monotonic())
        try:
            process.wait(timeout=max(0.0, left))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=self.settings.kill_grace_s)
            except subprocess.TimeoutExpired:
                _kill_group(process.pid, signal.SIGKILL)
                process.wait()
        _kill_group(process.pid, signal.SIGKILL)  # whatever the job left in its group
        reader.join(timeout=2.0)
        with self._mutex:
            self._running.pop(record.id, None)
        if self._stopping.is_set():
            return  # the agent stops: the next start reports it
        state, message = jobs.outcome(process.returncode, timed_out=timed_out)
        done = replace(
            record,
            state=state,
            exit_code=process.returncode,
            finished_at=self.clock(),
            pid=None,
            pid_start=None,
        )
        done = self._remember(done)
        log.info(
            "job finished",
            extra={"job": record.id, "state": state, "exit_code": process.returncode},
        )
        self.on_update(
            jobs.status(
                done, progress=output.progress, message=message, log_tail=output.tail or None
            )
        )


class _Output:
    """A job's output: the log tail and its progress lines (reported as they come)."""

    def __init__(self, runner: JobRunner, record: JobRecord) -> None:
        self.runner = runner
        self.record = record
        self.tail = ""
        self.progress: int | None = None
        self._last: tuple[int, float] | None = None

    def read(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        max_chars = self.runner.settings.log_tail_chars
        interval_s = self.runner.settings.progress_interval_s
        stdout = process.stdout
        for raw in iter(lambda: stdout.readline(8192), b""):  # a line without end is cut
            line = raw.decode("utf-8", "replace")
            self.tail = jobs.tail(self.tail, line, max_chars=max_chars)
            parsed = jobs.parse_progress(line)
            if parsed is None:
                continue
            percent, message = parsed
            self.progress = percent
            now = self.runner.clock()
            if jobs.progress_due(self._last, percent, now, interval_s):
                self._last = (percent, now)
                self.runner.on_update(jobs.status(self.record, progress=percent, message=message))
        process.stdout.close()
