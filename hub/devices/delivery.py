"""Delivery: desired documents read from the database, signed, published retained.

Rules:
- Desired state is read from the database at publish time (architecture rule
  1); delivery keeps only a *set* of device ids to publish, so changes made in
  quick succession coalesce and the newest generation always wins (invariant 2).
  Documents go out QoS 1 and retained on each device's ``desired`` topic, sealed by
  the hub's signer when it has one (encoded and signed in the reader's worker
  thread, off the event loop).
- A device id queued for publishing that has no desired document any more
  (decommissioned, deleted) gets an empty retained payload: the broker drops its
  copy.
- After every (re)connect delivery sweeps: it republishes every out-of-sync
  device, which covers a hub killed between the database commit and the publish
  and changes made while the broker was unreachable (invariant 3).
- With ``desired_poll_s`` set, delivery also follows the database's change feed
  (``device.desired_seq``, one value per committing transaction, and deletions in
  ``device_deletion``) so changes made through API-only hub processes (``hub serve
  --no-link``) are published, and deleted devices' retained documents cleared,
  too. A change is skipped only if the publisher already read that generation (or
  a newer one) from the database, so nothing is lost to the race and a change
  heard in-process is not published twice. What the feed finds goes through the
  link's change fan-out (``on_feed``), which also wakes the controllers.
- Each document published for a change heard of (in-process or from the feed)
  observes its delivery lag, from the change's ``desired_updated_at`` to the
  PUBACK, on the hub's clock; republishes (the sweep, a birth behind) observe
  nothing, as they deliver no new change.
- A publish that fails (the connection dropped) puts its devices back in the set
  and ends the connection; the session reconnects and the sweep follows.
- aiomqtt's ``publish()`` does not surface PUBACK reason codes (FIELD-NOTES), so a
  publish the broker refused (e.g. by ACL) looks like success here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Engine

import protocols
from hub.context import Clock
from hub.db import new_session
from hub.devices import store
from hub.metrics import HubMetrics
from hub.mqtt.session import MqttSession, Publish, SessionError
from hub.settings import HubSettings
from hub.signing import DocumentSigner
from hub.stats import LinkStats
from protocols import Channel

log = logging.getLogger(__name__)

# A deletion in the change feed outranks any generation read: the retained copy goes.
_DELETED = 2**62


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A desired document ready to publish: encoded and, with a signer, sealed."""

    generation: int
    payload: bytes
    changed_at: float  # the row's desired_updated_at (unix seconds)


