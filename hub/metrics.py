"""Prometheus metrics of one hub process: its registry, instruments and collectors.

Rules:
- One :class:`HubMetrics` per app, made by :func:`hub.app.create_app`; importing this
  module creates nothing (tests run several apps in one process, each with its own
  registry).
- Names follow the Prometheus conventions: ``driftless_`` first, the base unit in the
  name (``_seconds``, ``_bytes``, ``_messages``), counters end in ``_total``.
- Label values come from bounded sets only: route templates (never raw paths), status
  codes, HTTP methods from a fixed list, the protocol's and the ingest rules' reasons,
  channels. A device id, a token name or a path a client sent is never one.
- Hot paths pay per batch, not per message: the ingest loop observes one batch size and
  one batch duration per transaction. What the link and the chunk server count anyway
  (:class:`hub.stats.LinkStats`, ``ChunkServerStats``) is not counted twice: it is
  rendered at scrape time from a :class:`StatsSnapshot`, a copy taken on the event loop
  (the only thread that touches those counters).
- Scrape time does the reading: the device gauges come from one aggregate query
  (:func:`hub.devices.store.device_counts`) that :class:`FleetCollector` runs when scraped, not
  from a poller. :meth:`HubMetrics.render` (query included) runs in a worker thread,
  never on the event loop; the instruments are thread-safe.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from hub.db import new_session
from hub.devices import store
from hub.devices.rules import Reject, Stale
from protocols import Channel, Reason

if TYPE_CHECKING:
    from hub.stats import ChunkServerStats, LinkStats

log = logging.getLogger(__name__)

# The Prometheus text format (0.0.4), what generate_latest writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

INGEST_BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
INGEST_BATCH_DURATION_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
DELIVERY_LAG_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
)  # fmt: skip
API_DURATION_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


# Label values present at 0 from the first scrape, so that rate() sees the first event.
_CHANNELS = tuple(c.value for c in (Channel.BIRTH, Channel.REPORTED, Channel.STATUS))
_AGENT_ONLY_REASONS = {Reason.UNSIGNED, Reason.BAD_SIGNATURE, Reason.EXPIRED}
_REJECT_REASONS = tuple(
    sorted({str(r) for r in (*Reason, *Reject) if r not in _AGENT_ONLY_REASONS})
)
_STALE_REASONS = tuple(s.value for s in Stale)


class AuthFailure(enum.StrEnum):
    """Why an API request was refused: 401 (no token, a bad one) or 403 (its role)."""

    MISSING_TOKEN = "missing_token"
    INVALID_TOKEN = "invalid_token"  # unknown or revoked
    INSUFFICIENT_ROLE = "insufficient_role"


class Enrollment(enum.StrEnum):
    """What ``POST /enroll`` did with a well-formed request."""

    GRANTED = "granted"
    REFUSED = "refused"  # 403: the token or the CSR does not allow it
    CUT_OFF_PENDING = "cut_off_pending"  # 409: the old unit is not cut off yet


class Renewal(enum.StrEnum):
    """What the link answered to a certificate renewal (``cert_req``)."""

    GRANTED = "granted"
    REFUSED = "refused"


@dataclass(frozen=True)
class StatsSnapshot:
    """Copies of the counters the event loop owns, taken there for one scrape.

    ``link`` and ``bundles`` are ``LinkStats.as_dict()`` and ``ChunkServerStats.as_dict()``;
    None in a process that runs no link (``hub serve --no-link``): its counters stay zero.
    """

    link: Mapping[str, Any] | None
    bundles: Mapping[str, Any] | None
    http_bundle_bytes: int


class HubMetrics:
    """The registry of one app and the instruments the hub's code observes.

    The instruments are thread-safe. ``count_http_bundle_bytes`` and :meth:`snapshot`
    belong to the event loop, like the counters they read.
    """

    def __init__(self, *, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._ingest_batch_size = Histogram(
            "driftless_ingest_batch_size_messages",
            "Device messages applied per ingest transaction.",
            buckets=INGEST_BATCH_SIZE_BUCKETS,
            registry=registry,
        )
        self._ingest_batch_duration = Histogram(
            "driftless_ingest_batch_duration_seconds",
            "Time from taking an ingest batch off the queue to its commit "
            "(decoding, queueing for the database thread, one transaction).",
            buckets=INGEST_BATCH_DURATION_BUCKETS_S,
            registry=registry,
        )
        self._delivery_lag = Histogram(
            "driftless_desired_delivery_lag_seconds",
            "Time from a desired change (its desired_updated_at) to the broker's PUBACK "
            "of the document that carries it, first publish after the change only.",
            buckets=DELIVERY_LAG_BUCKETS_S,
            registry=registry,
        )
        self._api_requests = Counter(
            "driftless_api_requests_total",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=registry,
        )
        self._api_request_duration = Histogram(
            "driftless_api_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by method and route template.",
            ["method", "route"],
            buckets=API_DURATION_BUCKETS_S,
            registry=registry,
        )
        self._auth_failures = Counter(
            "driftless_api_auth_failures_total",
            "API requests refused for their credentials: 401 (missing_token, invalid_token) "
            "or 403 (insufficient_role).",
            ["reason"],
            registry=registry,
        )
        self._enrollments = Counter(
            "driftless_enrollments_total",
            "Device enrollments (POST /enroll) by outcome.",
            ["outcome"],
            registry=registry,
        )
        for reason in AuthFailure:  # present at 0 from the start, so rate() sees the first
            self._auth_failures.labels(reason.value)
        for outcome in Enrollment:
            self._enrollments.labels(outcome.value)
        self._http_bundle_bytes = 0  # event loop only
        registry.register(FleetCollector(engine))
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

    # -- observations ----------------------------------------------------------------------

    def observe_ingest_batch(self, *, messages: int, duration_s: float) -> None:
        self._ingest_batch_size.observe(messages)
        self._ingest_batch_duration.observe(duration_s)

    def observe_delivery_lag(self, lag_s: float) -> None:
        self._delivery_lag.observe(max(lag_s, 0.0))  # clocks of two processes may differ

    def api_request_observer(self, method: str, route: str, status: str) -> Callable[[float], None]:
        """What counts one request of this kind and observes its duration (seconds);
        callers keep it, so a request costs no label lookup."""
        count = self._api_requests.labels(method, route, status).inc
        observe = self._api_request_duration.labels(method, route).observe

        def observed(duration_s: float) -> None:
            count()
            observe(duration_s)

        return observed

    def auth_failed(self, reason: AuthFailure) -> None:
        self._auth_failures.labels(reason.value).inc()

    def enrollment(self, outcome: Enrollment) -> None:
        self._enrollments.labels(outcome.value).inc()

    def count_http_bundle_bytes(self, sent: int) -> None:
        """Event loop only: bytes of bundle files sent over HTTP."""
        self._http_bundle_bytes += sent

    # -- scraping --------------------------------------------------------------------------

    def snapshot(self, link: LinkStats | None, bundles: ChunkServerStats | None) -> StatsSnapshot:
        """Event loop only: copy the counters the loop owns, for :meth:`render`."""
        return StatsSnapshot(
            link=None if link is None else link.as_dict(),
            bundles=None if bundles is None else bundles.as_dict(),
            http_bundle_bytes=self._http_bundle_bytes,
        )

    def render(self, snapshot: StatsSnapshot) -> bytes:
        """Worker thread: the whole scrape in the Prometheus text format (queries the
        database once for the device gauges)."""
        return generate_latest(_Scrape(self.registry, snapshot))


class _Scrape:
    """The registry's families followed by those of one :class:`StatsSnapshot`."""

    def __init__(self, registry: CollectorRegistry, snapshot: StatsSnapshot) -> None:
        self._registry = registry
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            # No ``_created`` samples: the text format shows them as one more gauge per
            # series, and Prometheus finds counter resets by itself.
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
        yield from stats_families(self._snapshot)


