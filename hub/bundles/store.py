"""Data access for the bundle store: the only code that writes a ``Bundle`` row or a stored file.

Rules:
- Functions take the session first and everything else by keyword; time
  (``now``) is a parameter. They raise the domain errors of
  :mod:`hub.bundles.errors`, never HTTP errors.
- Writes take the database's write lock up front (:func:`hub.db.begin_write`)
  and change the file inside that transaction: the file is placed before the
  row commits, and retired before the row's deletion commits (and restored if
  that commit fails). Another hub process sharing the database therefore never
  sees a row whose file is being removed; a crash leaves at worst an orphan file.
- Adding is idempotent: a bundle already stored is returned as it is, and its
  file is put back if it had gone missing.
- References from desired state follow :mod:`hub.bundles.refs`; the SQL below
  only narrows the scan (a case-insensitive substring match on the JSON text),
  and the exact rule is applied in Python to the rows it finds.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import Text, cast, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from hub.bundles.errors import (
    BundleFileMissing,
    BundleInDeployment,
    BundleInUse,
    BundleNotFound,
)
from hub.bundles.files import BundleFiles, BundleUpload
from hub.bundles.intake import VerifiedBundle
from hub.bundles.models import Bundle
from hub.bundles.refs import is_sha256, references
from hub.db import begin_write
from hub.deployments.models import Deployment
from hub.devices.models import Device

IN_USE_SAMPLE_MAX = 10
_SCAN_BATCH_ROWS = 256


def _row(verified: VerifiedBundle, now: datetime) -> Bundle:
    manifest = verified.manifest
    return Bundle(
        sha256=verified.sha256,
        name=manifest.name,
        version=manifest.version,
        security_version=manifest.security_version,
        kind=manifest.kind,
        size=verified.size,
        payload_sha256=manifest.payload.sha256,
        payload_size=manifest.payload.size,
        payload_offset=verified.payload_offset,
        created=manifest.created,
        expires=manifest.expires,
        signer_keyids=list(verified.signer_keyids),
        manifest=verified.manifest_object,
        uploaded_at=now,
    )


def add_bundle(
    session: Session,
    *,
    verified: VerifiedBundle,
    upload: BundleUpload,
    files: BundleFiles,
    now: datetime,
) -> tuple[Bundle, bool]:
    """Store a verified, finished upload under its SHA-256; returns ``(row, created)``.

    ``created`` is False when the bundle was already stored; the upload is then
    left for the caller to discard (unless it restored a missing file).
    """
    sha256 = verified.sha256
    begin_write(session)
    existing = session.get(Bundle, sha256)
    if existing is not None:
        if not files.exists(sha256):
            files.place(upload, sha256)
        session.commit()  # ends the write transaction; the row stays loaded
        return existing, False
    files.place(upload, sha256)
    row = _row(verified, now)
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        # Another process stored the same bytes first; the file now is theirs.
        session.rollback()
        return get_bundle(session, sha256=sha256), False
    except BaseException:
        session.rollback()
        files.remove(sha256)
        raise
    return row, True


def get_bundle(session: Session, *, sha256: str) -> Bundle:
    """Raises BundleNotFound."""
    row = session.get(Bundle, sha256) if is_sha256(sha256) else None
    if row is None:
        raise BundleNotFound(sha256)
    return row


def list_bundles(
    session: Session, *, limit: int, offset: int, name: str | None = None
) -> tuple[list[Bundle], int]:
    """One page of bundles (by name, newest upload first, then SHA-256) and the total."""
    where = [] if name is None else [col(Bundle.name) == name]
    total = session.exec(select(func.count()).select_from(Bundle).where(*where)).one()
    rows = session.exec(
        select(Bundle)
        .where(*where)
        .order_by(col(Bundle.name), col(Bundle.uploaded_at).desc(), col(Bundle.sha256))
        .limit(limit)
        .offset(offset)
    ).all()
    return list(rows), int(total)


def bundle_path(session: Session, *, sha256: str, files: BundleFiles) -> tuple[Bundle, Path]:
    """The row and the file path of a stored bundle; raises BundleNotFound, BundleFileMissing."""
    row = get_bundle(session, sha256=sha256)
    path = files.path(row.sha256)
    if not path.is_file():
        raise BundleFileMissing(row.sha256)
    return row, path


def devices_referencing(
    session: Session, *, sha256: str, sample_max: int = IN_USE_SAMPLE_MAX
) -> tuple[int, list[str]]:
    """How many devices' desired configs reference ``sha256``, and the first ids by id order.

    Scans in batches; only configs whose JSON text contains the hash are loaded.
    """
    if not is_sha256(sha256):
        raise ValueError(f"not a SHA-256 in lowercase hex: {sha256[:80]!r}")
    statement = (
        select(Device.id, Device.desired_config)
        .where(cast(col(Device.desired_config), Text).ilike(f"%{sha256}%"))
        .order_by(col(Device.id))
        .execution_options(yield_per=_SCAN_BATCH_ROWS)
    )
    count = 0
    sample: list[str] = []
    for device_id, config in session.exec(statement):
        if isinstance(config, dict) and references(config, sha256):
            count += 1
            if len(sample) < sample_max:
                sample.append(device_id)
    return count, sample


def deployments_referencing(session: Session, *, sha256: str) -> list[str]:
    """The deployments whose workloads name ``sha256``, by name."""
    rows = session.exec(
        select(Deployment.name, Deployment.spec)
        .where(cast(col(Deployment.spec), Text).ilike(f"%{sha256}%"))
        .order_by(col(Deployment.name))
    )
    return [name for name, spec in rows if isinstance(spec, dict) and references(spec, sha256)]


def delete_bundle(session: Session, *, sha256: str, files: BundleFiles) -> None:
    """Remove a bundle and its file; raises BundleNotFound, or BundleInUse while referenced."""
    begin_write(session)
    row = session.get(Bundle, sha256) if is_sha256(sha256) else None
    if row is None:
        session.rollback()
        raise BundleNotFound(sha256)
    count, sample = devices_referencing(session, sha256=sha256)
    if count:
        session.rollback()
        raise BundleInUse(sha256, count, sample)
    named = deployments_referencing(session, sha256=sha256)
    if named:
        session.rollback()
        raise BundleInDeployment(sha256, named)
    retired = files.retire(sha256)
    session.delete(row)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        if retired is not None:
            files.restore(retired, sha256)
        raise
    if retired is not None:
        files.remove_retired(retired)
