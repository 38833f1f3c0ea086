"""Appliers: what "apply a desired document" does on this device.

Rule: an applier is idempotent (applying the same generation twice is harmless)
and atomic (a crash leaves the old or the new result). It raises ApplyError
with a reason the operator can act on; the core turns that into a ``failed`` report.

``ConfigFileApplier`` writes the configuration; ``WorkloadApplier`` first
installs the bundle workloads the configuration references (verified, unpacked
into ``<data>/workloads/<name>/<version>/``, ``current`` switched atomically).
The process supervisor plugs in here later.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import msgspec

from edge_agent.bundles import (
    BundleCache,
    InstallError,
    Prepared,
    SecurityVersions,
    Workloads,
    WorkloadSpec,
    WorkloadSpecError,
    workload_specs,
)
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
    ) -> None:
        self.cache = BundleCache(data_dir, max_bytes=settings.cache_max_bytes)
        self.security = SecurityVersions(data_dir)
        self.workloads = Workloads(data_dir)
        self.settings = settings
        self.trusted_root = trusted_root
        self.agent_version = agent_version
        self.clock = clock
        self.config_applier = config_applier or ConfigFileApplier(data_dir)

    def apply(self, desired: Desired) -> None:
        try:
            specs = workload_specs(desired.config)
        except WorkloadSpecError as exc:
            raise ApplyError(str(exc)) from None
        if specs:
            self._install(specs)
        self.config_applier.apply(desired)

    def _install(self, specs: list[WorkloadSpec]) -> None:
        from edge_agent.fetch import Expectations, check_manifest
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
