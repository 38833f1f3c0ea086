"""The workload runtime end to end: the real agent process, a real Mosquitto, the real hub.

Issue 13's scenarios with nothing played by the test but the hub's side: real
signed bundles whose program is a real process, the agent as ``driftless
agent run`` over mutual TLS, a broker stopped for a real outage, the hub's
API for update-lock overrides. Processes are counted by the runtime's marker
in ``/proc/<pid>/environ``, not by what the agent says about them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.broker import free_port
from edge_agent.store import StateStore
from tests.integration.workload_e2e_support import CopyCounter, Rig, get, sha256, web_run
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
    assert get(new_port) == {"version": "2.0.0", "pid": pid, "config": {}}
    if update == "stop-then-start":
        assert most == 1, f"{most} copies of web at once after the restart"
    assert counter.samples > 10
    assert StateStore(rig.agent.data_dir).load().applied_generation == 2
    assert not (rig.agent.data_dir / "supervisor" / "switch.json").exists()
