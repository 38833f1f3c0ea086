"""The layers a device's document is merged from, read from the deployment table.

Called by :mod:`hub.devices.store` when a device's own document changes (its
deployments stay merged in) and by the placement controller's commit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlmodel import Session, col, select

from hub.deployments.merge import Layer
from hub.deployments.models import Deployment


def layer_of(name: str, spec: Mapping[str, Any]) -> Layer:
    """Pure: a stored spec as a merge layer."""
    workloads = spec.get("workloads") or []
    return Layer(
        name=name,
        priority=int(spec.get("priority", 0)),
        workloads=tuple(w for w in workloads if isinstance(w, Mapping)),
    )


def layers_for(
    session: Session, names: Iterable[str], cache: dict[str, Layer | None]
) -> list[Layer]:
    """The layers of the deployments ``names`` (a deleted one is skipped); ``cache`` keeps
    what one transaction already read."""
    wanted = [name for name in names if name not in cache]
    if wanted:
        rows = session.exec(select(Deployment).where(col(Deployment.name).in_(wanted))).all()
        found = {row.name: layer_of(row.name, row.spec) for row in rows}
        for name in wanted:
            cache[name] = found.get(name)
    return [layer for name in names if (layer := cache.get(name)) is not None]