class FleetCollector:
    """``driftless_devices{state}`` read from the database when scraped.

    One aggregate query per scrape (:func:`hub.devices.store.device_counts`). If the database
    cannot be read the gauges are left out of that scrape (and the failure logged), so
    the rest of the scrape still arrives.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def describe(self) -> Iterable[Metric]:
        return [_devices_family()]

    def collect(self) -> Iterable[Metric]:
        try:
            with new_session(self._engine) as session:
                counts = store.device_counts(session)
        except SQLAlchemyError as exc:
            log.warning("metrics: device counts not read", extra={"error": str(exc)[:300]})
            return []
        family = _devices_family()
        for state, value in (
            ("active", counts.total),
            ("online", counts.online),
            ("in_sync", counts.in_sync),
            ("behind", counts.out_of_sync),
            ("failed", counts.failed),
            ("decommissioned", counts.decommissioned),
        ):
            family.add_metric([state], value)
        return [family]


def _devices_family() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "driftless_devices",
        "Devices by state, read from the database at scrape time. The active fleet's "
        "states overlap (online, in_sync, behind, failed are subsets of active): "
        "do not sum them.",
        labels=["state"],
    )


# -- the counters the event loop owns, rendered from a snapshot ----------------------------


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled_counter(
    name: str,
    documentation: str,
    label: str,
    values: Mapping[str, int],
    known: Iterable[str] = (),
) -> CounterMetricFamily:
    """A counter per label value: those in ``values``, and ``known`` ones at 0."""
    merged = {**dict.fromkeys(known, 0), **values}
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key in sorted(merged):
        family.add_metric([key], merged[key])
    return family


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def stats_families(snapshot: StatsSnapshot) -> list[Metric]:
    """Pure: the metric families of a snapshot of the link's and chunk server's counters."""
    families: list[Metric] = []
    link, bundles = snapshot.link, snapshot.bundles
    connected = GaugeMetricFamily(
        "driftless_mqtt_connected",
        "1 while the connection to the broker is up, per hub connection "
        "(link: ingest and desired state; bundles: the chunk server).",
        labels=["connection"],
    )
    connects = CounterMetricFamily(
        "driftless_mqtt_connects_total",
        "Connections established to the broker (the first one and every reconnect).",
        labels=["connection"],
    )
    connect_failures = CounterMetricFamily(
        "driftless_mqtt_connect_failures_total",
        "Attempts to connect to the broker that failed.",
        labels=["connection"],
    )
    for connection, stats in (("link", link), ("bundles", bundles)):
        if stats is not None:
            connected.add_metric([connection], 1.0 if stats["mqtt_connected"] else 0.0)
            connects.add_metric([connection], stats["connects"])
            connect_failures.add_metric([connection], stats["connect_failures"])
    if link is not None or bundles is not None:
        families += [connected, connects, connect_failures]
    if link is not None:
        received = {k: v for k, v in link["received"].items() if k != "total"}
        families += [
            _labelled_counter(
                "driftless_ingest_messages_received_total",
                "Device messages the link took from the broker, by channel (other: a topic "
                "outside the device tree).",
                "channel",
                received,
                _CHANNELS,
            ),
            _counter(
                "driftless_ingest_messages_applied_total",
                "Device messages applied to the database.",
                link["applied"],
            ),
            _labelled_counter(
                "driftless_ingest_messages_rejected_total",
                "Device messages refused, by reason (malformed, unknown_device, ...; "
                "docs/operations.md).",
                "reason",
                link["rejected"],
                _REJECT_REASONS,
            ),
            _labelled_counter(
                "driftless_ingest_messages_stale_total",
                "Device messages ignored as duplicates or late deliveries, by reason.",
                "reason",
                link["stale"],
                _STALE_REASONS,
            ),
            _labelled_counter(
                "driftless_link_errors_total",
                "Local faults of the link (internal_error: a message or publish dropped "
                "after an unexpected error; see the log).",
                "kind",
                link["errors"],
            ),
            _counter(
                "driftless_desired_published_total",
                "Desired documents published (retained, QoS 1) and acknowledged.",
                link["desired_published"],
            ),
            _counter(
                "driftless_desired_cleared_total",
                "Retained desired documents cleared (devices decommissioned or deleted).",
                link["desired_cleared"],
            ),
            _counter(
                "driftless_desired_publish_failures_total",
                "Desired publishes lost with their connection (queued again).",
                link["publish_failures"],
            ),
            _gauge(
                "driftless_desired_pending_devices",
                "Devices whose desired document waits to be published.",
                link["pending_desired"],
            ),
            _counter(
                "driftless_desired_sweeps_total",
                "Sweeps on (re)connect that republish every out-of-sync device.",
                link["sweeps"],
            ),
            _counter(
                "driftless_desired_feed_changes_total",
                "Devices queued for publishing from the database's change feed (changes "
                "made through API-only processes).",
                link["feed_changes"],
            ),
            _counter(
                "driftless_broker_cutoffs_requested_total",
                "Decommissioned devices the broker was asked to cut off.",
                link["cutoffs_requested"],
            ),
            _counter(
                "driftless_broker_cutoffs_confirmed_total",
                "Decommissioned devices whose cut-off the broker confirmed.",
                link["cutoffs_confirmed"],
            ),
            _counter(  # no label: the broker's error texts are not a closed set
                "driftless_broker_cutoff_errors_total",
                "Cut-offs the broker refused (its error texts: GET /api/v1/hub/stats, the log).",
                sum(link["cutoff_errors"].values()),
            ),
            _labelled_counter(
                "driftless_certificate_renewals_total",
                "Certificate renewals (cert_req over MQTT) answered, by outcome.",
                "outcome",
                link["renewals"],
                (r.value for r in Renewal),
            ),
        ]
    served = CounterMetricFamily(
        "driftless_bundle_served_bytes_total",
        "Bundle bytes sent to devices, by transport (mqtt: the chunk server; http: file "
        "downloads).",
        labels=["transport"],
    )
    if bundles is not None:
        served.add_metric(["mqtt"], bundles["bytes_served"])
    served.add_metric(["http"], snapshot.http_bundle_bytes)
    families.append(served)
    if bundles is not None:
        families += [
            _counter(
                "driftless_bundle_chunk_requests_total",
                "Chunk requests the chunk server received.",
                bundles["requests"],
            ),
            _counter(
                "driftless_bundle_chunks_served_total",
                "Chunks the chunk server sent.",
                bundles["chunks_served"],
            ),
            _labelled_counter(
                "driftless_bundle_chunk_errors_total",
                "Error frames the chunk server sent, by error.",
                "error",
                bundles["errors_sent"],
            ),
            _labelled_counter(
                "driftless_bundle_chunk_requests_rejected_total",
                "Chunk requests refused as malformed, by reason.",
                "reason",
                bundles["rejected"],
            ),
            _labelled_counter(
                "driftless_bundle_chunk_requests_dropped_total",
                "Chunk requests dropped unanswered (overloaded, disconnected, unsent); "
                "devices ask again.",
                "reason",
                bundles["dropped"],
            ),
            _gauge(
                "driftless_bundle_chunk_requests_queued",
                "Chunk requests waiting to be answered.",
                bundles["queued"],
            ),
        ]
    return families
