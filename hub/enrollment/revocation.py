"""Revocation reaches the broker: the CRL is rewritten and the broker told to re-read it.

Rules:
- Decommissioning is one transaction (:func:`hub.devices.store.decommission_device`):
  the certificates are revoked and the device marked, then the CRL and ACL
  reach the broker as below, and the link asks the broker to close the
  device's open connections (:mod:`hub.controllers.cutoff`), which neither the
  CRL nor the ACL reload does.
- Only for a broker beside the hub (``HubSettings.broker_crl_path``): the hub
  writes the CRL there by rename (a broker re-reading never sees half a file),
  and the ACL (``broker_acl_path``) with every device whose certificates are
  all revoked denied everything, then sends SIGHUP to the pid in
  ``broker_pid_file``: Mosquitto re-reads both without dropping sessions. A
  revoked certificate is refused at every later handshake.
- A broker elsewhere reads the CRL from the API (``GET /api/v1/crl``) or from
  ``driftless broker config``; the hub does not reach into other machines.
- Failing to signal the broker is logged, not raised: the revocation is
  already committed and the next reload picks it up.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal

from sqlmodel import Session

from hub.broker_config import hub_identities, render_acl, replace_file
from hub.devices import store as device_store
from hub.enrollment import store
from hub.identity import CertificateAuthority
from hub.settings import HubSettings

log = logging.getLogger(__name__)


def current_crl(session: Session, ca: CertificateAuthority, *, now: dt.datetime) -> bytes:
    """The CRL (PEM) for every certificate revoked so far."""
    return ca.crl(store.revoked(session), now=now)


def publish_crl(
    session: Session, ca: CertificateAuthority, settings: HubSettings, *, now: dt.datetime
) -> bool:
    """Write the CRL for the local broker and reload it; False when there is none configured."""
    path = settings.broker_crl_path
    if path is None:
        return False
    replace_file(path, current_crl(session, ca, now=now))
    if settings.broker_acl_path is not None:
        identities = (*hub_identities(settings.mqtt_client_id), *settings.broker_acl_admins)
        acl = render_acl(identities, store.cut_off_devices(session))
        replace_file(settings.broker_acl_path, acl.encode())
    reload_broker(settings)
    return True


def reload_broker(settings: HubSettings) -> None:
    """SIGHUP the broker named by ``broker_pid_file`` (if any); logs what it could not do."""
    if settings.broker_pid_file is None:
        return
    try:
        pid = int(settings.broker_pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        log.warning(
            "broker not reloaded; it will see the new CRL at its next reload",
            extra={"pid_file": str(settings.broker_pid_file), "error": str(exc)},
        )
        return
    log.info("broker reloaded", extra={"pid": pid})


def decommission(
    session: Session,
    ca: CertificateAuthority | None,
    settings: HubSettings,
    *,
    device_id: str,
    now: dt.datetime,
) -> device_store.Decommissioned:
    """Decommission ``device_id`` (revoked, refused, cut-off queued) and push the CRL.

    Raises DeviceNotFound.
    """
    done = device_store.decommission_device(session, device_id=device_id, now=now)
    if done.revoked_serials and ca is not None:
        publish_crl(session, ca, settings, now=now)
    log.info(
        "device decommissioned",
        extra={
            "device": device_id,
            "serials": [format(s, "x") for s in done.revoked_serials],
            "again": done.already,
        },
    )
    return done
