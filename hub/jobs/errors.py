"""Domain errors of the job resource; only :mod:`hub.jobs.routes` turns them into HTTP
status codes. All of them are the caller's fault."""

from __future__ import annotations

from hub.errors import HubError


class JobNotFound(HubError):
    """No job with this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} does not exist")
        self.job_id = job_id


class JobExists(HubError):
    """A job with this id was already created (ids are never reused: devices remember them)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} already exists; a job id is used once")
        self.job_id = job_id


class JobFinished(HubError):
    """The job is already completed, aborted or canceled."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id!r} is {state}; only a running or paused job is canceled")
        self.job_id = job_id
        self.state = state


class InvalidJob(HubError):
    """A job whose shape is right but whose meaning is not (a bad selector, no device
    selected, an entry too large)."""
