"""One-shot jobs end to end (issue 15, item 8): ``/api/v1/jobs`` on a real hub, a real
Mosquitto, and real agents (``driftless agent run``) that run the commands as processes.

Every job's command appends its id to a file of the device (``OUT``), so "ran once"
and "never ran" are read from the devices' disks, not from what anyone reported.

One stack serves the module: the broker, the hub and four agents (``group=a``: job-0..2;
``job-late`` is registered but started only by the expiry test). Each test uses job ids
of its own, so tests do not see each other's jobs.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protocols import Channel, topic
from tests.integration.mqtt_client import RawPeer
from tests.pki import TestBroker
from tests.support import AgentProcess, HubProcess, wait_until

pytestmark = pytest.mark.integration

GROUP = ["job-0", "job-1", "job-2"]
LATE = "job-late"
WRITE = "import os; open(os.environ['OUT'], 'a').write(os.environ['DRIFTLESS_JOB_ID'] + '\\n')"


class Stack:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.broker = TestBroker(workdir)
        self.broker.start()
        self.hub = HubProcess(workdir / "hub", self.broker)
        self.agents: dict[str, AgentProcess] = {}
        self.hub.start()
        for device_id in [*GROUP, LATE]:
            labels = {"group": "a"} if device_id in GROUP else {"group": "late"}
            body = {"id": device_id, "labels": labels}
            self.hub.api.post("/devices", json=body).raise_for_status()
            self.agents[device_id] = AgentProcess(workdir, device_id, self.broker)
        for device_id in GROUP:
            self.agents[device_id].start()
        wait_until(lambda: self.online(GROUP), timeout_s=60, what="the group online")

    def online(self, device_ids: list[str]) -> bool:
        return all(self.hub.device(d)["online"] for d in device_ids)

    def out(self, device_id: str) -> Path:
        return self.workdir / f"out-{device_id}"

    def runs(self, device_id: str) -> list[str]:
        path = self.out(device_id)
        return path.read_text().split() if path.exists() else []

    def job(self, **body: Any) -> dict[str, Any]:
        response = self.hub.api.post("/jobs", json=body)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def write_job(self, job_id: str, device_id: str, **more: Any) -> dict[str, Any]:
        """A job that appends its id to ``device_id``'s file."""
        return self.job(
            id=job_id,
            command=[sys.executable, "-c", WRITE],
            env={"OUT": str(self.out(device_id))},
            deadline_s=30,
            device_id=device_id,
            **more,
        )

    def get(self, job_id: str) -> dict[str, Any]:
        response = self.hub.api.get(f"/jobs/{job_id}")
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def finished(self, job_id: str, *, timeout_s: float = 30) -> dict[str, Any]:
        return wait_until(
            lambda: (
                (view := self.get(job_id))["state"] in ("completed", "aborted", "canceled")
                and view["counts"]["queued"] + view["counts"]["in_progress"] == 0
                and view
            ),
            timeout_s=timeout_s,
            what=f"job {job_id} finished",
        )

    def close(self) -> None:
        for agent in self.agents.values():
            agent.kill()
        self.hub.kill()
        self.hub.api.close()
        self.broker.kill()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    instance = Stack(tmp_path_factory.mktemp("jobs"))
    try:
        yield instance
    finally:
        instance.close()


def by_device(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in view["devices"]}


def test_a_job_to_a_selector_runs_once_on_each_device_and_reports_results(stack: Stack) -> None:
    code = (
        "import os; open('runs', 'a').write('hello\\n')"  # in the agent's <data>/jobs/
        "; print('hello from', os.environ['DRIFTLESS_JOB_ID'])"
    )
    created = stack.job(id="hello", command=[sys.executable, "-c", code], deadline_s=30,
                        selector="group=a")  # fmt: skip
    assert created["targeted"] == 3 and created["counts"]["queued"] == 3
    assert created["state"] == "running" and created["selector"] == "group=a"
    view = stack.finished("hello")
    assert view["state"] == "completed" and view["counts"]["succeeded"] == 3
    for device in view["devices"]:
        assert device["state"] == "succeeded" and device["exit_code"] == 0
        assert device["log_tail"] == "hello from hello\n"
        assert device["handed_out_at"] <= device["started_at"] <= device["finished_at"]
    for device_id in GROUP:
        assert (stack.agents[device_id].data_dir / "jobs" / "runs").read_text() == "hello\n"
    failing = stack.job(id="fails", command=[sys.executable, "-c", "raise SystemExit(3)"],
                        deadline_s=30, device_id="job-1")  # fmt: skip
    assert failing["targeted"] == 1
    (row,) = stack.finished("fails")["devices"]
    assert (row["state"], row["exit_code"], row["message"]) == ("failed", 3, "exited with code 3")
    listed = stack.hub.api.get("/jobs", params={"device_id": "job-1", "limit": 50}).json()
    assert {"hello", "fails"} <= {j["id"] for j in listed["items"]}
    assert "job-0" not in {j["device_id"] for j in listed["items"]}


