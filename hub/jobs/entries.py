"""Jobs in desired documents: which entries a device's document carries, and how.

Rules (``docs/jobs.md``, "Delivery"):
- A device's document carries, as ``config["jobs"]``, every job handed out to it
  and not finished (``job_device`` rows with ``handed_out_at`` set and state
  ``queued`` or ``in_progress``), in ``seq`` order, in the agent's format
  (``edge_agent/jobs.py``) plus ``expires_at`` (epoch seconds).
- The entries follow the jobs the device's own document lists (what an operator
  put in ``PUT /devices/{id}/desired``), which stay first and as written; an id
  the own document already lists is not added twice. A non-list own ``jobs`` is
  replaced by the hub's entries.
- :func:`with_jobs` is applied to the device's own document (the base layer) wherever
  a document is composed (``hub/deployments/reconcile.py``,
  ``hub/devices/store.py``), so any recomposition keeps the handed-out jobs and
  drops finished ones; :mod:`hub.jobs.store` refreshes the member alone when only
  the jobs change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy import select as sa_select

from hub.jobs.models import Job, JobDevice
from protocols import JOBS_KEY

OPEN_STATES = ("queued", "in_progress")
_JOBS: Table = Job.__table__  # type: ignore[attr-defined]
_ROWS: Table = JobDevice.__table__  # type: ignore[attr-defined]


def entry(job: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: a job row (``job`` table columns) as a document entry."""
    return {
        "id": job["id"],
        "command": list(job["command"]),
        "deadline_s": job["deadline_s"],
        "env": dict(job["env"] or {}),
        "idempotent": bool(job["idempotent"]),
        "expires_at": job["expires_at"].timestamp(),
    }


def job_entries(
    connection: Any, device_ids: Iterable[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The entries each device's document carries (module rules), by device id, in the
    caller's transaction; devices without any are absent. ``device_ids``: only these."""
    query = (
        sa_select(_ROWS.c.device_id, *(_JOBS.c[n] for n in _ENTRY_COLUMNS))
        .join(_JOBS, _JOBS.c.id == _ROWS.c.job_id)
        .where(_ROWS.c.handed_out_at.is_not(None), _ROWS.c.state.in_(OPEN_STATES))
        .order_by(_ROWS.c.device_id, _ROWS.c.seq, _ROWS.c.job_id)
    )
    if device_ids is not None:
        wanted = sorted(set(device_ids))
        if not wanted:
            return {}
        query = query.where(_ROWS.c.device_id.in_(wanted))
    out: dict[str, list[dict[str, Any]]] = {}
    for row in connection.execute(query).mappings():
        out.setdefault(row["device_id"], []).append(entry(row))
    return out


_ENTRY_COLUMNS = ("id", "command", "deadline_s", "env", "idempotent", "expires_at")


def with_jobs(
    own: Mapping[str, Any], entries: Sequence[Mapping[str, Any]] | None
) -> dict[str, Any]:
    """Pure: the device's own document with the hub's job ``entries`` after its own
    jobs (module rules); ``own`` unchanged (a copy) when there are none."""
    if not entries:
        return dict(own)
    listed = own.get(JOBS_KEY)
    mine = list(listed) if isinstance(listed, list) else []
    ids = {e.get("id") for e in mine if isinstance(e, Mapping)}
    return {**own, JOBS_KEY: mine + [dict(e) for e in entries if e["id"] not in ids]}
