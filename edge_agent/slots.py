"""Firmware A/B slots on disk: the slot directories, their state file, the boot's health check.

Layout under the agent's data directory::

    firmware/slot-a/, firmware/slot-b/   the slots: an unpacked firmware payload each
    firmware/state.json                  :class:`edge_agent.firmware.SlotState`
    firmware/health.log                  the output of the last boot's health check

The decisions are :mod:`edge_agent.firmware`'s; this module carries them out.

Rules:
- ``state.json`` is the truth, replaced atomically and durably
  (:func:`edge_agent.store.atomic_write_bytes`: temp file, fsync, rename,
  fsync of the directory), so a crash at any instant leaves the old state or
  the new, never a torn one. A slot directory's content counts only once the
  state names it, and the state stops naming it before the directory is
  rewritten.
- Install unpacks into the inactive slot only (``archive.unpack``: into a
  temporary directory, renamed into place once the payload re-hashed).
- A firmware bundle must say how it is checked: ``run.health`` in its
  manifest, or an executable ``health`` at its root; otherwise it is refused
  at install, because "it booted" proves nothing.
- The health check is a real child process in its own session, in the slot's
  root, with the slot in its environment (``DRIFTLESS_FIRMWARE_SLOT``,
  ``DRIFTLESS_FIRMWARE_DIR``, ``DRIFTLESS_FIRMWARE_VERSION``); past its deadline
  its whole process group is killed. It runs without the hub.
- A state file that cannot be read is moved aside (``.corrupt``) and the pair
  starts from defaults (slot ``a``, nothing pending), logged as an error.
- The boot removes what a crash left in ``firmware/`` (``.*.tmp``: temporary
  state files, half-extracted slots) before it reads the state.
- Errors are :class:`FirmwareError`, an :class:`edge_agent.runtime.ApplyError`:
  the runtime's steps pass them on as they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import msgspec

from edge_agent.bundles import Prepared, SecurityVersions
from edge_agent.firmware import (
    FirmwareRefused,
    FirmwareSettings,
    HealthSpec,
    SlotContent,
    SlotName,
    SlotState,
    check_commit,
    confirm,
    decide_boot,
    fall_back,
    installed,
    plan_install,
    plan_switch,
    roll_back,
)
from edge_agent.plan import WorkloadSpec
from edge_agent.runtime import ApplyError
from edge_agent.store import atomic_write_bytes

if TYPE_CHECKING:
    from firmware_bundles.model import Manifest

log = logging.getLogger("driftless.agent.firmware")

FIRMWARE_DIR = "firmware"
STATE_FILE = "state.json"
HEALTH_LOG = "health.log"
DEFAULT_HEALTH = "health"


class FirmwareError(ApplyError):
    """A firmware step failed; the reason says why (and what to do)."""


@dataclass(frozen=True)
class BootOutcome:
    """What the boot did: ``restart`` means the agent must restart (into the old slot)."""

    event: Literal["booted", "confirmed", "fell_back"]
    slot: SlotName
    version: str | None
    restart: bool
    reason: str | None = None


class FirmwareSlots:
    """``<data>/firmware``: the A/B pair, for the runtime's steps and the agent's boot."""

    def __init__(
        self,
        data_dir: Path,
        *,
        settings: FirmwareSettings | None = None,
        request_restart: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``request_restart``: what a switch calls to restart the agent into the new slot
        (the paho driver: stop cleanly, then exec itself); None: switching is refused."""
        self.directory = Path(data_dir) / FIRMWARE_DIR
        self.state_path = self.directory / STATE_FILE
        self.settings = settings or FirmwareSettings()
        self.request_restart = request_restart
        self.clock = clock
        self.security = SecurityVersions(data_dir)

    def slot_dir(self, slot: SlotName) -> Path:
        return self.directory / f"slot-{slot}"

    # -- the state file

    def exists(self) -> bool:
        return self.state_path.exists()

    def load(self) -> SlotState:
        """The state on disk; missing: defaults. Unreadable: moved aside, defaults."""
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return SlotState(bootlimit=self.settings.boot_limit)
        except OSError as exc:
            raise FirmwareError(f"cannot read {self.state_path}: {exc.strerror or exc}") from None
        try:
            return msgspec.json.decode(data, type=SlotState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            aside = self.state_path.with_suffix(".corrupt")
            os.replace(self.state_path, aside)
            log.error(
                "firmware state unreadable; moved aside, starting from slot a",
                extra={"path": str(aside), "error": str(exc)},
            )
            return SlotState(bootlimit=self.settings.boot_limit)

    def save(self, state: SlotState) -> None:
        try:
            atomic_write_bytes(self.state_path, msgspec.json.format(msgspec.json.encode(state)))
        except OSError as exc:
            raise FirmwareError(f"cannot write {self.state_path}: {exc.strerror or exc}") from None

    def running(self) -> tuple[SlotName, str | None] | None:
        """The slot that runs and its firmware version; None on a device without firmware."""
        if not self.exists():
            return None
        state = self.load()
        held = state.content(state.active)
        return state.active, held.version if held else None

    # -- the runtime's steps

    def prepare(self, spec: WorkloadSpec, manifest: Manifest, bundle_path: Path) -> Prepared:
        """Install: unpack a verified firmware bundle into the inactive slot, unless a slot
        holds it already. Raises FirmwareError, and what ``archive.unpack`` raises."""
        firmware = SlotContent(
            name=manifest.name,
            version=manifest.version,
            payload_sha256=manifest.payload.sha256,
            security_version=manifest.security_version,
            health=self._declared_health(manifest),
        )
        state = self.load()
        try:
            target = plan_install(state, firmware)
        except FirmwareRefused as exc:
            raise FirmwareError(str(exc)) from None
        directory = self.slot_dir(target.slot)
        if target.write:
            self.save(target.state)  # the slot is empty in the state before it is touched
            self._write_slot(directory, manifest, bundle_path)
            health = firmware.health
            if not health.command:
                health = self._default_health(directory)
            self.save(installed(target.state, target.slot, _with_health(firmware, health)))
        log.info(
            "firmware install",
            extra={"slot": target.slot, "version": manifest.version, "why": target.why},
        )
        return Prepared(spec, manifest, directory)

    def switch(self, generation: int, prepared: Sequence[Prepared]) -> None:
        """Switch: put the generation's firmware slot on trial and ask for the restart."""
        if not prepared:
            return
        if len(prepared) > 1:
            names = ", ".join(p.spec.name for p in prepared)
            raise FirmwareError(f"a device runs one firmware; generation {generation} has {names}")
        slot: SlotName = "a" if prepared[0].directory == self.slot_dir("a") else "b"
        state = self.load()
        try:
            plan = plan_switch(state, slot, generation)
        except FirmwareRefused as exc:
            raise FirmwareError(str(exc)) from None
        if plan.restart and self.request_restart is None:
            raise FirmwareError("this agent cannot restart itself, so it cannot switch firmware")
        if plan.restart:  # security versions only grow, recorded before the switch (bundles.py)
            item = prepared[0].manifest
            try:
                self.security.raise_to({item.name: item.security_version})
            except (OSError, ValueError) as exc:
                raise FirmwareError(f"cannot record the security version: {exc}") from None
        self.save(plan.state)
        log.info("firmware switch", extra={"generation": generation, "why": plan.why})
        if plan.restart and self.request_restart is not None:
            self.request_restart()

    def commit(self, generation: int) -> None:
        """Commit: only a confirmed slot commits; a fallback fails with its reason."""
        if not self.exists():
            return
        try:
            check_commit(self.load(), generation)
        except FirmwareRefused as exc:
            raise FirmwareError(str(exc)) from None

    def roll_back(self, generation: int) -> None:
        """Roll back: take a slot still on trial for ``generation`` off it."""
        if not self.exists():
            return
        state = self.load()
        undone = roll_back(state, generation)
        if undone != state:
            self.save(undone)

    # -- the boot

    def boot(self) -> BootOutcome:
        """At agent start, before connecting: count the boot, check a slot on trial,
        confirm it or fall back. Nothing to do (one failed open) on a device without firmware."""
        if not self.exists():
            return BootOutcome("booted", "a", None, restart=False)
        self._remove_leftovers()
        state = self.load()
        decision = decide_boot(state, self.clock())
        if decision.state != state:
            self.save(decision.state)  # the boot is counted before anything else happens
        state = decision.state
        slot, held = state.active, state.content(state.active)
        version = held.version if held else None
        if decision.action == "run":
            return BootOutcome("booted", slot, version, restart=False)
        if decision.action == "gave_up":
            given_up = state.last_fallback.reason if state.last_fallback else "boot limit"
            log.error("firmware fell back", extra={"slot": slot, "reason": given_up})
            return BootOutcome("fell_back", slot, version, restart=True, reason=given_up)
        failure = (
            "the slot holds no firmware"
            if held is None
            else self.check_health(slot, held.version, held.health)
        )
        if failure is None:
            self.save(confirm(state))
            log.info("firmware confirmed", extra={"slot": slot, "version": version})
            return BootOutcome("confirmed", slot, version, restart=False)
        fell = fall_back(state, failure, self.clock())
        self.save(fell)
        back = fell.content(fell.active)
        log.error(
            "firmware health check failed; fell back",
            extra={"slot": slot, "to": fell.active, "reason": failure},
        )
        return BootOutcome(
            "fell_back", fell.active, back.version if back else None, restart=True, reason=failure
        )

    def check_health(self, slot: SlotName, version: str, health: HealthSpec) -> str | None:
        """Run ``health``'s probes in the slot; None when one passed, else the reason."""
        root = self.slot_dir(slot)
        command = list(health.command)
        if "/" in command[0] and not command[0].startswith("/"):
            command[0] = str(root / command[0])
        env = {
            **os.environ,
            "DRIFTLESS_FIRMWARE_SLOT": slot,
            "DRIFTLESS_FIRMWARE_DIR": str(root),
            "DRIFTLESS_FIRMWARE_VERSION": version,
        }
        deadline = time.monotonic() + health.deadline_s
        reason = "no probe ran"
        for attempt in range(health.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                return f"health check not passed within {health.deadline_s:g} s: {reason}"
            if attempt:
                time.sleep(min(health.interval_s, left))  # probes are apart by the spec's interval
                left = deadline - time.monotonic()
            failed = self._probe(command, root, env, min(health.timeout_s, max(left, 0.0)))
            if failed is None:
                return None
            reason = failed
        return f"health check failed: {reason}"

    # -- helpers

    def _declared_health(self, manifest: Manifest) -> HealthSpec:
        """The manifest's ``run.health`` (an empty command: look for ``./health`` once unpacked)."""
        run = manifest.run
        if run is not None and run.health is not None:
            check = run.health
            return HealthSpec(
                command=list(check.command),
                timeout_s=float(check.timeout_s),
                deadline_s=float(min(run.health_deadline_s or check.timeout_s, 3600)),
                interval_s=float(check.interval_s),
                retries=check.retries,
            )
        deadline = self.settings.health_deadline_s
        return HealthSpec(command=[], timeout_s=deadline, deadline_s=deadline)

    def _default_health(self, directory: Path) -> HealthSpec:
        candidate = directory / DEFAULT_HEALTH
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            shutil.rmtree(directory, ignore_errors=True)
            raise FirmwareError(
                "firmware bundle declares no health check: give its manifest run.health, "
                f"or put an executable {DEFAULT_HEALTH!r} at the payload's root"
            )
        deadline = self.settings.health_deadline_s
        return HealthSpec(command=[f"./{DEFAULT_HEALTH}"], timeout_s=deadline, deadline_s=deadline)

    def _remove_leftovers(self) -> None:
        """Temporary files and extraction directories a crash left (``.*.tmp``): nothing
        else writes here, and the boot runs before any step."""
        for leftover in self.directory.glob(".*.tmp"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def _write_slot(self, directory: Path, manifest: Manifest, bundle_path: Path) -> None:
        from firmware_bundles import archive  # the verification stack, only when installing

        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise FirmwareError(f"cannot empty {directory}")
        archive.unpack(bundle_path, manifest, directory)

    def _probe(
        self, command: list[str], root: Path, env: dict[str, str], timeout_s: float
    ) -> str | None:
        """One run of the check; None if it exited 0, else why not. Leaves no process behind."""
        import subprocess  # only where a slot is on trial

        output_path = self.directory / HEALTH_LOG
        with open(output_path, "wb") as output:
            try:
                proc = subprocess.Popen(
                    command,
                    cwd=root,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                return f"cannot run {command[0]!r}: {exc.strerror or exc}"
            try:
                code: int | None = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                code = None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the check's own children too
            proc.wait()
        if code == 0:
            return None
        tail = _tail(output_path, self.settings.health_output_bytes)
        what = f"no answer within {timeout_s:.3g} s" if code is None else f"exit status {code}"
        return f"{what}{': ' + tail if tail else ''}"


def _with_health(firmware: SlotContent, health: HealthSpec) -> SlotContent:
    return msgspec.structs.replace(firmware, health=health)


def _tail(path: Path, limit: int) -> str:
    """The last ``limit`` bytes of ``path`` as one line of text."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - limit))
            data = handle.read(limit)
    except OSError:
        return ""
    return " | ".join(
        line.strip() for line in data.decode(errors="replace").splitlines() if line.strip()
    )


def running_firmware(data_dir: Path) -> tuple[SlotName, str | None] | None:
    """The slot that runs and its version, for the birth's inventory; never raises."""
    try:
        return FirmwareSlots(data_dir).running()
    except (ApplyError, OSError):
        return None
