"""``/fleet``: bulk desired changes by label selector, and fleet-wide counts.

Rules:
- A bulk change is one transaction; every targeted device's generation grows
  by exactly 1 (ConfigTooLarge -> 413, nothing written).
- The bulk change needs ``operator``; the summary any token (``viewer``).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status

from hub import store
from hub.api.deps import LinkDep, NowDep, SessionDep, SettingsDep
from hub.api.problems import responses
from hub.api.route import HubRoute
from hub.auth.api import require
from hub.auth.models import Role
from hub.errors import ConfigTooLarge, UnknownBundles
from hub.models import DeviceGeneration, FleetDesiredResult, FleetDesiredUpdate, FleetSummary

router = APIRouter(prefix="/fleet", tags=["fleet"], route_class=HubRoute)


@router.put(
    "/desired",
    response_model=FleetDesiredResult,
    responses=responses(403, 413),
    dependencies=[Depends(require(Role.operator))],
)
def set_fleet_desired(
    body: FleetDesiredUpdate,
    session: SessionDep,
    settings: SettingsDep,
    link: LinkDep,
    now: NowDep,
) -> FleetDesiredResult:
    """Set the same desired config on every device matching the selector (all if omitted)."""
    labels = body.selector.labels if body.selector is not None else None
    try:
        updated = store.set_desired_for_selector(
            session,
            labels=labels,
            config=body.config,
            now=now,
            max_config_bytes=settings.max_config_bytes,
        )
    except ConfigTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except UnknownBundles as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    link.desired_changed(device_id for device_id, _ in updated)
    return FleetDesiredResult(
        updated=len(updated),
        devices=[DeviceGeneration(id=i, generation=g) for i, g in updated],
    )


@router.get("/summary", response_model=FleetSummary)
def fleet_summary(session: SessionDep) -> FleetSummary:
    s = store.fleet_summary(session)
    return FleetSummary(
        total=s.total,
        online=s.online,
        in_sync=s.in_sync,
        out_of_sync=s.out_of_sync,
        failed=s.failed,
        by_generation=s.by_generation,
        decommissioned=s.decommissioned,
    )