class Delivery:
    """Publishes the newest desired document of every device it is told about.

    :meth:`changed` and :meth:`republish` belong to the event loop of the session it
    is attached to (the link marshals calls from other threads there).
    """

    def __init__(
        self,
        *,
        engine: Engine,
        settings: HubSettings,
        stats: LinkStats,
        metrics: HubMetrics,
        clock: Clock,
        signer: DocumentSigner | None,
        on_feed: Callable[[Sequence[str]], None],
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._stats = stats
        self._metrics = metrics
        self._clock = clock
        self._signer = signer
        self._on_feed = on_feed  # changes found in the feed, told as in-process ones are
        self._send: Publish | None = None
        self._pending: set[str] = set()
        # Pending because their desired state changed (not a sweep or a birth): their
        # next publish observes the delivery lag.
        self._changed: set[str] = set()
        # With the change feed on: the newest generation read for publishing, per device.
        # Set when the publisher reads the row (a worker thread), so a change the feed
        # sees is skipped only if the publisher read that generation or a newer one.
        self._read_generation: dict[str, int] = {}
        self._reading: set[str] = set()  # popped from pending, row not read yet
        self._deferred: dict[str, int] = {}  # feed changes seen for ids being read
        self._wake: asyncio.Event | None = None

    def attach(self, session: MqttSession) -> None:
        """Sweep on every connect; publish (and follow the feed) while connected."""
        self._send = session.publish
        session.on_connect(self._sweep)
        session.while_connected("mqtt-publish", self._publish_loop)
        if self._settings.desired_poll_s > 0:
            session.while_connected("desired-feed", self._poll_changes)

    # -- what to publish -----------------------------------------------------------------

    def changed(self, device_ids: Iterable[str]) -> None:
        """These devices' desired state changed (committed): publish their documents."""
        ids = list(device_ids)
        self._changed.update(ids)
        self.republish(ids)

    def republish(self, device_ids: Iterable[str]) -> None:
        """Publish these devices' current documents again (no new change)."""
        self._pending.update(device_ids)
        self._stats.pending_desired = len(self._pending)
        if self._wake is not None and self._pending:
            self._wake.set()

    async def _sweep(self) -> None:
        ids = await asyncio.to_thread(self._out_of_sync_ids)
        self._stats.sweeps += 1
        log.info("sweep: republishing out-of-sync devices", extra={"devices": len(ids)})
        self.republish(ids)

    def _out_of_sync_ids(self) -> list[str]:
        with new_session(self._engine) as session:
            return store.out_of_sync_ids(session)

    # -- the publisher -------------------------------------------------------------------

    async def _publish_loop(self) -> None:
        self._wake = wake = asyncio.Event()
        limit = self._settings.publish_batch_max
        while True:
            if not self._pending:
                wake.clear()
                await wake.wait()
                continue
            ids = [self._pending.pop() for _ in range(min(limit, len(self._pending)))]
            self._stats.pending_desired = len(self._pending)
            self._reading.update(ids)
            try:
                documents = await asyncio.to_thread(self._documents, ids)
            except Exception:
                self._stats.count_internal_error()
                log.exception("reading desired documents failed; will retry")
                self.republish(ids)
                await asyncio.sleep(self._settings.mqtt_reconnect_max_s)
                continue
            finally:
                self._done_reading(ids)
            await self._publish_documents(documents)

    def _done_reading(self, ids: Sequence[str]) -> None:
        """Re-queue a device the feed saw change while its row was being read, if newer."""
        self._reading.difference_update(ids)
        for device_id in ids:
            generation = self._deferred.pop(device_id, None)
            if generation is not None and self._read_generation.get(device_id, 0) < generation:
                self.republish([device_id])

    def _documents(self, device_ids: Sequence[str]) -> dict[str, _Outgoing | None]:
        """Worker thread: read the newest documents, encode and (with a signer) seal them."""
        with new_session(self._engine) as session:
            documents = store.desired_documents(session, device_ids=device_ids)
        out: dict[str, _Outgoing | None] = {}
        for device_id, document in documents.items():
            if document is None:
                self._read_generation.pop(device_id, None)
                out[device_id] = None
                continue
            if self._settings.desired_poll_s > 0:
                self._read_generation[device_id] = document.generation
            payload = protocols.encode(document)
            if self._signer is not None:
                payload = self._signer.seal(payload)
            out[device_id] = _Outgoing(document.generation, payload, document.issued_at)
        return out

    async def _publish_documents(self, documents: dict[str, _Outgoing | None]) -> None:
        assert self._send is not None
        send = self._send
        slots = asyncio.Semaphore(self._settings.mqtt_max_inflight_publishes)

        async def publish_one(device_id: str, document: _Outgoing | None) -> None:
            payload = b"" if document is None else document.payload
            async with slots:
                await send(protocols.topic(device_id, Channel.DESIRED), payload, retain=True)
            if device_id in self._changed:
                self._changed.discard(device_id)
                if document is not None:
                    self._metrics.observe_delivery_lag(
                        self._clock().timestamp() - document.changed_at
                    )
            if document is None:
                self._stats.desired_cleared += 1
                log.info("retained desired cleared", extra={"device": device_id})
            else:
                self._stats.desired_published += 1
                log.debug(  # per device: a fleet-wide change would flood info logs
                    "desired published",
                    extra={"device": device_id, "generation": document.generation},
                )

        items = list(documents.items())
        results = await asyncio.gather(
            *(publish_one(device_id, document) for device_id, document in items),
            return_exceptions=True,
        )
        lost: list[str] = []
        first_error: SessionError | None = None
        for (device_id, _), result in zip(items, results, strict=True):
            if isinstance(result, SessionError):
                lost.append(device_id)
                first_error = first_error or result
            elif isinstance(result, BaseException):
                self._stats.count_internal_error()
                log.error("desired not published", exc_info=result, extra={"device": device_id})
        if len(items) > len(lost):
            log.info("desired batch published", extra={"devices": len(items) - len(lost)})
        if lost:
            self._stats.publish_failures += len(lost)
            self.republish(lost)  # retried after the reconnect (the sweep would too)
            raise first_error or SessionError("publish failed")

    # -- the change feed (API-only processes) --------------------------------------------

    async def _poll_changes(self) -> None:
        """Publish changes other processes committed: poll ``desired_seq`` past a mark.

        Starts at the feed's current mark (the on-connect sweep covered what came
        before). A device already published at that generation or later is skipped,
        so a change this process also heard about in-process goes out once.
        """
        mark = await asyncio.to_thread(self._feed_mark)
        while True:
            await asyncio.sleep(self._settings.desired_poll_s)
            changes, mark = await asyncio.to_thread(self._feed_since, mark)
            fresh = []
            for device_id, changed in changes:
                generation = _DELETED if changed is None else changed
                if changed is None:  # a device registered again starts from generation 1
                    self._read_generation.pop(device_id, None)
                if device_id in self._pending:
                    continue  # the publisher will read the newest row anyway
                if device_id in self._reading:  # decided when that read is done
                    self._deferred[device_id] = max(generation, self._deferred.get(device_id, 0))
                elif self._read_generation.get(device_id, 0) < generation:
                    fresh.append(device_id)
            if fresh:
                self._stats.feed_changes += len(fresh)
                self._on_feed(fresh)

    def _feed_mark(self) -> int:
        with new_session(self._engine) as session:
            return store.desired_seq_now(session)

    def _feed_since(self, mark: int) -> tuple[list[tuple[str, int | None]], int]:
        with new_session(self._engine) as session:
            return store.desired_changes_since(
                session, seq=mark, limit=self._settings.publish_batch_max * 20
            )
