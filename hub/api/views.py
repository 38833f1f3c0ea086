"""JSON answers built straight from database rows, for the API's hot reads.

Rules:
- The shape is exactly :class:`hub.models.DevicePublic` (a test compares the two
  on the same rows); the models stay the schema in ``/docs``.
- Built with msgspec from plain rows, skipping the ORM load, the public model
  and FastAPI's second validation of the returned model: listing 100 devices
  went from ~11 ms of hub CPU to a fraction of it (``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from fastapi import Response

from hub.models import InventoryPublic

_PHASES = frozenset({"applied", "applying", "failed"})
_INVENTORY_KEYS = tuple(InventoryPublic.model_fields)
_encoder = msgspec.json.Encoder()


def device(row: Mapping[Any, Any]) -> dict[str, Any]:
    """The public view of one device row (``in_sync`` and ``status`` derived)."""
    phase = row["report_phase"] if row["report_phase"] in _PHASES else None
    inventory = row["inventory"]
    return {
        "id": row["id"],
        "labels": row["labels"],
        "created_at": row["created_at"],
        "desired_generation": row["desired_generation"],
        "desired_config": row["desired_config"],
        "desired_updated_at": row["desired_updated_at"],
        "reported_generation": row["reported_generation"],
        "failed_generation": row["failed_generation"],
        "report_phase": phase,
        "report_error": row["report_error"],
        "report_generation": row["report_generation"],
        "last_report_epoch": row["last_report_epoch"],
        "last_report_seq": row["last_report_seq"],
        "session": row["session"],
        "online": row["online"],
        "last_seen": row["last_seen"],
        "agent_version": row["agent_version"],
        "inventory": ({key: inventory[key] for key in _INVENTORY_KEYS} if inventory else None),
        "in_sync": row["reported_generation"] == row["desired_generation"],
        "status": {
            "phase": phase,
            "generation": row["report_generation"],
            "error": row["report_error"],
        },
    }


def json_response(value: object) -> Response:
    return Response(_encoder.encode(value), media_type="application/json")


def device_page(
    rows: Sequence[Mapping[Any, Any]], *, total: int, limit: int, offset: int
) -> Response:
    """``GET /devices``: the page as :class:`hub.models.DevicePage` would encode it."""
    items = [device(row) for row in rows]
    return json_response({"items": items, "total": total, "limit": limit, "offset": offset})
