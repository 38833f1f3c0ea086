"""The hub's application context: what routes, the link and the controllers share.

Rules:
- One :class:`HubContext` per app, built by :func:`hub.app.create_app` and frozen;
  importing this module creates nothing.
- Routes take it, or a part of it, through the dependencies of :mod:`hub.api.deps`
  (type aliases); :func:`hub.api.deps.context_of` is the one place that reads
  ``request.app.state``.
- One clock: :meth:`HubContext.now` (aware UTC) is "now" for the routes, the link,
  the controllers and every store they call. Tests give ``create_app`` their own
  clock, and that one override reaches all of them. Durations (``perf_counter``),
  the reconnect backoff's monotonic time and the age of files on disk (compared
  with their mtimes) are not "now" and stay local.
- Nothing in it is a route's way to the MQTT link: a desired change goes through
  ``desired`` (:class:`hub.devices.desired.DesiredState`), which commits it and
  then tells ``delivery`` (the link, seen only as that signal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Engine

if TYPE_CHECKING:
    from hub.bundles.files import BundleFiles
    from hub.bundles.root import FleetRoot
    from hub.devices.desired import DeliverySignal, DesiredState
    from hub.identity import CertificateAuthority
    from hub.metrics import HubMetrics
    from hub.settings import HubSettings
    from hub.stats import ChunkServerStats, LinkStats

Clock = Callable[[], datetime]
"""Returns the current time, timezone-aware UTC."""


def system_clock() -> datetime:
    """The real clock: now, aware UTC."""
    return datetime.now(UTC)


class LinkStatus(Protocol):
    """What the API may read of the MQTT link: whether it is up, and its counters.

    The counters belong to the event loop: read them only there (async routes) or
    through a copy taken there (``/metrics``).
    """

    @property
    def connected(self) -> bool: ...

    @property
    def stats(self) -> LinkStats: ...

    @property
    def chunk_stats(self) -> ChunkServerStats: ...


@dataclass(frozen=True)
class HubContext:
    """Everything one hub app is made of, built once at start."""

    settings: HubSettings
    engine: Engine
    clock: Clock
    metrics: HubMetrics
    link: LinkStatus
    delivery: DeliverySignal
    desired: DesiredState
    ca: CertificateAuthority | None  # None: enrollment is off (no identity directory)
    fleet_root: FleetRoot
    bundle_files: BundleFiles

    def now(self) -> datetime:
        """The hub's one notion of now (aware UTC)."""
        return self.clock()
