"""Ingest: the MQTT handler of births, reports and status (the Will included).

Rules:
- Registered on the link's session (:mod:`hub.mqtt.link`) for
  ``$share/<group>/.../+/birth`` and ``$share/<group>/.../+/reported`` (shared, so
  hub replicas split the load) and ``driftless/v1/devices/+/status``, *not*
  shared: status is retained, and retained messages are never delivered to shared
  subscriptions (MQTT 5 section 4.8.2), so a hub that (re)subscribes would never
  learn which devices are offline. Every replica therefore gets every status;
  that is harmless because status updates are guarded by the device session (a
  stale one changes nothing) and idempotent.
- One batch, one transaction: the session hands over every message already
  received (up to ``ingest_batch_max``); they are decoded and checked
  (:func:`hub.devices.rules.classify`), applied in one transaction in a worker
  thread (:func:`hub.devices.store.apply_messages`: the rules of
  :mod:`hub.devices.rules`, batched SQL), and :meth:`IngestHandler.handle`
  returns after the commit, so the session acknowledges them only then
  (at-least-once into the database; redelivery is harmless under the rules).
- Nothing a device sends can stop ingest: bad messages are rejected, counted and
  logged; an unexpected error in a batch is logged with its traceback and the
  batch is retried one message at a time, so one poisoned message cannot block
  others (it is dropped and counted as ``internal_error``).
- A birth announcing an older generation than the desired one (or a device ahead
  of the hub, re-keyed) asks delivery to publish again (architecture rule
  3: the broker may have lost its retained copy).
- Metrics cost per batch, not per message: each batch observes its size and its
  duration once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import Engine

from hub.context import Clock
from hub.db import new_session
from hub.devices import store
from hub.devices.rules import DeviceMessage, Reject, Rejected, Stale, classify
from hub.metrics import HubMetrics
from hub.mqtt.session import Incoming
from hub.settings import HubSettings
from hub.stats import LinkStats
from protocols import Channel
from protocols.topics import TOPIC_ROOT, shared_subscription, subscription

log = logging.getLogger(__name__)

_STALE_KEYS = {s.value for s in Stale}
_REJECT_DETAILS = {
    Reject.UNKNOWN_DEVICE.value: "device is not registered",
    Reject.DECOMMISSIONED.value: "device is decommissioned",
    Reject.REVOKED_CERTIFICATE.value: "birth from a session of a revoked certificate",
}
_KNOWN_CHANNELS = frozenset(c.value for c in Channel)
_TOPIC_PREFIX = TOPIC_ROOT + "/"


def channel_label(topic_name: str) -> str:
    """Pure: the channel part of a topic for the ``received`` counters (``other`` if none)."""
    tail = topic_name.rsplit("/", 1)[-1]
    return tail if topic_name.startswith(_TOPIC_PREFIX) and tail in _KNOWN_CHANNELS else "other"


def ingest_subscriptions(settings: HubSettings) -> list[str]:
    """Pure: the filters ingest serves (see the module rules on status)."""
    group = settings.mqtt_shared_group
    return [
        shared_subscription(group, Channel.BIRTH),
        shared_subscription(group, Channel.REPORTED),
        subscription(Channel.STATUS),
    ]


class IngestHandler:
    """Applies device messages to the device table, a batch per transaction.

    Runs on the session's event loop; the database work in worker threads.
    """

    def __init__(
        self,
        *,
        engine: Engine,
        settings: HubSettings,
        stats: LinkStats,
        metrics: HubMetrics,
        clock: Clock,
        republish: Callable[[Sequence[str]], None],
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._stats = stats
        self._metrics = metrics
        self._clock = clock
        self._republish = republish  # delivery: publish these devices' documents again

    def subscriptions(self) -> list[str]:
        return ingest_subscriptions(self._settings)

    async def handle(self, batch: Sequence[Incoming]) -> None:
        """Apply ``batch`` in one transaction; returns once it is committed."""
        started = time.perf_counter()
        now = self._clock()
        stats = self._stats
        decoded: list[tuple[str, DeviceMessage]] = []
        received = stats.received
        received["total"] += len(batch)
        for raw in batch:
            topic_name = raw.topic
            received[channel_label(topic_name)] += 1
            try:
                decoded.append((topic_name, classify(topic_name, raw.payload)))
            except Rejected as exc:
                stats.reject(topic_name, exc.device_id, exc.reason, exc.detail)
        if not decoded:
            return
        stats.ingest_batches += 1
        stats.ingest_batch_max_seen = max(stats.ingest_batch_max_seen, len(decoded))
        outcomes, republish = await self._apply(decoded, now)
        self._metrics.observe_ingest_batch(
            messages=len(decoded), duration_s=time.perf_counter() - started
        )
        debug = log.isEnabledFor(logging.DEBUG)
        for (topic_name, message), outcome in zip(decoded, outcomes, strict=True):
            if outcome == store.APPLIED:
                stats.applied += 1
                if debug:
                    log.debug(
                        "device message applied",
                        extra={"device": message.device_id, "topic": topic_name},
                    )
            elif outcome in _STALE_KEYS:
                stats.stale[outcome] += 1
                log.info(
                    "stale device message ignored",
                    extra={"device": message.device_id, "topic": topic_name, "reason": outcome},
                )
            elif outcome is not None and outcome in _REJECT_DETAILS:
                stats.reject(topic_name, message.device_id, outcome, _REJECT_DETAILS[outcome])
        if republish:
            log.info("republishing desired after birth", extra={"devices": republish})
            self._republish(republish)

    async def _apply(
        self, decoded: Sequence[tuple[str, DeviceMessage]], now: datetime
    ) -> tuple[list[str | None], list[str]]:
        """Apply in one transaction; on an unexpected error, retry one message at a time."""
        messages = [message for _, message in decoded]
        try:
            result = await asyncio.to_thread(self._apply_sync, messages, now)
        except Exception:
            log.exception(
                "ingest batch failed; retrying message by message",
                extra={"messages": len(messages)},
            )
        else:
            return list(result.outcomes), result.republish
        outcomes: list[str | None] = []
        republish: list[str] = []
        for topic_name, message in decoded:
            try:
                one = await asyncio.to_thread(self._apply_sync, [message], now)
            except Exception:
                self._stats.count_internal_error()
                log.exception(
                    "ingest failed for a message; dropped",
                    extra={"device": message.device_id, "topic": topic_name},
                )
                outcomes.append(None)
            else:
                outcomes.append(one.outcomes[0])
                republish.extend(one.republish)
        return outcomes, republish

    def _apply_sync(self, messages: Sequence[DeviceMessage], now: datetime) -> store.ApplyResult:
        with new_session(self._engine) as session:
            return store.apply_messages(session, messages, now=now)
