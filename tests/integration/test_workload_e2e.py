"""The workload runtime end to end: the real agent process, a real Mosquitto, the real hub.

Issue 13's scenarios with nothing played by the test but the hub's side: real
signed bundles whose program is a real process, the agent as ``driftless
agent run`` over mutual TLS, a broker stopped for a real outage, the hub's
API for update-lock overrides. Processes are counted by the runtime's marker
in ``/proc/<pid>/environ``, not by what the agent says about them.
"""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.broker import free_port
from edge_agent.core import (
    AgentCore,
    AgentState,
    Booted,
    Connected,
    Connecting,
    Publish,
)
from edge_agent.outbox import Outbox, OutboxLimits
from edge_agent.plan import workload_specs
from edge_agent.store import StateStore
from edge_agent.supervisor.machine import (
    CoreEvent,
    Exited,
    Probe,
    Spawn,
    Spawned,
    Supervise,
    Supervisor,
    SupervisorEvent,
    Tick,
)
from edge_agent.supervisor.spec import HealthSpec, RestartPolicy
from firmware_bundles.model import Backoff, RunSpec
from protocols import Birth, JobStatus, Reported, decode
from tests.integration.bundle_support import hub_with_root, register, upload, wait_phase
from tests.integration.workload_e2e_support import (
    CopyCounter,
    Partition,
    Rig,
    SessionPeer,
    get,
    sha256,
    web_run,
)
from tests.pki import TestBroker
from tests.support import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def rig(tmp_path: Path, broker: TestBroker) -> Iterator[Rig]:
    instance = Rig(tmp_path, broker, "e2e-1")
    try:
        yield instance
    finally:
        instance.close()


def versions(rig: Rig, workload: str) -> list[str]:
    return sorted(env["DRIFTLESS_VERSION"] for env in rig.copies(workload).values())


# ---------------------------------------------------------------- 1. SIGKILL mid-switch


@pytest.mark.parametrize("update", ["stop-then-start", "start-then-stop"])
def test_a_sigkill_of_the_agent_during_a_switch_leaves_exactly_one_copy(
    rig: Rig, update: str
) -> None:
    port = free_port()
    one = rig.bundle("web", "1.0.0", web_run(port))
    rig.agent.start()
    rig.wait_birth(1)
    rig.desire(1, [{"name": "web", "bundle": sha256(one)}])
    assert rig.finished(1).phase == "applied"
    assert versions(rig, "web") == ["1.0.0"]

    # 2.0.0 takes 1.5 s to count as healthy: the agent dies in that wait.
    new_port = port if update == "stop-then-start" else free_port()
    two = rig.bundle("web", "2.0.0", web_run(new_port, min_healthy_ms=1500, update=update))
    rig.desire(2, [{"name": "web", "bundle": sha256(two)}])
    wait_until(lambda: "2.0.0" in versions(rig, "web"), what="2.0.0 started")
    rig.agent.kill()
    state = StateStore(rig.agent.data_dir).load()
    assert state.applied_generation == 1  # killed after the switch, before the commit
    assert (rig.agent.data_dir / "supervisor" / "switch.json").exists()
    assert versions(rig, "web") == (
        ["2.0.0"] if update == "stop-then-start" else ["1.0.0", "2.0.0"]
    )

    counter = CopyCounter(lambda: len(rig.copies("web")))
    try:
        rig.agent.start()
        rig.wait_birth(2)
        # The retained document comes again: the interrupted generation is applied anew.
        report = rig.finished(2)
    finally:
        most = counter.stop()
    assert report.phase == "applied", report
    assert versions(rig, "web") == ["2.0.0"]
    (pid,) = rig.copies("web")
    assert get(new_port)["version"] == "2.0.0" and get(new_port)["pid"] == pid
    if update == "stop-then-start":
        assert most == 1, f"{most} copies of web at once after the restart"
    assert counter.samples > 10
    assert StateStore(rig.agent.data_dir).load().applied_generation == 2
    assert not (rig.agent.data_dir / "supervisor" / "switch.json").exists()


# ---------------------------------------------------------------- 2. autonomy


def outbox_events(rig: Rig) -> list[Reported]:
    """The workload events the agent keeps on disk while it cannot publish."""
    try:  # read only: OutboxStore.load would move a file it cannot read aside
        raw = json.loads((rig.agent.data_dir / "outbox.json").read_bytes())
    except FileNotFoundError:
        return []
    return [
        decode(base64.b64decode(e["payload"]), Reported)
        for e in raw["entries"]
        if e["lane"] == "event"
    ]


