"""Firmware A/B slots: the pure decisions as tables, the slots on disk with real signed
bundles and real health-check processes, and the agent SIGKILLed at every point of a
switch and a boot (the state file is never torn; every boot runs a confirmed slot or one
within its boot limit)."""

from __future__ import annotations

import ast
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from edge_agent.firmware import (
    Fallback,
    FirmwareRefused,
    FirmwareSettings,
    HealthSpec,
    SlotContent,
    SlotState,
    booted_ok,
    check_commit,
    confirm,
    decide_boot,
    fall_back,
    plan_install,
    plan_switch,
    roll_back,
)
from edge_agent.runtime import ApplyError, WorkloadApplier
from edge_agent.settings import BundleSettings
from edge_agent.slots import FirmwareError, FirmwareSlots
from firmware_bundles import archive
from firmware_bundles.model import HealthCheck, RunSpec
from protocols import Desired
from tests.unit.hub_bundles_support import sha256_of
from tests.unit.test_bundles_support import DAY, NOW, Fleet

# ---------------------------------------------------------------- the pure decisions

CHECK = HealthSpec(command=["./health"], timeout_s=5, deadline_s=5)


def fw(version: str, generation: int = 0) -> SlotContent:
    return SlotContent(
        name="os",
        version=version,
        payload_sha256=version * 64 if len(version) == 1 else "0" * 64,
        health=CHECK,
        generation=generation,
    )


V1, V2 = fw("1", 1), fw("2", 2)
CONFIRMED = SlotState(active="b", b=V1)  # v1 confirmed in b; a empty
ON_TRIAL = SlotState(active="a", upgrade_available=True, bootcount=1, a=V2, b=V1)
AT_LIMIT = SlotState(active="a", upgrade_available=True, bootcount=3, a=V2, b=V1)
GAVE_UP = Fallback(at=1.0, reason="r", slot="a", generation=2, version="2")
FELL_BACK = SlotState(active="b", a=V2, b=V1, last_fallback=GAVE_UP)  # generation 2 fell back


@pytest.mark.parametrize(
    ("state", "action", "active", "pending", "bootcount"),
    [
        pytest.param(SlotState(), "run", "a", False, 0, id="fresh-device-runs-a"),
        pytest.param(CONFIRMED, "run", "b", False, 0, id="confirmed-runs-as-is"),
        pytest.param(ON_TRIAL, "check", "a", True, 2, id="on-trial-counted-then-checked"),
        pytest.param(AT_LIMIT, "gave_up", "b", False, 0, id="past-boot-limit-falls-back"),
    ],
)
def test_boot_decision_table(
    state: SlotState, action: str, active: str, pending: bool, bootcount: int
) -> None:
    decision = decide_boot(state, now=100.0)
    assert decision.action == action
    after = decision.state
    assert (after.active, after.upgrade_available, after.bootcount) == (active, pending, bootcount)
    assert booted_ok(after)
    if action == "gave_up":
        assert after.last_fallback == Fallback(
            at=100.0,
            reason="slot a started 3 times without being confirmed (boot limit 3)",
            slot="a",
            generation=2,
            version="2",
        )


def test_confirm_and_fall_back_leave_no_upgrade_pending() -> None:
    assert confirm(ON_TRIAL) == SlotState(active="a", a=V2, b=V1)
    fell = fall_back(ON_TRIAL, "health check failed: exit status 3", 7.0)
    assert (fell.active, fell.upgrade_available, fell.bootcount) == ("b", False, 0)
    assert fell.last_fallback is not None and fell.last_fallback.generation == 2
    assert confirm(CONFIRMED) is CONFIRMED and fall_back(CONFIRMED, "x", 1.0) is CONFIRMED


@pytest.mark.parametrize(
    ("state", "firmware", "slot", "write"),
    [
        pytest.param(SlotState(), V1, "b", True, id="fresh-device-writes-b"),
        pytest.param(CONFIRMED, V2, "a", True, id="new-firmware-to-the-inactive-slot"),
        pytest.param(CONFIRMED, fw("1", 9), "b", False, id="active-holds-it-nothing-to-do"),
        pytest.param(SlotState(active="b", a=V2, b=V1), V2, "a", False, id="inactive-reused"),
    ],
)
def test_install_target_is_never_the_active_slot_unless_it_holds_it(
    state: SlotState, firmware: SlotContent, slot: str, write: bool
) -> None:
    plan = plan_install(state, firmware)
    assert (plan.slot, plan.write) == (slot, write)
    if write:
        assert plan.slot != state.active and plan.state.content(plan.slot) is None
    else:
        assert plan.state is state


