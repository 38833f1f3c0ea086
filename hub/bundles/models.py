"""The ``bundle`` table and its API views (SQLModel model family).

Rules:
- ``Bundle`` rows are written only by :mod:`hub.bundles.store`, and only for
  files that passed verification; every column except ``uploaded_at`` comes
  from the verified bundle (the signed manifest or the file itself).
- The primary key is the SHA-256 of the whole bundle file; ``payload_sha256``
  is the manifest's hash of the payload alone. Two files may share a payload
  (the same release re-signed, or with a later expiry) and are then two rows.
- ``created`` and ``expires`` are the manifest's integer unix seconds, as
  signed; ``uploaded_at`` is the hub's clock, stored as UTC.
- This table lives in this package, not in ``hub/devices/models.py``; importing this
  module registers it on ``SQLModel.metadata`` (``hub/app.py`` does so before
  creating tables).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, String
from sqlmodel import Field, SQLModel

from hub.db import UTCDateTime


def _big() -> Any:
    return Field(sa_type=BigInteger, nullable=False)


class Bundle(SQLModel, table=True):
    """One verified bundle file in the store."""

    sha256: str = Field(sa_column=Column(String(64), primary_key=True))
    name: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    version: str = Field(sa_column=Column(String(64), nullable=False))
    security_version: int = _big()
    kind: str = Field(sa_column=Column(String(16), nullable=False))
    size: int = _big()
    """Bytes of the whole bundle file."""
    payload_sha256: str = Field(sa_column=Column(String(64), nullable=False))
    payload_size: int = _big()
    payload_offset: int = _big()
    """Where the payload starts in the file (header and signed manifest come first)."""
    created: int = _big()
    expires: int = _big()
    signer_keyids: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    manifest: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """The signed manifest object, exactly as verified."""
    uploaded_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class BundlePublic(SQLModel):
    """A stored bundle as the API shows it."""

    sha256: str
    name: str
    version: str
    security_version: int
    kind: str
    size: int
    payload_sha256: str
    payload_size: int
    payload_offset: int
    created: int
    expires: int
    signer_keyids: list[str]
    manifest: dict[str, Any]
    uploaded_at: datetime

    @classmethod
    def from_row(cls, row: Bundle) -> BundlePublic:
        """Pure: the public view of a row."""
        return cls.model_validate(row, from_attributes=True)


class BundlePage(SQLModel):
    """One page of ``GET /bundles``."""

    items: list[BundlePublic]
    total: int
    limit: int
    offset: int