def crash_loop_run(delay_ms: int = 100) -> RunSpec:
    """Restarts ``delay_ms`` to 3 times that apart, up to 1,000 a minute: never giving up here."""
    return RunSpec(
        command=["bin/app"],
        min_healthy_ms=200,
        restart="on-failure",
        backoff=Backoff(
            attempts=1000,
            interval_s=60,
            delay_ms=delay_ms,
            max_delay_ms=3 * delay_ms,
            jitter_pct=0,
        ),
    )


def all_before(peer: SessionPeer, birth: Birth) -> list[int]:
    """The seqs of ``birth``'s boot as they arrived, once every one below the birth's has."""

    def arrived() -> list[int]:
        seqs = [m.seq for m in peer.in_order() if m.boot_epoch == birth.boot_epoch]
        return seqs if set(range(1, birth.seq)) <= set(seqs) else []

    return wait_until(arrived, what=f"every report of this boot before seq {birth.seq}")


def assert_in_order(arrived: list[int]) -> None:
    """Seq only grows in arrival order (a repeat of one seen is QoS 1's at-least-once)."""
    firsts = [s for i, s in enumerate(arrived) if s not in arrived[:i]]
    assert firsts == sorted(firsts), f"out of order: {arrived}"
    assert firsts == list(range(1, max(firsts) + 1)), f"gaps: {arrived}"


def test_workloads_keep_running_through_a_broker_outage_and_their_events_arrive_in_order(
    rig: Rig, broker: TestBroker, tmp_path: Path
) -> None:
    flag = tmp_path / "crash-now"
    steady = rig.bundle("steady", "1.0.0", RunSpec(command=["bin/app"], min_healthy_ms=200))
    crashy = rig.bundle("crashy", "1.0.0", crash_loop_run())
    rig.agent.start()
    rig.wait_birth(1)
    rig.desire(
        1,
        [
            {"name": "steady", "bundle": sha256(steady)},
            {"name": "crashy", "bundle": sha256(crashy), "env": {"CRASH_FLAG": str(flag)}},
        ],
    )
    assert rig.finished(1).phase == "applied"
    (steady_pid,) = rig.copies("steady")

    broker.stop()  # a real outage: the broker is gone (its sessions saved)
    outage = time.monotonic()
    wait_until(lambda: '"disconnected"' in rig.agent.log(), what="the agent offline")
    flag.touch()  # crashy starts crash-looping while nobody can hear about it
    seen: set[int] = set()

    def restarted_offline() -> bool:
        seen.update(rig.copies("crashy"))
        crashes = [r for r in outbox_events(rig) if r.workloads and r.workloads[0].name == "crashy"]
        return len(seen) >= 4 and len(crashes) >= 3

    wait_until(restarted_offline, timeout_s=15, interval_s=0.02, what="crash loop while offline")
    assert list(rig.copies("steady")) == [steady_pid]  # untouched throughout
    kept = [r.workloads[0] for r in outbox_events(rig) if r.workloads]
    restarts = [w.restarts for w in kept if w.state == "starting"]
    assert restarts == list(range(1, len(restarts) + 1)), kept  # every exit, in order, on disk
    flag.unlink()  # the fault clears: the next start stays up
    broker.start()
    outage_s = time.monotonic() - outage
    assert rig.peer is not None
    peer = rig.peer
    birth = rig.wait_birth(2)
    assert birth.events_dropped == 0

    # What the outbox kept leaves before the birth: every seq below the birth's arrives.
    assert_in_order(all_before(peer, birth))
    events = [
        r.workloads[0]
        for r in peer.reports()
        if r.boot_epoch == birth.boot_epoch and r.workloads and len(r.workloads) == 1
    ]
    crashes = [w for w in events if w.name == "crashy" and w.state == "starting"]
    assert [w.restarts for w in crashes] == list(range(1, len(crashes) + 1))
    assert {w.last_exit_code for w in crashes} == {3}
    assert len(crashes) >= len(seen) - 1 >= 3
    assert [w for w in kept if w.state == "starting"] == crashes[: len(restarts)]
    assert not [w for w in events if w.name == "steady"]  # nothing to say about it
    assert list(rig.copies("steady")) == [steady_pid]
    wait_until(lambda: len(rig.copies("crashy")) == 1, what="one crashy running")
    assert outage_s < 20


