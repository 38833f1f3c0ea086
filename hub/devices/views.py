"""JSON answers built straight from database rows, for the API's hot reads.

Rules:
- The shape is :func:`hub.devices.models.public_device`, which ``DevicePublic.from_row``
  validates too (a test compares the two on the same rows); the models stay the
  schema in ``/docs``.
- Built with msgspec from plain rows, skipping the ORM load, the public model
  and FastAPI's second validation of the returned model: listing 100 devices
  went from ~11 ms of hub CPU to a fraction of it (``docs/benchmarks.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from fastapi import Response

from hub.devices.models import public_device as device  # one definition of the public shape

__all__ = ["device", "device_page", "json_response"]

_encoder = msgspec.json.Encoder()


def json_response(value: object) -> Response:
    return Response(_encoder.encode(value), media_type="application/json")


def device_page(
    rows: Sequence[Mapping[Any, Any]], *, total: int, limit: int, offset: int
) -> Response:
    """``GET /devices``: the page as :class:`hub.devices.models.DevicePage` would encode it."""
    items = [device(row) for row in rows]
    return json_response({"items": items, "total": total, "limit": limit, "offset": offset})