def test_nothing_installs_while_a_slot_is_on_trial() -> None:
    with pytest.raises(FirmwareRefused, match="slot a is on trial"):
        plan_install(ON_TRIAL, fw("3"))


@pytest.mark.parametrize(
    ("state", "slot", "generation", "restart", "error"),
    [
        pytest.param(SlotState(active="b", a=V2, b=V1), "a", 2, True, None, id="inactive-on-trial"),
        pytest.param(CONFIRMED, "b", 5, False, None, id="already-active-no-restart"),
        pytest.param(CONFIRMED, "a", 2, False, "holds no complete firmware", id="empty-slot"),
        pytest.param(ON_TRIAL, "b", 3, False, "on trial already", id="pending-refused"),
        pytest.param(FELL_BACK, "a", 2, False, None, id="fell-back-generation-never-switches"),
        pytest.param(FELL_BACK, "a", 3, True, None, id="newer-generation-may-retry"),
    ],
)
def test_switch_table(
    state: SlotState, slot: str, generation: int, restart: bool, error: str | None
) -> None:
    if error is not None:
        with pytest.raises(FirmwareRefused, match=error):
            plan_switch(state, slot, generation)  # type: ignore[arg-type]
        return
    plan = plan_switch(state, slot, generation)  # type: ignore[arg-type]
    assert plan.restart is restart
    if restart:
        after = plan.state
        assert (after.active, after.upgrade_available, after.bootcount) == (slot, True, 0)
        assert after.content(after.active).generation == generation  # type: ignore[union-attr]
        assert after.content(after.inactive) == state.content(after.inactive)


def test_commit_needs_a_confirmed_slot_and_fails_with_the_fallback_reason() -> None:
    check_commit(CONFIRMED, 1)
    with pytest.raises(FirmwareRefused, match="restart after the switch has not happened"):
        check_commit(ON_TRIAL, 2)
    fell = fall_back(ON_TRIAL, "health check failed: exit status 3: no sensor bus", 7.0)
    with pytest.raises(FirmwareRefused, match="firmware 2 in slot a fell back to slot b: health"):
        check_commit(fell, 2)
    check_commit(fell, 3)  # a newer generation is not blamed for it


def test_roll_back_takes_only_a_slot_still_on_trial_off_it() -> None:
    assert roll_back(ON_TRIAL, 2) == SlotState(active="b", a=V2, b=V1, bootcount=0)
    assert roll_back(ON_TRIAL, 9) is ON_TRIAL
    assert roll_back(CONFIRMED, 1) is CONFIRMED


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="boot_limit"):
        FirmwareSettings(boot_limit=0)
    with pytest.raises(ValueError, match="health_deadline_s"):
        FirmwareSettings(health_deadline_s=0)


