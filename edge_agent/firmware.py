"""Firmware A/B slots: the slot state and every decision about it (Mender-like, pure).

A device has two firmware slots, ``a`` and ``b`` (directories standing in for
partitions; :mod:`edge_agent.slots` does their I/O). :class:`SlotState` is
what a bootloader's environment holds: ``active`` (the slot that boots),
``upgrade_available`` (``active`` is on trial; the other slot is the confirmed
one to fall back to), ``bootcount`` and ``bootlimit``, what each slot holds,
and the last fallback.

Rules:
- Install writes only the inactive slot, never the one that boots, and never
  while an upgrade is pending. A slot that already holds the same firmware
  (name, version, payload) is reused; held by the active slot it means
  there is nothing to do. A slot is emptied in the state *before* its
  directory is rewritten, so the state never names content a crash tore.
- Switch puts the inactive slot on trial: ``active`` = it,
  ``upgrade_available``, ``bootcount = 0``; a restart follows.
- Boot: with an upgrade pending, ``bootcount`` grows first (persisted before
  anything else happens); past ``bootlimit`` the slot is given up without
  running anything; otherwise its health check decides: confirm
  (``upgrade_available`` cleared) or fall back.
- Falling back makes the other (confirmed) slot active again, clears the
  upgrade and records when, why and from which generation; a restart follows.
- So every boot runs a confirmed slot, or a slot on trial within its boot
  limit.
- A generation whose firmware fell back never switches again: its commit
  fails with the fallback's reason. A newer generation may try the same
  firmware again (a retry is a new desired change).
- Pure: no I/O, no clock (``now`` is an argument); refusals raise
  :class:`FirmwareRefused` with a reason the operator can act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec
from msgspec.structs import replace

SlotName = Literal["a", "b"]
SLOTS: tuple[SlotName, SlotName] = ("a", "b")
STATE_FORMAT = 1
MAX_REASON_CHARS = 1024

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
BootLimit = Annotated[int, msgspec.Meta(ge=1, le=100)]


class FirmwareRefused(Exception):
    """A firmware step that cannot be carried out, with the reason."""


@dataclass(frozen=True)
class FirmwareSettings:
    """The device's firmware limits (units in the names)."""

    boot_limit: int = 3
    """Boots a slot on trial gets without being confirmed before it is given up."""
    health_deadline_s: float = 60.0
    """Deadline of a health check that the manifest does not time (``./health``)."""
    health_output_bytes: int = 2048
    """How much of a failed check's output goes into the fallback's reason."""

    def __post_init__(self) -> None:
        if not 1 <= self.boot_limit <= 100:
            raise ValueError(f"boot_limit must be within 1..100, got {self.boot_limit}")
        if not 0 < self.health_deadline_s <= 3600:
            raise ValueError(
                f"health_deadline_s must be within (0, 3600], got {self.health_deadline_s}"
            )
        if self.health_output_bytes < 0:
            raise ValueError("health_output_bytes must not be negative")


class HealthSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a slot's firmware is checked at boot: a command run in the slot's root.

    ``command[0]`` with a ``/`` is relative to the slot root, else looked up on
    ``PATH``. Probes run ``interval_s`` apart until one exits 0 or
    ``retries + 1`` failed in a row, each within ``timeout_s``, all within
    ``deadline_s``.
    """

    command: list[str]
    timeout_s: float
    deadline_s: float
    interval_s: float = 1.0
    retries: NonNegative = 0


class SlotContent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The firmware a slot holds."""

    name: str
    version: str
    payload_sha256: str
    security_version: NonNegative = 0
    health: HealthSpec
    generation: NonNegative = 0
    """The generation that last installed or switched to this slot."""

    def same_firmware(self, other: SlotContent) -> bool:
        """Pure: the same release (name, version and payload), whichever generation."""
        return (self.name, self.version, self.payload_sha256) == (
            other.name,
            other.version,
            other.payload_sha256,
        )