def test_events_made_while_a_partition_goes_unnoticed_reach_the_hub_in_order(
    tmp_path: Path, broker: TestBroker
) -> None:
    """A partition, not a closed broker: the agent's socket stays open and its reports go
    into it until the keepalive (5 s) notices; the rest go to the outbox. Both reach the
    hub after the partition heals, in the order they were made."""
    partition = Partition(broker.port)
    rig = Rig(tmp_path, broker, "e2e-cut", agent_args=("--keepalive-s", "5"))
    argv = rig.agent.argv
    argv[argv.index("--broker") + 1] = f"mqtts://127.0.0.1:{partition.port}"
    flag = tmp_path / "crash-now"
    try:
        crashy = rig.bundle("crashy", "1.0.0", crash_loop_run(delay_ms=300))
        rig.agent.start()
        rig.wait_birth(1)
        entry = {"name": "crashy", "bundle": sha256(crashy), "env": {"CRASH_FLAG": str(flag)}}
        rig.desire(1, [entry])
        assert rig.finished(1).phase == "applied"
        partition.cut()
        flag.touch()  # events now go into a connection that no longer carries anything
        wait_until(lambda: '"disconnected"' in rig.agent.log(), timeout_s=30, what="keepalive")
        wait_until(lambda: len(outbox_events(rig)) >= 2, what="events kept in the outbox")
        flag.unlink()
        partition.heal()
        assert rig.peer is not None
        birth = rig.wait_birth(2, timeout_s=40)
        assert birth.events_dropped == 0
        assert_in_order(all_before(rig.peer, birth))
    finally:
        rig.close()
        partition.close()


def test_an_hour_offline_in_simulated_time_stays_within_the_outbox_bounds() -> None:
    """The pure supervisor and core with a simulated clock: an hour of a crash loop
    (up 1 s, down for the backoff, restarted every few seconds) while offline."""
    limits = OutboxLimits()
    core = AgentCore(
        "sim-1", AgentState(applied_generation=1), "t", supervises=True, outbox=Outbox(limits)
    )
    core.seed_workloads(
        tuple(
            workload_specs(
                {"workloads": [{"name": n, "bundle": "ab" * 32} for n in ("steady", "crashy")]}
            )
        )
    )
    core.handle(Booted(0.0))
    core.handle(Connecting(0.0))  # and never connected: the broker is away for the hour
    machine = Supervisor(jitter=random.Random(13).random, floor_s=1.0)
    policy = RestartPolicy(attempts=1000, interval_s=600, delay_s=1.0, max_delay_s=2.0)
    health = HealthSpec(min_healthy_s=5.0, deadline_s=60.0)
    crashes_at: dict[str, float] = {}
    pending: list[SupervisorEvent] = [
        Supervise("steady.g1", "steady", policy, health, 0.0),
        Supervise("crashy.g1", "crashy", policy, health, 0.0),
    ]
    to_core: list[CoreEvent] = []
    now, hour, pid = 0.0, 3600.0, 100
    biggest = 0
    while now < hour:
        while pending:
            for action in machine.handle(pending.pop(0)):
                if isinstance(action, Spawn):
                    pid += 1
                    pending.append(Spawned(action.instance, pid, now))
                    if action.workload == "crashy":
                        crashes_at[action.instance] = now + 1.0  # up one second, then exit 3
                elif not isinstance(action, Probe):
                    to_core.append(action)
        for event in to_core:
            core.handle(event)
            biggest = max(biggest, core.outbox.event_bytes)
            assert len(core.outbox) <= limits.max_events + 1  # the events and one state entry
            assert core.outbox.event_bytes <= limits.max_event_bytes
        to_core.clear()
        wake = machine.next_wakeup()
        crash = min(crashes_at.values(), default=hour)
        now = min(wake if wake is not None else hour, crash, hour)
        if crashes_at and crash <= now:
            instance = min(crashes_at, key=crashes_at.__getitem__)
            del crashes_at[instance]
            pending.append(Exited(instance, 3, now))
        else:
            pending.append(Tick(now))

    crashy, steady = machine.view("crashy.g1"), machine.view("steady.g1")
    assert crashy is not None and steady is not None
    assert steady.state == "running" and steady.healthy and steady.restarts == 0
    assert crashy.state in ("running", "backoff", "spawning")  # never gave up
    exits = crashy.restarts
    assert exits > limits.max_events  # an hour makes more events than the outbox holds
    dropped = core.outbox.dropped
    assert dropped == exits + 1 - limits.max_events  # steady's one health event is kept too

    actions = core.handle(Connected(hour + 1, session_present=True))
    sent = [a for a in actions if isinstance(a, Publish)]
    reports = [decode(a.payload, Reported) for a in sent if a.topic.endswith("/reported")]
    (birth,) = [decode(a.payload, Birth) for a in sent if a.topic.endswith("/birth")]
    assert birth.events_dropped == dropped
    seqs = [r.seq for r in reports]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and birth.seq > seqs[-1]
    assert seqs[0] == dropped + 1  # the oldest went, the newest are all there
    crash_restarts = [r.workloads[0].restarts for r in reports if r.workloads]
    assert crash_restarts[-1] == exits
    assert crash_restarts == list(range(exits - len(crash_restarts) + 1, exits + 1))
    assert biggest <= limits.max_event_bytes