def test_the_decisions_import_no_io() -> None:
    """Invariant 8: firmware.py is sans-I/O, like the other cores."""
    source = (Path(__file__).parents[2] / "edge_agent" / "firmware.py").read_text()
    banned = {"paho", "aiomqtt", "asyncio", "socket", "subprocess", "threading", "os", "time"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [(node.module or "").split(".")[0]]
        else:
            continue
        assert not banned.intersection(names), names


# ---------------------------------------------------------------- the slots on disk

GOOD = "#!/bin/sh\nexit 0\n"
BAD = "#!/bin/sh\necho 'sensor bus not found' >&2\nexit 3\n"


class Device:
    """A data directory with a trusted root, real signed firmware bundles in its cache,
    and the runtime the driver builds (``WorkloadApplier``, firmware dispatched to slots)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.fleet = Fleet()
        self.data = tmp_path / "data"
        self.restarts = 0
        self.applier = self._applier()
        self.built = 0

    def _applier(self) -> WorkloadApplier:
        return WorkloadApplier(
            self.data,
            settings=BundleSettings(clock_skew_s=0),
            trusted_root=self.fleet.trusted(),
            agent_version="0.1.0",
            clock=lambda: float(NOW),
            request_restart=self._restart,
        )

    def _restart(self) -> None:
        self.restarts += 1

    @property
    def slots(self) -> FirmwareSlots:
        return self.applier.firmware

    def firmware(
        self,
        version: str,
        *,
        health: str | None = GOOD,
        run: RunSpec | None = None,
        security_version: int = 1,
        files: dict[str, str] | None = None,
    ) -> str:
        """A signed firmware bundle in the cache; ``health``: the ``./health`` script."""
        self.built += 1
        src = self.tmp / f"src{self.built}"
        src.mkdir()
        (src / "version.txt").write_text(version)
        for name, text in (files or {}).items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_text(text)
            (src / name).chmod(0o755)
        if health is not None:
            (src / "health").write_text(health)
            (src / "health").chmod(0o755)
        out = self.tmp / f"fw{self.built}.bundle"
        archive.build(
            src,
            name="os",
            version=version,
            security_version=security_version,
            kind="firmware",
            architectures=["any"],
            created=NOW - DAY,
            expires=NOW + DAY,
            out=out,
            run=run,
        )
        for key in self.fleet.release_keys:
            archive.sign(out, key)
        sha = sha256_of(out)
        self.applier.cache.prepare()
        os.replace(out, self.applier.cache.path(sha))
        return sha

    def desired(self, generation: int, **slots: str) -> Desired:
        config = {"workloads": [{"name": n, "bundle": s} for n, s in slots.items()]}
        return Desired(device_id="d", generation=generation, config=config, issued_at=1.0)

    def apply(self, generation: int, **slots: str) -> None:
        """Install and switch, as the core's steps do."""
        self.applier.apply(self.desired(generation, **slots))

    def reboot(self) -> None:
        """What the agent does when it starts again: a new runtime, then the boot."""
        self.applier = self._applier()
        while self.slots.boot().restart:
            self.applier = self._applier()

    def slot_version(self, slot: str) -> str:
        return (self.data / "firmware" / f"slot-{slot}" / "version.txt").read_text()

    def state(self) -> SlotState:
        return msgspec.json.decode(self.slots.state_path.read_bytes(), type=SlotState)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return Device(tmp_path)


def confirmed_v1(device: Device) -> str:
    """Generation 1: firmware 1.0 written to slot b, switched, restarted, confirmed."""
    sha = device.firmware("1.0")
    device.apply(1, os=sha)
    assert device.restarts == 1
    device.reboot()
    device.applier.commit(1)
    return sha


def test_a_good_firmware_goes_to_the_inactive_slot_and_is_confirmed_after_the_restart(
    device: Device,
) -> None:
    sha = device.firmware("1.0")
    device.apply(1, os=sha)
    state = device.state()
    assert (state.active, state.upgrade_available, state.bootcount) == ("b", True, 0)
    assert device.slot_version("b") == "1.0" and device.restarts == 1
    with pytest.raises(ApplyError, match="restart after the switch has not happened"):
        device.applier.commit(1)  # not before the restart's health check
    assert not (device.data / "workloads").exists()  # firmware is not a workload directory

    device.reboot()
    assert device.state().upgrade_available is False and device.slots.running() == ("b", "1.0")
    # After the restart the retained document comes again: install and switch are no-ops.
    inode = (device.data / "firmware" / "slot-b").stat().st_ino
    device.apply(1, os=sha)
    device.applier.commit(1)
    assert device.restarts == 1
    assert (device.data / "firmware" / "slot-b").stat().st_ino == inode

    # The next firmware goes to the other slot; the running one is not touched.
    two = device.firmware("2.0", security_version=2)
    device.apply(2, os=two)
    assert device.slot_version("a") == "2.0" and device.slot_version("b") == "1.0"
    assert (device.data / "firmware" / "slot-b").stat().st_ino == inode
    device.reboot()
    device.applier.commit(2)
    assert device.slots.running() == ("a", "2.0")
    assert device.applier.security.load() == {"os": 2}


def test_a_firmware_that_fails_its_health_check_falls_back_to_the_old_slot(
    device: Device,
) -> None:
    confirmed_v1(device)
    bad = device.firmware("2.0", health=BAD)
    device.apply(2, os=bad)
    assert device.state().active == "a" and device.restarts == 2
    outcome = device.slots.boot()
    assert outcome.event == "fell_back" and outcome.restart
    assert (outcome.slot, outcome.version) == ("b", "1.0")
    assert outcome.reason == "health check failed: exit status 3: sensor bus not found"
    device.reboot()  # the restart into the old slot
    assert device.slots.running() == ("b", "1.0")

    # The retained document again: no second switch, and the commit fails with the reason.
    device.apply(2, os=bad)
    assert device.restarts == 2
    with pytest.raises(FirmwareError, match=r"firmware 2\.0 in slot a fell back to slot b: health"):
        device.applier.commit(2)
    device.applier.roll_back(2, 1)  # the core's RollBack: nothing left to undo
    assert device.slots.running() == ("b", "1.0")

    # A newer generation may try it again (a retry is a new desired change).
    device.apply(3, os=bad)
    assert device.restarts == 3 and device.state().upgrade_available


def test_a_health_check_past_its_deadline_is_killed_with_its_children(device: Device) -> None:
    confirmed_v1(device)
    hang = RunSpec(
        command=["bin/fw"],
        health=HealthCheck(command=["bin/check"], timeout_s=1, retries=0),
        health_deadline_s=1,
    )
    script = '#!/bin/sh\nsleep 60 &\necho $! > "$DRIFTLESS_FIRMWARE_DIR/../child.pid"\nsleep 60\n'
    sha = device.firmware("2.0", health=None, run=hang, files={"bin/check": script})
    device.apply(2, os=sha)
    started = time.monotonic()
    outcome = device.slots.boot()
    assert time.monotonic() - started < 5
    assert outcome.event == "fell_back"
    assert outcome.reason == "health check failed: no answer within 1 s"
    child = int((device.data / "firmware" / "child.pid").read_text())
    assert not alive(child)  # the check's own child went with it


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for a reaper that is not ours does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_the_manifests_health_check_runs_in_the_slot_with_the_slot_in_its_environment(
    device: Device,
) -> None:
    spec = RunSpec(command=["bin/fw"], health=HealthCheck(command=["bin/check"], retries=0))
    seen = '#!/bin/sh\necho "$DRIFTLESS_FIRMWARE_SLOT $DRIFTLESS_FIRMWARE_VERSION $PWD" > ../seen\n'
    sha = device.firmware("1.0", health=None, run=spec, files={"bin/check": seen})
    device.apply(1, os=sha)
    assert device.slots.boot().event == "confirmed"
    slot_dir = device.data / "firmware" / "slot-b"
    assert (device.data / "firmware" / "seen").read_text() == f"b 1.0 {slot_dir}\n"


def test_a_firmware_without_a_health_check_is_refused_at_install(device: Device) -> None:
    sha = device.firmware("1.0", health=None)
    with pytest.raises(ApplyError, match="declares no health check"):
        device.apply(1, os=sha)
    assert device.restarts == 0
    assert device.state() == SlotState()  # no slot names it
    assert not (device.data / "firmware" / "slot-b").exists()


def test_one_firmware_per_generation(device: Device) -> None:
    one, two = device.firmware("1.0"), device.firmware("2.0")
    with pytest.raises(ApplyError, match="a device runs one firmware; generation 1 has"):
        device.apply(1, os=one, modem=two)


def test_an_agent_that_cannot_restart_itself_does_not_switch(device: Device) -> None:
    sha = device.firmware("1.0")
    device.applier.firmware.request_restart = None
    with pytest.raises(ApplyError, match="cannot restart itself"):
        device.apply(1, os=sha)
    assert device.state().upgrade_available is False


def test_an_unreadable_state_file_is_moved_aside(device: Device) -> None:
    confirmed_v1(device)
    device.slots.state_path.write_bytes(b'{"format": 1, "active": "c"}')
    assert device.slots.boot().event == "booted"
    assert device.slots.state_path.with_suffix(".corrupt").exists()
    assert device.slots.load() == SlotState()


def test_a_device_without_firmware_boots_without_writing_anything(device: Device) -> None:
    assert device.slots.boot().event == "booted"
    assert device.slots.running() is None
    assert not (device.data / "firmware").exists()


# ---------------------------------------------------------------- SIGKILL at every point


MUTATIONS = ("replace", "rename", "fsync", "unlink", "rmdir", "mkdir", "symlink")


def killed_at(point: int, work: Callable[[], None]) -> bool:
    """Run ``work`` in a forked child that SIGKILLs itself just before its ``point``-th
    file-system change; True if it was killed, False if the work finished first."""
    pid = os.fork()
    if pid == 0:  # the child: count every mutation, die at the chosen one
        code = 0
        try:
            seen = [0]

            def hooked(real: Callable[..., object]) -> Callable[..., object]:
                def call(*args: object, **kwargs: object) -> object:
                    seen[0] += 1
                    if seen[0] == point:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(*args, **kwargs)

                return call

            for name in MUTATIONS:
                setattr(os, name, hooked(getattr(os, name)))
            work()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the work failed without being killed"
    return False


def every_kill_point(work: Callable[[], None], reset: Callable[[], None]) -> Iterator[int]:
    """Kill points 1, 2, ... until ``work`` finishes; ``reset`` runs (here) before each."""
    point = 1
    while True:
        reset()
        if not killed_at(point, work):
            return
        yield point
        point += 1


@pytest.mark.parametrize("health", [GOOD, BAD], ids=["good-firmware", "bad-firmware"])
def test_killed_at_every_point_of_switch_and_boot(tmp_path: Path, health: str) -> None:
    """Generation 2 (firmware 2.0 into slot a) is installed, switched and booted in a child
    killed before each file-system change in turn; after every kill the state file reads
    whole, the next boots run only a confirmed slot or one within its boot limit, and the
    retained document applied again ends where a run without a kill ends."""
    device = Device(tmp_path)
    confirmed_v1(device)
    two = device.firmware("2.0", health=health, security_version=2)
    firmware_dir = device.data / "firmware"
    pristine = tmp_path / "pristine"
    os.rename(device.data, pristine)

    def work() -> None:
        device.applier = device._applier()
        device.apply(2, os=two)
        device.reboot()

    points = 0
    for _ in every_kill_point(work, lambda: _fresh(pristine, device.data)):
        points += 1
        state = device.state()  # never torn: it decodes, strictly
        assert not device.slots.state_path.with_suffix(".corrupt").exists()
        assert booted_ok(state), state
        for _boot in range(state.bootlimit + 2):  # the agent starts again, as often as asked
            device.applier = device._applier()
            assert booted_ok(device.slots.load())
            if not device.slots.boot().restart:
                break
        after = device.slots.load()
        assert not after.upgrade_available
        running = after.content(after.active)
        assert running is not None and device.slot_version(after.active) == running.version
        # the retained document once more, as after any restart
        device.apply(2, os=two)
        device.reboot()
        if health == GOOD:
            device.applier.commit(2)
            assert device.slots.running() == ("a", "2.0")
        else:
            with pytest.raises(FirmwareError, match="fell back"):
                device.applier.commit(2)
            assert device.slots.running() == ("b", "1.0")
        assert sorted(p.name for p in firmware_dir.iterdir() if p.name.startswith(".")) == []
    assert points >= 20  # the kill really went through install, switch and boot


def _fresh(pristine: Path, data: Path) -> None:
    """The data directory as it was before generation 2 (copied, so each run starts alike)."""
    import shutil

    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(pristine, data, symlinks=True)


def test_a_slot_whose_boot_is_killed_every_time_is_given_up_after_its_boot_limit(
    device: Device,
) -> None:
    """The agent dies (SIGKILL) during the health check on every boot: after ``bootlimit``
    counted boots the next one falls back without running the slot's check again."""
    confirmed_v1(device)
    started = device.data / "firmware" / "check-started"
    hang = f'#!/bin/sh\necho $$ >> "{started}"\nexec sleep 60\n'
    sha = device.firmware("2.0", health=hang)
    device.apply(2, os=sha)
    limit = device.state().bootlimit
    for boot in range(1, limit + 1):
        pid = os.fork()
        if pid == 0:
            try:
                FirmwareSlots(device.data).boot()
            finally:
                os._exit(0)
        deadline = time.monotonic() + 10
        while len(_lines(started)) < boot:
            assert time.monotonic() < deadline, "the health check never started"
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.killpg(int(_lines(started)[-1]), signal.SIGKILL)  # the orphaned check
        assert device.state().bootcount == boot and booted_ok(device.state())
    outcome = device.slots.boot()
    assert outcome.event == "fell_back" and (outcome.slot, outcome.version) == ("b", "1.0")
    assert len(_lines(started)) == limit  # not run a fourth time
    assert "without being confirmed (boot limit 3)" in (outcome.reason or "")


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []
