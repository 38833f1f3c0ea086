"""The paho driver without a broker: its step thread runs steps and fires the core's timers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from edge_agent.core import Event, SetTimer, StepDone, Switch, TimerFired
from edge_agent.driver import AgentDriver
from edge_agent.outbox import Lane
from protocols import Desired
from tests.support import wait_until


def quiet_driver(tmp_path: Path) -> tuple[AgentDriver, list[Event]]:
    driver = AgentDriver(device_id="d1", broker_url="mqtt://127.0.0.1:1", data_dir=tmp_path)
    seen: list[Event] = []
    handle = driver.core.handle

    def spy(event: Event) -> list[object]:
        seen.append(event)
        return handle(event)  # type: ignore[return-value]

    driver.core.handle = spy  # type: ignore[assignment,method-assign]
    return driver, seen


def test_the_step_thread_fires_a_timer_the_core_asked_for(tmp_path: Path) -> None:
    driver, seen = quiet_driver(tmp_path)
    worker = threading.Thread(target=driver._step_worker, daemon=True)
    worker.start()
    try:
        with driver._lock:
            driver._executors.run(SetTimer("health:3", time.time() + 0.05))
        wait_until(
            lambda: [e.name for e in seen if isinstance(e, TimerFired)] == ["health:3"],
            timeout_s=5,
            what="the timer",
        )
    finally:
        driver._steps.put(None)
        worker.join(timeout=5)


def test_the_step_thread_runs_a_switch_and_answers_step_done(tmp_path: Path) -> None:
    driver, seen = quiet_driver(tmp_path)
    worker = threading.Thread(target=driver._step_worker, daemon=True)
    worker.start()
    step = Switch(Desired(device_id="d1", generation=4, config={"k": 1}, issued_at=1.0))
    try:
        with driver._lock:
            driver._executors.run(step)
        wait_until(
            lambda: [e.step for e in seen if isinstance(e, StepDone)] == [step],
            timeout_s=5,
            what="StepDone",
        )
        assert (tmp_path / "config.json").exists()
    finally:
        driver._steps.put(None)
        worker.join(timeout=5)


def test_an_outbox_kept_on_disk_is_loaded_by_the_next_agent(tmp_path: Path) -> None:
    first, _ = quiet_driver(tmp_path)
    first.core.outbox.put(Lane.STATE, "reported", "t", b"{}")
    first.outbox_store.save(first.core.outbox.snapshot())
    again = AgentDriver(device_id="d1", broker_url="mqtt://127.0.0.1:1", data_dir=tmp_path)
    assert [e.payload for e in again.core.outbox.snapshot().entries] == [b"{}"]