# ---------------------------------------------------------------- 4. one-shot jobs

JOB = """\
import os, time
with open(os.environ["RUNS"], "a") as runs:
    runs.write(os.environ["DRIFTLESS_JOB_ID"] + "\\n")
print("DRIFTLESS_PROGRESS 40 calibrating", flush=True)
time.sleep(1.1)
print("DRIFTLESS_PROGRESS 90 writing", flush=True)
print("calibrated", flush=True)
"""


def job(rig: Rig, job_id: str, runs: Path) -> dict[str, object]:
    return {
        "id": job_id,
        "command": [sys.executable, "-c", JOB],
        "deadline_s": 30,
        "env": {"RUNS": str(runs), "E2E_RIG": str(rig.tmp)},
    }


def job_reports(rig: Rig, job_id: str) -> list[tuple[int, JobStatus]]:
    assert rig.peer is not None
    return [(r.boot_epoch, j) for r in rig.peer.reports() for j in r.jobs or () if j.id == job_id]


def test_a_one_shot_job_runs_once_reports_progress_and_is_not_run_after_a_restart(
    rig: Rig, tmp_path: Path
) -> None:
    runs = tmp_path / "runs.txt"
    rig.agent.start()
    first_boot = rig.wait_birth(1).boot_epoch
    rig.desire(1, [], jobs=[job(rig, "calib-1", runs)])
    done = wait_until(
        lambda: [j for _, j in job_reports(rig, "calib-1") if j.state != "running"],
        what="calib-1 finished",
    )
    assert [(j.state, j.exit_code, j.progress) for j in done] == [("succeeded", 0, 90)]
    assert done[0].log_tail is not None and "calibrated" in done[0].log_tail
    updates = [j for _, j in job_reports(rig, "calib-1")]
    assert (updates[0].state, updates[0].progress) == ("running", 0)
    progress = [j.progress for j in updates]
    assert progress == sorted(progress) and 40 in progress  # reported in order
    assert runs.read_text() == "calib-1\n"

    rig.agent.kill()  # a crash, then the retained document again at the next connect
    rig.agent.start()
    assert rig.wait_birth(2).boot_epoch > first_boot
    rig.desire(2, [], jobs=[job(rig, "calib-1", runs), job(rig, "calib-2", runs)])
    wait_until(
        lambda: [j for _, j in job_reports(rig, "calib-2") if j.state == "succeeded"],
        what="calib-2 finished",
    )
    # The jobs are offered in order: calib-1 (twice: retained generation 1, then 2) came first.
    assert runs.read_text() == "calib-1\ncalib-2\n"
    assert {epoch for epoch, _ in job_reports(rig, "calib-1")} == {first_boot}


# ---------------------------------------------------------------- 5. removal


def test_removing_a_workload_leaves_no_process_and_no_files(rig: Rig) -> None:
    port = free_port()
    web = rig.bundle("web", "1.0.0", web_run(port))
    side = rig.bundle("side", "1.0.0", RunSpec(command=["bin/app"], min_healthy_ms=200))
    rig.agent.start()
    rig.wait_birth(1)
    side_entry = {"name": "side", "bundle": sha256(side)}
    rig.desire(1, [{"name": "web", "bundle": sha256(web), "config": {"child": True}}, side_entry])
    assert rig.finished(1).phase == "applied"
    web_pids = set(rig.copies("web"))
    assert len(web_pids) == 2  # the workload and the child it left in its group
    (side_pid,) = rig.copies("side")
    data = rig.agent.data_dir
    assert (data / "workloads" / "web" / "config.json").exists()
    assert (data / "supervisor" / "logs" / "web" / "current.log").exists()

    rig.desire(2, [side_entry])
    report = rig.finished(2)
    assert report.phase == "applied"
    assert report.workloads is not None
    assert {(w.name, w.state) for w in report.workloads} == {
        ("side", "healthy"),
        ("web", "removed"),
    }
    assert rig.copies("web") == {}
    for pid in web_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (data / "workloads" / "web").exists()
    assert not (data / "supervisor" / "logs" / "web").exists()
    assert '"web' not in (data / "supervisor" / "processes.json").read_text()
    assert list(rig.copies("side")) == [side_pid]  # the other one was left alone