class Fallback(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A slot given up: when (unix seconds), why, which slot, generation and version."""

    at: float
    reason: str
    slot: SlotName
    generation: NonNegative
    version: str | None


class SlotState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``firmware/state.json``: the bootloader environment of the A/B pair."""

    format: Literal[1] = 1
    active: SlotName = "a"
    upgrade_available: bool = False
    bootcount: NonNegative = 0
    bootlimit: BootLimit = 3
    a: SlotContent | None = None
    b: SlotContent | None = None
    last_fallback: Fallback | None = None

    @property
    def inactive(self) -> SlotName:
        return other(self.active)

    def content(self, slot: SlotName) -> SlotContent | None:
        return self.a if slot == "a" else self.b

    def holding(self, slot: SlotName, content: SlotContent | None) -> SlotState:
        """Pure: this state with ``slot`` holding ``content`` (None: empty)."""
        return replace(self, a=content) if slot == "a" else replace(self, b=content)


def other(slot: SlotName) -> SlotName:
    """Pure: the other slot of the pair."""
    return "b" if slot == "a" else "a"


# ---------------------------------------------------------------- install


@dataclass(frozen=True)
class InstallPlan:
    """Where a firmware goes; ``write``: unpack it there after persisting ``state``."""

    slot: SlotName
    write: bool
    state: SlotState
    why: str


def plan_install(state: SlotState, firmware: SlotContent) -> InstallPlan:
    """Pure: the slot for ``firmware`` and the state to persist before writing it.

    Raises FirmwareRefused while an upgrade is pending (a boot resolves it first).
    """
    if state.upgrade_available:
        raise FirmwareRefused(
            f"slot {state.active} is on trial and not confirmed; "
            "no firmware is installed until a boot confirms it or falls back"
        )
    for slot in (state.active, state.inactive):
        held = state.content(slot)
        if held is not None and held.same_firmware(firmware):
            where = "active" if slot == state.active else "inactive"
            return InstallPlan(slot, False, state, f"the {where} slot {slot} holds it already")
    target = state.inactive
    return InstallPlan(target, True, state.holding(target, None), f"write inactive slot {target}")


def installed(state: SlotState, slot: SlotName, firmware: SlotContent) -> SlotState:
    """Pure: the state once ``firmware`` is unpacked, complete, in ``slot``."""
    return state.holding(slot, firmware)


# ---------------------------------------------------------------- switch, commit, roll back


@dataclass(frozen=True)
class SwitchPlan:
    """The state to persist; ``restart``: then restart into the slot on trial."""

    state: SlotState
    restart: bool
    why: str


def plan_switch(state: SlotState, slot: SlotName, generation: int) -> SwitchPlan:
    """Pure: put ``slot`` on trial for ``generation``; raises FirmwareRefused."""
    fallback = state.last_fallback
    if fallback is not None and fallback.generation == generation:
        return SwitchPlan(state, False, f"generation {generation}'s firmware fell back already")
    if state.upgrade_available:
        raise FirmwareRefused(f"slot {state.active} is on trial already; a boot resolves it first")
    held = state.content(slot)
    if held is None:
        raise FirmwareRefused(f"slot {slot} holds no complete firmware; install it first")
    if slot == state.active:
        return SwitchPlan(state, False, f"slot {slot} runs {held.version} already")
    trial = replace(
        state.holding(slot, replace(held, generation=generation)),
        active=slot,
        upgrade_available=True,
        bootcount=0,
    )
    return SwitchPlan(trial, True, f"slot {slot} ({held.version}) on trial")


def check_commit(state: SlotState, generation: int) -> None:
    """Pure: whether ``generation`` may commit; raises FirmwareRefused with the reason."""
    fallback = state.last_fallback
    if fallback is not None and fallback.generation == generation:
        raise FirmwareRefused(
            f"firmware {fallback.version} in slot {fallback.slot} fell back to slot "
            f"{other(fallback.slot)}: {fallback.reason}"
        )
    if state.upgrade_available:
        raise FirmwareRefused(
            f"slot {state.active} is not confirmed: the restart after the switch has not happened"
        )


def roll_back(state: SlotState, generation: int) -> SlotState:
    """Pure: undo ``generation``'s switch if its slot is still on trial (never booted).

    A confirmed slot stays (undoing it would take another switch), and a
    fallback has undone the switch already: both leave the state as it is.
    """
    held = state.content(state.active)
    if state.upgrade_available and held is not None and held.generation == generation:
        return replace(state, active=state.inactive, upgrade_available=False, bootcount=0)
    return state


# ---------------------------------------------------------------- boot


BootAction = Literal["run", "check", "gave_up"]


@dataclass(frozen=True)
class BootDecision:
    """What a boot does, after persisting ``state``.

    ``run``: the active slot is confirmed, start normally; ``check``: run the
    slot on trial's health check, then :func:`confirm` or :func:`fall_back`;
    ``gave_up``: the boot limit was passed and the state falls back, restart.
    """

    action: BootAction
    state: SlotState


def decide_boot(state: SlotState, now: float) -> BootDecision:
    """Pure: the boot decision table (see the module's rules)."""
    if not state.upgrade_available:
        return BootDecision("run", state)
    counted = replace(state, bootcount=state.bootcount + 1)
    if counted.bootcount > counted.bootlimit:
        reason = (
            f"slot {state.active} started {counted.bootcount - 1} times without being "
            f"confirmed (boot limit {state.bootlimit})"
        )
        return BootDecision("gave_up", fall_back(counted, reason, now))
    return BootDecision("check", counted)


def confirm(state: SlotState) -> SlotState:
    """Pure: the slot on trial passed its health check: it is the confirmed one now."""
    if not state.upgrade_available:
        return state
    return replace(state, upgrade_available=False, bootcount=0)


def fall_back(state: SlotState, reason: str, now: float) -> SlotState:
    """Pure: give up the slot on trial; the confirmed slot is active again, the reason kept."""
    if not state.upgrade_available:
        return state
    given_up = state.content(state.active)
    record = Fallback(
        at=now,
        reason=reason[:MAX_REASON_CHARS],
        slot=state.active,
        generation=given_up.generation if given_up else 0,
        version=given_up.version if given_up else None,
    )
    return replace(
        state, active=state.inactive, upgrade_available=False, bootcount=0, last_fallback=record
    )


def booted_ok(state: SlotState) -> bool:
    """Pure: the invariant: what boots is confirmed, or on trial within its boot limit."""
    return not state.upgrade_available or state.bootcount <= state.bootlimit
