"""The desired-state service: every change to what devices should run goes through here.

Rules:
- The database is the truth (architecture rule 1): each method commits its
  change (through :mod:`hub.devices.store`, which bumps the generation and takes
  the next value of the change feed in the same transaction), and only then tells
  delivery which devices changed (:class:`DeliverySignal`). The signal is a hint
  that saves waiting for the next sweep or poll; losing it (no link in this
  process, the broker down, a crash right after the commit) loses nothing.
- A change that raises (a domain error of :mod:`hub.devices.errors`, or the
  enrollment's refusal) committed nothing and signals nothing.
- Routes call this service, never the link; controllers that change desired
  state will too. It changes rows, never publishes.
- Methods are synchronous (routes run them in FastAPI's thread pool); the
  signal is thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlmodel import Session

from hub.db import begin_write
from hub.deployments import reconcile
from hub.devices import store
from hub.devices.models import Device
from hub.enrollment import revocation
from hub.enrollment import store as enrollment_store
from hub.identity import CertificateAuthority
from hub.jobs import store as jobs_store
from hub.rollouts import store as rollouts
from hub.settings import HubSettings


class DeliverySignal(Protocol):
    """Implemented by the MQTT link (:class:`hub.mqtt.link.BrokerLink`)."""

    def desired_changed(self, device_ids: Iterable[str]) -> None:
        """Thread-safe: these devices' desired documents changed (or they were deleted),
        and the change is committed."""

    def fleet_changed(self) -> None:
        """Thread-safe: devices were registered (committed); no document changed, but
        placement may have work (a fleet deployment that selects them)."""


class DesiredState:
    """Commits desired-state changes, then signals delivery."""

    def __init__(self, *, settings: HubSettings, delivery: DeliverySignal) -> None:
        self._settings = settings
        self._delivery = delivery

    def set_device(
        self, session: Session, *, device_id: str, config: Mapping[str, Any], now: datetime
    ) -> Device:
        """Replace one device's whole desired config (generation + 1).

        Raises ConfigTooLarge, DeviceNotFound, DeviceDecommissioned or UnknownBundles.
        """
        row = store.set_desired(
            session,
            device_id=device_id,
            config=config,
            now=now,
            max_config_bytes=self._settings.max_config_bytes,
        )
        self._delivery.desired_changed([row.id])
        return row

    def override_locks(
        self,
        session: Session,
        *,
        device_id: str,
        workloads: Sequence[str] | None,
        until: datetime,
        now: datetime,
    ) -> Device:
        """Lift the device's update locks (of ``workloads``; None: all) until ``until``:
        a ``lock_override`` in its desired config, generation + 1, signed on delivery
        like every document. Raises ConfigTooLarge, DeviceNotFound or DeviceDecommissioned.
        """
        row = store.set_lock_override(
            session,
            device_id=device_id,
            workloads=workloads,
            until=until,
            now=now,
            max_config_bytes=self._settings.max_config_bytes,
        )
        self._delivery.desired_changed([row.id])
        return row

    def set_selector(
        self,
        session: Session,
        *,
        labels: Mapping[str, str] | None,
        config: Mapping[str, Any],
        now: datetime,
    ) -> list[tuple[str, int]]:
        """The same config on every active device whose labels include ``labels`` (all
        when None or empty), in one transaction; ``(device id, generation)`` by id.

        Raises ConfigTooLarge or UnknownBundles.
        """
        updated = store.set_desired_for_selector(
            session,
            labels=labels,
            config=config,
            now=now,
            max_config_bytes=self._settings.max_config_bytes,
        )
        self._delivery.desired_changed(device_id for device_id, _ in updated)
        return updated

    def reconcile_fleet(
        self,
        session: Session,
        *,
        now: datetime,
        put: Mapping[str, Mapping[str, Any]] | None = None,
        remove: Sequence[str] = (),
        labels: Mapping[str, Mapping[str, str]] | None = None,
        dry_run: bool = False,
    ) -> reconcile.Outcome:
        """Plan the fleet with these deployment and label changes and commit it (or, as a
        dry run, only say what it would change): every device whose merged document
        changes gets generation + 1 (:mod:`hub.deployments.reconcile`). The deployment
        routes, the label routes and the placement controller all come through here.

        Raises DeploymentNotFound, InvalidSpec or UnknownBundles; nothing is written then.
        """
        outcome = reconcile.run(
            session,
            now=now,
            max_config_bytes=self._settings.max_config_bytes,
            put=put,
            remove=remove,
            labels=labels,
            dry_run=dry_run,
        )
        if outcome.bumped:
            self._delivery.desired_changed(outcome.bumped)
        if outcome.rollouts_created:
            self._delivery.fleet_changed()  # the rollout controller starts them
        return outcome

    def rollout_command(
        self, session: Session, *, deployment: str, action: str, reason: str, now: datetime
    ) -> dict[str, Any]:
        """An operator's command on a deployment's rollout (:mod:`hub.rollouts.store`):
        committed with the documents it changes (an abort's restore), then delivery is
        signalled and the rollout controller woken. Returns the rollout's row.

        Raises RolloutNotFound or RolloutRefused; nothing is written then."""
        row, bumped = rollouts.apply_command(
            session,
            deployment=deployment,
            action=action,
            reason=reason,
            now=now,
            max_config_bytes=self._settings.max_config_bytes,
        )
        if bumped:
            self._delivery.desired_changed(bumped)
        self._delivery.fleet_changed()  # the rollout controller carries on from the rows
        return row

    # -- one-shot jobs (hub/jobs, hub/controllers/jobs; docs/jobs.md)

    def jobs_queued(self) -> None:
        """A job was created (committed): the jobs controller looks now rather than at its
        next interval. Changes no document (hand-outs are the controller's)."""
        self._delivery.fleet_changed()

    def cancel_job(self, session: Session, *, job_id: str, reason: str, now: datetime) -> None:
        """Cancel a job; the devices it was handed out to and that did not start it lose
        it from their documents (generation + 1), in the same transaction.

        Raises JobNotFound or JobFinished; nothing is written then.
        """
        begin_write(session)
        try:
            handed = jobs_store.cancel(session, job_id=job_id, reason=reason, now=now)
            bumped = jobs_store.refresh_documents(
                session,
                device_ids=handed,
                now=now,
                max_config_bytes=self._settings.max_config_bytes,
            )
        except BaseException:
            session.rollback()
            raise
        session.commit()
        self._delivery.desired_changed(bumped)
        self._delivery.fleet_changed()

    def apply_jobs(
        self,
        session: Session,
        *,
        rows: Sequence[jobs_store.RowChange],
        jobs: Sequence[jobs_store.JobChange],
        documents: Sequence[str],
        now: datetime,
    ) -> list[str]:
        """Commit the jobs controller's decisions and the documents they change (a job
        handed out joins the device's ``jobs``; generation + 1); returns the bumped
        devices (:func:`hub.jobs.store.commit_changes`)."""
        bumped = jobs_store.commit_changes(
            session,
            rows=rows,
            jobs=jobs,
            documents=documents,
            now=now,
            max_config_bytes=self._settings.max_config_bytes,
        )
        self._delivery.desired_changed(bumped)
        return bumped

    def devices_registered(self) -> None:
        """Devices were registered (committed): the placement controller looks now rather
        than at its next interval, so a fleet deployment reaches them at once."""
        self._delivery.fleet_changed()

    def decommission(
        self,
        session: Session,
        *,
        ca: CertificateAuthority | None,
        device_id: str,
        now: datetime,
    ) -> store.Decommissioned:
        """Revoke, refuse and clear the device; the broker cut-off is queued in the same
        transaction (the cut-off controller asks the broker). Again: asks again.

        Raises DeviceNotFound.
        """
        done = revocation.decommission(session, ca, self._settings, device_id=device_id, now=now)
        self._delivery.desired_changed([device_id])  # clears the retained document
        return done

    def purge(self, session: Session, *, device_id: str, now: datetime) -> None:
        """Forget a decommissioned device (its row); delivery clears what is retained.

        Raises DeviceNotFound, DeviceActive, or CutOffPending while the broker has not
        confirmed the cut-off (when the hub cuts devices off at all).
        """
        store.purge_device(
            session,
            device_id=device_id,
            now=now,
            require_cut_off=self._settings.cuts_off_sessions,
        )
        self._delivery.desired_changed([device_id])

    def enroll(
        self,
        session: Session,
        *,
        ca: CertificateAuthority,
        secret: str,
        device_id: str,
        csr_pem: bytes,
        now: datetime,
    ) -> enrollment_store.Enrolled:
        """Redeem an enrollment token (:func:`hub.enrollment.store.redeem`). A
        decommissioned id enrolled again is reactivated, which is a desired change: it
        is signalled once committed.

        Raises EnrollmentRefused, or CutOffPending until the broker confirmed the old
        unit cut off (when the hub cuts devices off at all).
        """
        enrolled = enrollment_store.redeem(
            session,
            secret=secret,
            device_id=device_id,
            csr_pem=csr_pem,
            ca=ca,
            now=now,
            require_cut_off=self._settings.cuts_off_sessions,
        )
        if enrolled.reactivated:
            self._delivery.desired_changed([device_id])
        elif enrolled.created_device:
            self._delivery.fleet_changed()
        return enrolled
