"""Enrollment over HTTP: operators make tokens, devices redeem one with a CSR.

Rules:
- ``POST /enroll`` is open (no API token): the enrollment token in the body is
  the credential, checked in one write transaction that also consumes it
  (``hub.enrollment.store.redeem``). Every refusal is 403 with the reason and
  consumes nothing; a malformed body is 422. A decommissioned id enrolled again
  answers 409 (nothing consumed) until the broker confirmed the old unit cut off.
- Device ids only: a certificate is issued for a name a device id may take
  (:func:`protocols.validate_device_id`), never for a ``hub:``/``admin:`` name.
- The answer carries what a device needs and nothing secret: its certificate,
  the fleet CA, the fleet root (if the hub has one) and the broker URL devices
  should use (``HubSettings.public_broker_url``).
- ``POST /enrollment-tokens`` needs the ``admin`` role (devices and keys are
  admin business); the secret appears once, in that answer.
- Each redeemed, refused (403) or deferred (409) enrollment is counted
  (``driftless_enrollments_total``).
- ``GET /crl`` (any token) is the fleet's certificate revocation list, for a
  broker that does not run beside the hub.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from pydantic import ConfigDict, StringConstraints
from pydantic import Field as PydanticField
from sqlmodel import SQLModel

from hub.api.deps import (
    ContextDep,
    DesiredDep,
    FleetRootDep,
    MetricsDep,
    NowDep,
    SessionDep,
    SettingsDep,
)
from hub.api.problems import responses
from hub.api.route import HubRoute, OpenRoute
from hub.auth.guard import require
from hub.auth.models import Role
from hub.devices.errors import CutOffPending
from hub.devices.models import DEVICE_ID_SCHEMA_PATTERN, Labels
from hub.enrollment import store
from hub.enrollment.revocation import current_crl, publish_crl
from hub.identity import CertificateAuthority
from hub.metrics import Enrollment

open_router = APIRouter(tags=["enrollment"], route_class=OpenRoute)
router = APIRouter(
    tags=["enrollment"],
    dependencies=[Depends(require(Role.admin))],
    route_class=HubRoute,
    responses=responses(403),
)
reader_router = APIRouter(tags=["enrollment"], route_class=HubRoute)  # any token (viewer)

MAX_CSR_CHARS = 8 * 1024
PEM = "application/x-pem-file"
MAX_TOKEN_LIFETIME_S = 366 * 24 * 3600


class EnrollRequest(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    token: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    device_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    csr_pem: Annotated[str, StringConstraints(min_length=1, max_length=MAX_CSR_CHARS)]


class EnrollResponse(SQLModel):
    device_id: str
    certificate_pem: str
    ca_pem: str
    root_json: str | None
    broker_url: str | None
    not_after: datetime
    created_device: bool


class EnrollmentTokenCreate(SQLModel):
    model_config = ConfigDict(extra="forbid")  # type: ignore[assignment]

    # A token for one device id (single use), or none: a claim token.
    device_id: Annotated[str, StringConstraints(pattern=DEVICE_ID_SCHEMA_PATTERN)] | None = None
    uses: int = PydanticField(default=1, ge=1, le=1_000_000)
    expires_in_s: int = PydanticField(default=24 * 3600, ge=60, le=MAX_TOKEN_LIFETIME_S)
    labels: Labels = PydanticField(default_factory=dict)


class EnrollmentTokenCreated(SQLModel):
    token: str
    device_id: str | None
    uses: int
    expires_at: datetime
    labels: dict[str, str]


def get_ca(context: ContextDep) -> CertificateAuthority:
    ca = context.ca
    if ca is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "enrollment is off: the hub has no identity directory (hub serve --identity-dir)",
        )
    return ca


CADep = Annotated[CertificateAuthority, Depends(get_ca)]


@open_router.post("/enroll", response_model=EnrollResponse, responses=responses(403, 409, 503))
def enroll(
    body: EnrollRequest,
    session: SessionDep,
    settings: SettingsDep,
    ca: CADep,
    now: NowDep,
    metrics: MetricsDep,
    root: FleetRootDep,
    desired: DesiredDep,
) -> EnrollResponse:
    try:
        enrolled = desired.enroll(
            session,
            ca=ca,
            secret=body.token,
            device_id=body.device_id,
            csr_pem=body.csr_pem.encode(),
            now=now,
        )
    except store.EnrollmentRefused as exc:
        metrics.enrollment(Enrollment.REFUSED)
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    except CutOffPending as exc:
        metrics.enrollment(Enrollment.CUT_OFF_PENDING)
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    metrics.enrollment(Enrollment.GRANTED)
    if settings.broker_acl_path is not None and store.was_revoked(session, body.device_id):
        # A device decommissioned before and enrolled again: the broker's ACL still
        # denies it everything until the hub rewrites it (and the broker reloads).
        publish_crl(session, ca, settings, now=now)
    root_json = None
    if root.path is not None:
        root_json = root.load().envelope.decode()
    return EnrollResponse(
        device_id=enrolled.device_id,
        certificate_pem=enrolled.certificate.pem.decode(),
        ca_pem=ca.cert_pem.decode(),
        root_json=root_json,
        broker_url=settings.public_broker_url,
        not_after=enrolled.certificate.not_after,
        created_device=enrolled.created_device,
    )


@router.post(
    "/enrollment-tokens",
    status_code=status.HTTP_201_CREATED,
    response_model=EnrollmentTokenCreated,
)
def create_enrollment_token(
    body: EnrollmentTokenCreate, session: SessionDep, now: NowDep
) -> EnrollmentTokenCreated:
    try:
        secret, row = store.create_token(
            session,
            device_id=body.device_id,
            uses=body.uses,
            expires_at=now + timedelta(seconds=body.expires_in_s),
            labels=body.labels,
            now=now,
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return EnrollmentTokenCreated(
        token=secret,
        device_id=row.device_id,
        uses=row.uses_left,
        expires_at=row.expires_at,
        labels=row.labels,
    )


@reader_router.get(
    "/crl", response_class=Response, responses={200: {"content": {PEM: {}}}, **responses(503)}
)
def certificate_revocation_list(session: SessionDep, ca: CADep, now: NowDep) -> Response:
    """The fleet's CRL (PEM), for a broker that does not run beside the hub."""
    return Response(current_crl(session, ca, now=now), media_type=PEM)