# ---------------------------------------------------------------- 3. update locks, with the hub

LOCKED = "e2e-locks"


def lock_cli(rig: Rig, *args: str) -> None:
    """``driftless agent lock …`` as a workload's shell would run it."""
    result = subprocess.run(
        [sys.executable, "-m", "driftless.cli", "agent", "lock", *args,
         "--data-dir", str(rig.agent.data_dir), "--workload", "web"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_held_update_lock_defers_a_switch_until_released_expired_or_overridden(
    tmp_path: Path, broker: TestBroker
) -> None:
    rig = Rig(tmp_path, broker, LOCKED, chunks=False, peer=False)
    hub = hub_with_root(tmp_path / "hub", broker, rig.keys)
    try:
        register(hub, LOCKED)
        port = free_port()
        sha = upload(hub, rig.bundle("web", "1.0.0", web_run(port)))

        def desire(**config: object) -> int:
            entry = {"name": "web", "bundle": sha, "config": config}
            response = hub.api.put(
                f"/devices/{LOCKED}/desired", json={"config": {"workloads": [entry]}}
            )
            response.raise_for_status()
            generation: int = response.json()["desired_generation"]
            return generation

        def waits_for(holder: str) -> int:
            return sum(
                1
                for line in rig.agent.log().splitlines()
                if "switch waits for an update lock" in line and f"held by {holder} " in line
            )

        rig.agent.start()
        # 1.0.0 takes its own lock at start (the file API), for 10 minutes.
        first = desire(hold="backup", lease_s=600)
        assert wait_phase(hub, LOCKED, first)["phase"] == "applied"
        locks = wait_until(lambda: hub.device(LOCKED)["locks"], what="the lock reported")
        assert [(x["workload"], x["holder"], x["overridden"]) for x in locks] == [
            ("web", "backup", False)
        ]
        assert locks[0]["until"] > time.time() + 500
        held_pid = get(port)["pid"]

        # Held: the switch waits (the old process serves on) until the holder releases.
        second = desire(step=2)
        wait_until(lambda: waits_for("backup"), what="the switch waiting for backup")
        assert get(port)["pid"] == held_pid
        status = hub.device(LOCKED)["status"]  # at most under way ("applying"), not finished
        assert (status.get("generation"), status.get("phase")) != (second, "applied")
        lock_cli(rig, "release", "--holder", "backup")
        assert wait_phase(hub, LOCKED, second, timeout_s=20)["phase"] == "applied"
        assert get(port)["config"] == {"step": 2}

        # Expired: a 3 s lease nobody releases blocks for 3 s, not longer.
        lock_cli(rig, "take", "--holder", "cron", "--lease-s", "3")
        lease_end = (rig.agent.data_dir / "locks" / "web.lock").stat().st_mtime + 3
        third = desire(step=3)
        wait_until(lambda: waits_for("cron"), what="the switch waiting for cron")
        assert wait_phase(hub, LOCKED, third, timeout_s=20)["phase"] == "applied"
        assert get(port)["started"] >= lease_end - 0.01  # mtime: the kernel's coarse clock
        assert (rig.agent.data_dir / "locks" / "web.lock").exists()  # expired, not released

        # Overridden: the hub's signed override lifts a lock held for 10 minutes.
        lock_cli(rig, "take", "--holder", "ops", "--lease-s", "600")
        fourth = desire(step=4)
        wait_until(lambda: waits_for("ops"), what="the switch waiting for ops")
        response = hub.api.post(
            f"/devices/{LOCKED}/lock-override", json={"duration_s": 600, "workloads": ["web"]}
        )
        assert response.status_code == 200, response.text
        fifth = response.json()["desired_generation"]
        assert fifth == fourth + 1
        assert wait_phase(hub, LOCKED, fifth, timeout_s=20)["phase"] == "applied"
        assert get(port)["config"] == {"step": 4}
        history = [(h.generation, h.ok) for h in StateStore(rig.agent.data_dir).load().history]
        assert history[-2:] == [(fourth, True), (fifth, True)]
        locks = wait_until(
            lambda: [x for x in hub.device(LOCKED)["locks"] or () if x["overridden"]],
            what="the overridden lock reported",
        )
        assert [(x["holder"], x["overridden"]) for x in locks] == [("ops", True)]
    finally:
        hub.close()
        rig.close()
