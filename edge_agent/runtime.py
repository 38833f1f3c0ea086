"""The workload runtime's steps: what install, switch, commit and roll back do on this device.

The core plans steps (:mod:`edge_agent.plan`); the driver's executor table
calls the :class:`Runtime` method for each in its step thread.

Rule: every step is idempotent (running it twice is harmless) and atomic (a
crash leaves the old or the new result). It raises ApplyError with a reason
the operator can act on; the core turns that into a ``failed`` report (or,
after the switch, a rollback).

``ConfigFileApplier`` writes the configuration; ``WorkloadApplier`` installs
the bundle workloads the configuration references (verified, unpacked into
``<data>/workloads/<name>/<version>/``) and switches them (``current``
pointers, then the configuration). It supervises nothing yet
(``supervises = False``): the process supervisor of the runtime issue plugs
in here with start, stop and health watching, and produces the core's
``WorkloadExited`` / ``HealthPassed`` / ``HealthFailed`` events: that is
:class:`edge_agent.supervisor.runtime.SupervisingRuntime` (``supervises = True``),
which installs and switches through a ``WorkloadApplier`` and adds the
``Supervising`` steps.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from edge_agent.bundles import BundleCache, InstallError, Prepared, SecurityVersions, Workloads
from edge_agent.plan import WorkloadSpec, WorkloadSpecError, workload_specs
from edge_agent.settings import BundleSettings
from edge_agent.store import atomic_write_bytes
from protocols import Desired

if TYPE_CHECKING:
    from firmware_bundles.trust import TrustedRoot


class ApplyError(Exception):
    """The desired state could not be applied on this device."""


class Applier(Protocol):
    def apply(self, desired: Desired) -> None:
        """Make ``desired`` the device's running state; raise ApplyError on failure."""


class Runtime(Protocol):
    """The step executors' side of the workload runtime; every method raises ApplyError."""

    supervises: bool
    """Whether it starts workloads and watches their health (plans then include those steps)."""

    def install(self, desired: Desired) -> None:
        """Verify and unpack the generation's workloads; nothing running changes."""

    def switch(self, desired: Desired) -> None:
        """Make the generation current: security versions, pointers, the configuration."""

    def commit(self, generation: int) -> None:
        """The generation is good: make it the one to come back to."""

    def roll_back(self, generation: int, to_generation: int) -> str | None:
        """Undo :meth:`switch` of ``generation``: the versions and configuration it replaced.

        Returns what the report's error should add (a supervisor's log tails), if anything."""


class Supervising(Runtime, Protocol):
    """A runtime that starts workloads and watches their health (``supervises = True``)."""

    def start_workload(self, generation: int, name: str) -> None:
        """Start (or hand over to, or reload) the generation's version of ``name``."""

    def stop_workload(self, generation: int, name: str) -> None:
        """Stop ``name``, which the generation no longer has."""

    def wait_for_health(self, generation: int, names: tuple[str, ...]) -> None:
        """Let the started workloads' health events flow to the core (they answer the wait)."""

    def resume(self, feed: Callable[[Any], None]) -> tuple[WorkloadSpec, ...]:
        """At agent start: adopt or restart the applied generation's workloads; events go to
        ``feed``; returns the applied workloads for the core."""

    def close(self) -> None:
        """The agent stops: stop watching (the workloads keep running)."""