def test_a_job_delivered_twice_runs_once(stack: Stack) -> None:
    device = "job-0"
    stack.write_job("twice-1", device)
    assert stack.finished("twice-1")["counts"]["succeeded"] == 1
    # The same signed document again, as the broker would deliver it to a new session.
    peer = RawPeer(stack.broker, role="jobs-republish")
    try:
        peer.subscribe(topic(device, Channel.DESIRED))
        _, payload, _ = peer.wait_for(lambda m: b"twice-1" in m[1])
        peer.publish(topic(device, Channel.DESIRED), payload)
    finally:
        peer.close()
    # And a reconnect: the agent restarts and gets its retained document once more.
    agent = stack.agents[device]
    agent.kill()
    agent.start()
    wait_until(lambda: stack.online([device]), timeout_s=30, what="the agent back")
    # A later job runs after both deliveries were handled (documents are taken in order).
    stack.write_job("twice-2", device)
    assert stack.finished("twice-2")["counts"]["succeeded"] == 1
    assert stack.runs(device).count("twice-1") == 1


def test_an_expired_job_never_runs(stack: Stack) -> None:
    stack.write_job("stale", LATE, expires_in_s=1.0)
    view = stack.finished("stale")
    (row,) = view["devices"]
    assert (row["state"], row["handed_out_at"]) == ("expired", None)
    assert row["message"] == "not handed out before expires_at"
    assert view["state"] == "completed"
    agent = stack.agents[LATE]
    agent.start()
    wait_until(lambda: stack.online([LATE]), timeout_s=30, what="the late device online")
    stack.write_job("fresh", LATE)
    assert stack.finished("fresh")["counts"]["succeeded"] == 1
    assert stack.runs(LATE) == ["fresh"]
    reported = {j["id"] for j in stack.hub.device(LATE)["jobs"] or ()}
    assert "stale" not in reported and "fresh" in reported


def test_max_in_flight_is_respected(stack: Stack) -> None:
    code = "import time; time.sleep(0.4)"
    stack.job(id="one-at-a-time", command=[sys.executable, "-c", code], deadline_s=30,
              selector="group=a", rollout={"max_in_flight": 1})  # fmt: skip
    view = stack.finished("one-at-a-time", timeout_s=40)
    assert view["counts"]["succeeded"] == 3
    spans = sorted((d["handed_out_at"], d["finished_at"]) for d in view["devices"])
    for (_, finished), (next_handed_out, _) in itertools.pairwise(spans):
        assert finished <= next_handed_out  # the next device got it after this one finished


def test_cancel_stops_what_was_not_started(stack: Stack) -> None:
    code = "import time; time.sleep(2)"
    stack.job(id="slow", command=[sys.executable, "-c", code], deadline_s=30, selector="group=a",
              rollout={"max_in_flight": 1})  # fmt: skip
    wait_until(lambda: stack.get("slow")["counts"]["in_progress"] == 1, timeout_s=20,
               what="one device running the slow job")  # fmt: skip
    answer = stack.hub.api.post("/jobs/slow/cancel", json={"reason": "changed my mind"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "canceled"
    assert answer.json()["reason"] == "canceled: changed my mind"
    view = stack.finished("slow")
    assert sorted(d["state"] for d in view["devices"]) == ["canceled", "canceled", "succeeded"]
    again = stack.hub.api.post("/jobs/slow/cancel")
    assert again.status_code == 409 and "is canceled" in again.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        pytest.param(
            {"device_id": "job-0", "selector": "group=a"},
            422,
            "exactly one",
            id="both-device-and-selector",
        ),
        pytest.param({}, 422, "exactly one", id="no-target"),
        pytest.param({"device_id": "nope"}, 404, "'nope' is not registered", id="unknown-device"),
        pytest.param({"device_id": "job-0", "command": []}, 422, "command", id="empty-command"),
        pytest.param(
            {"device_id": "job-0", "command": [""]}, 422, "must not be empty", id="empty-program"
        ),
        pytest.param({"selector": "group in (a"}, 422, "invalid selector", id="bad-selector"),
        pytest.param(
            {"selector": "group=none"},
            422,
            "matches no active device",
            id="selector-matches-nothing",
        ),
        pytest.param(
            {"device_id": "job-0", "deadline_s": 0}, 422, "deadline_s", id="zero-deadline"
        ),
        pytest.param(
            {"device_id": "job-0", "rollout": {"max_in_flight": 0}},
            422,
            "max_in_flight",
            id="bad-rollout",
        ),
        pytest.param({"device_id": "job-0", "id": "../x"}, 422, "id", id="bad-id"),
        pytest.param(
            {"device_id": "job-0", "id": "hello"}, 409, "already exists", id="id-used-before"
        ),
    ],
)
def test_bad_requests_are_refused_with_a_reason(
    stack: Stack, body: dict[str, Any], status: int, detail: str
) -> None:
    full = {"command": ["true"], "deadline_s": 5, **body}
    if "hello" in str(body):  # the first test's job id
        stack.hub.api.post("/jobs", json={**full, "id": "hello"})
    response = stack.hub.api.post("/jobs", json=full)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert detail in response.text


def test_unknown_jobs_are_404(stack: Stack) -> None:
    assert stack.hub.api.get("/jobs/never").status_code == 404
    assert stack.hub.api.post("/jobs/never/cancel").status_code == 404
    assert stack.hub.api.get("/jobs", params={"state": "bogus"}).status_code == 422


def test_a_viewer_reads_jobs_but_cannot_create_or_cancel_them(stack: Stack) -> None:
    made = stack.hub.api.post("/tokens", json={"name": "jobs-viewer", "role": "viewer"})
    assert made.status_code == 201, made.text
    with stack.hub.client(made.json()["token"]) as viewer:
        assert viewer.get("/jobs").status_code == 200
        body = {"command": ["true"], "deadline_s": 5, "device_id": "job-0"}
        assert viewer.post("/jobs", json=body).status_code == 403
        assert viewer.post("/jobs/hello/cancel").status_code == 403
