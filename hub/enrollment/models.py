"""Tables for enrollment tokens and the device certificates the CA issued."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Column, String
from sqlmodel import Field, SQLModel

from hub.db import UTCDateTime


class EnrollmentToken(SQLModel, table=True):
    __tablename__ = "enrollment_token"

    token_hash: str = Field(sa_column=Column(String(64), primary_key=True))
    device_id: str | None = Field(default=None, sa_column=Column(String(64), nullable=True))
    uses_left: int = Field(sa_column=Column(BigInteger, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    labels: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class DeviceCertificate(SQLModel, table=True):
    __tablename__ = "device_certificate"

    serial: str = Field(sa_column=Column(String(48), primary_key=True))  # hex: > 64 bits
    device_id: str = Field(sa_column=Column(String(64), nullable=False, index=True))
    not_after: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    issued_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