class ConfigFileApplier:
    """Writes ``config.json`` (generation + configuration) atomically into the data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "config.json"

    def apply(self, desired: Desired) -> None:
        document = {
            "generation": desired.generation,
            "issued_at": desired.issued_at,
            "config": desired.config,
        }
        try:
            atomic_write_bytes(self.path, msgspec.json.format(msgspec.json.encode(document)))
        except OSError as exc:
            raise ApplyError(f"cannot write {self.path}: {exc.strerror or exc}") from exc


class WorkloadApplier:
    """Installs the bundle workloads of a desired config, then writes the config.

    Rules:
    - Runs only after the fetch step made every referenced bundle present and
      verified in the cache; it checks again what it installs: the manifest's
      signatures and expiry against the trusted root, the security version
      against the highest installed under that name, the targets, and the
      payload hash while unpacking (``archive.unpack``).
    - All workloads are unpacked into new version directories first; only when
      every one succeeded are the security versions recorded and the
      ``current`` pointers switched, then ``config.json`` written. A failure
      before that changes no pointer. A crash between two pointer switches
      leaves the generation unrecorded, so it is applied again (idempotently)
      when the agent comes back.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        settings: BundleSettings,
        trusted_root: TrustedRoot | None,
        agent_version: str,
        clock: Callable[[], float],
        config_applier: Applier | None = None,
        request_restart: Callable[[], None] | None = None,
    ) -> None:
        """``request_restart``: how a firmware switch restarts the agent (edge_agent/slots.py)."""
        self.cache = BundleCache(data_dir, max_bytes=settings.cache_max_bytes)
        self.security = SecurityVersions(data_dir)
        self.workloads = Workloads(data_dir)
        self.settings = settings
        self.trusted_root = trusted_root
        self.agent_version = agent_version
        self.clock = clock
        self.config_applier = config_applier or ConfigFileApplier(data_dir)
        self.config_path = Path(data_dir) / "config.json"
        self._prepared: dict[int, list[Prepared]] = {}
        # What a switch replaced, per generation, until it is committed or rolled back.
        self._undo: dict[int, tuple[dict[str, str | None], bytes | None]] = {}
        # Firmware A/B: firmware-kind bundles go to the slots, not workloads/ (edge_agent/slots.py).
        from edge_agent.slots import FirmwareSlots  # imports ApplyError from here: lazily

        self.firmware = FirmwareSlots(data_dir, request_restart=request_restart, clock=clock)

    supervises = False

    def apply(self, desired: Desired) -> None:
        """Install, then switch (the two steps in one, for callers without a plan)."""
        self.install(desired)
        self.switch(desired)

    def install(self, desired: Desired) -> None:
        self.prepare(desired)

    def switch(self, desired: Desired) -> None:
        prepared = self._prepared.pop(desired.generation, None)
        if prepared is None:  # installed before a restart: unpacking again reuses the directories
            prepared = self._install(self._specs(desired))
        firmware = [p for p in prepared if p.manifest.kind == "firmware"]  # firmware A/B
        prepared = [p for p in prepared if p.manifest.kind != "firmware"]
        previous_config = self._read_config()
        previous = {p.spec.name: self.workloads.current(p.spec.name) for p in prepared}
        self._switch(prepared)
        self.config_applier.apply(desired)
        self._undo[desired.generation] = (previous, previous_config)
        self.firmware.switch(desired.generation, firmware)  # firmware A/B: may restart the agent

    def commit(self, generation: int) -> None:
        self.firmware.commit(generation)  # firmware A/B: a slot that fell back fails the commit
        self._undo.clear()  # nothing to go back to once it is good

    def prepare(self, desired: Desired) -> list[Prepared]:
        """Install (idempotently) and return the generation's prepared workloads, keeping them
        for its switch; raises ApplyError."""
        prepared = self._install(self._specs(desired))
        self._prepared[desired.generation] = prepared
        return prepared

    def undo_record(self, generation: int) -> tuple[dict[str, str | None], bytes | None] | None:
        """What :meth:`switch` of ``generation`` replaced (pointers, config bytes), until
        commit or roll back."""
        return self._undo.get(generation)

    def roll_back(self, generation: int, to_generation: int) -> str | None:
        self.firmware.roll_back(generation)  # firmware A/B: a slot still on trial comes off it
        undo = self._undo.pop(generation, None)
        if undo is None:
            raise ApplyError(f"generation {generation} was not switched by this agent run")
        pointers, config = undo
        try:
            for name, version in pointers.items():
                self.workloads.point(name, version)
            if config is not None:
                atomic_write_bytes(self.config_path, config)
        except OSError as exc:
            raise ApplyError(f"cannot roll back: {exc.strerror or exc}") from None
        return None

    def _read_config(self) -> bytes | None:
        try:
            return self.config_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ApplyError(f"cannot read {self.config_path}: {exc.strerror or exc}") from None

    @staticmethod
    def _specs(desired: Desired) -> list[WorkloadSpec]:
        try:
            return workload_specs(desired.config)
        except WorkloadSpecError as exc:
            raise ApplyError(str(exc)) from None

    def _install(self, specs: list[WorkloadSpec]) -> list[Prepared]:
        if not specs:
            return []
        from edge_agent.bundle_transfer import Expectations, check_manifest
        from firmware_bundles import archive
        from firmware_bundles.errors import BundleError
        from firmware_bundles.trust import verify_manifest

        root = self.trusted_root
        if root is None:
            raise ApplyError(
                "no trusted root: this agent cannot verify bundles; start it with --root ROOT_JSON"
            )
        try:
            installed = self.security.load()
        except ValueError as exc:
            raise ApplyError(str(exc)) from None
        now = self.clock()
        expect = Expectations(
            trusted_root=root,
            now=now,
            clock_skew_s=self.settings.clock_skew_s,
            architecture=self.settings.architecture,
            agent_version=self.agent_version,
            installed_security_versions=installed,
            max_bundle_bytes=self.settings.max_bundle_bytes,
        )
        prepared: list[Prepared] = []
        for spec in specs:
            path = self.cache.path(spec.bundle)
            try:
                envelope = archive.read_signed_manifest(path)
                manifest = verify_manifest(envelope, root, now, self.settings.clock_skew_s)
                check_manifest(manifest, expect)
                if manifest.kind == "firmware":  # firmware A/B: the inactive slot, not workloads/
                    prepared.append(self.firmware.prepare(spec, manifest, path))
                    continue
                prepared.append(self.workloads.prepare(spec, manifest, path))
            except FileNotFoundError:
                raise ApplyError(
                    f"workload {spec.name}: bundle {spec.bundle} is not in the cache"
                ) from None
            except (BundleError, InstallError) as exc:
                raise ApplyError(f"workload {spec.name}: {type(exc).__name__}: {exc}") from None
            except OSError as exc:
                raise ApplyError(
                    f"workload {spec.name}: cannot install: {exc.strerror or exc}"
                ) from None
        return prepared

    def _switch(self, prepared: list[Prepared]) -> None:
        highest: dict[str, int] = {}
        for item in prepared:
            name, version = item.manifest.name, item.manifest.security_version
            highest[name] = max(version, highest.get(name, version))
        try:
            self.security.raise_to(highest)
            for item in prepared:
                self.workloads.switch(item)
        except OSError as exc:
            raise ApplyError(f"cannot switch workloads: {exc.strerror or exc}") from None
