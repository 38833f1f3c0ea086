"""``/bundles``: upload, list, read, delete and download signed bundles.

Rules:
- Domain errors of :mod:`hub.bundles` become HTTP errors here and only here:
  BundleTooLarge -> 413, BundleRejected -> 422, NoFleetRoot -> 503,
  BundleNotFound -> 404, BundleInUse -> 409, BundleFileMissing -> 500.
- An upload is streamed: the body is read chunk by chunk from
  ``request.stream()`` into a temporary file (never ``request.body()``), with
  at most ``bundle_io_chunk_bytes`` held in memory, and refused with 413 the
  moment it passes ``max_bundle_bytes`` (at once if ``Content-Length`` says so).
  It is verified against the fleet root before anything is recorded; a refused
  or interrupted upload leaves no file behind.
- Blocking work (file writes, verification, SQL) runs in worker threads; the
  upload handler itself is async only to read the stream.
- Downloads honour single byte ranges (``bytes=a-b``, ``bytes=a-``,
  ``bytes=-n``): 206 with ``Content-Range``, 416 when unsatisfiable. The
  ``ETag`` is the quoted SHA-256, so ``If-Range`` works for resuming.
- Upload and delete need the ``operator`` role. The file download (GET and
  HEAD) is on ``files_router``, open without a token: agents fetch bundles
  with no API token, and every device verifies what it fetched against the
  fleet root (docs/security.md, "Open routes").
- The bytes a download sends count in the hub's metrics
  (``driftless_bundle_served_bytes_total{transport="http"}``), as they leave.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from hub.api.deps import (
    BundleFilesDep,
    ClockDep,
    FleetRootDep,
    MetricsDep,
    SessionDep,
    SettingsDep,
)
from hub.api.problems import responses
from hub.api.route import HubRoute, OpenRoute
from hub.auth.guard import require
from hub.auth.models import Role
from hub.bundles import store
from hub.bundles.errors import (
    BundleFileMissing,
    BundleInDeployment,
    BundleInUse,
    BundleNotFound,
    BundleRejected,
    BundleTooLarge,
    NoFleetRoot,
)
from hub.bundles.files import MAX_BUNDLE_FILE_BYTES, BundleUpload
from hub.bundles.intake import verify_upload
from hub.bundles.models import BundlePage, BundlePublic
from hub.bundles.refs import SHA256_PATTERN
from hub.metrics import HubMetrics
from hub.settings import API_MAX_OFFSET, API_MAX_PAGE_SIZE, HubSettings

router = APIRouter(prefix="/bundles", tags=["bundles"], route_class=HubRoute)
files_router = APIRouter(prefix="/bundles", tags=["bundles"], route_class=OpenRoute)

Sha256Path = Annotated[
    str, Path(description="SHA-256 of the whole bundle file, lowercase hex", pattern=SHA256_PATTERN)
]
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"

_UPLOAD_BODY = {
    "required": True,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


def _declared_length(request: Request) -> int | None:
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "invalid Content-Length") from None


async def _receive(request: Request, upload: BundleUpload, settings: HubSettings) -> None:
    """Copy the request body into ``upload``; raises BundleTooLarge the moment it is too long."""
    pending: list[bytes] = []
    pending_bytes = received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > settings.max_bundle_bytes:
            raise BundleTooLarge(settings.max_bundle_bytes)
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= settings.bundle_io_chunk_bytes:
            data = b"".join(pending)
            pending.clear()
            pending_bytes = 0
            await run_in_threadpool(upload.write, data)
    if pending:
        await run_in_threadpool(upload.write, b"".join(pending))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=BundlePublic,
    max_body_size=MAX_BUNDLE_FILE_BYTES,  # the real limit, max_bundle_bytes, is checked below
    dependencies=[Depends(require(Role.operator))],
    openapi_extra={"requestBody": _UPLOAD_BODY},
    responses={
        200: {"model": BundlePublic, "description": "already stored (idempotent)"},
        **responses(400, 403, 413, 422, 503),
    },
)
async def upload_bundle(
    *,
    request: Request,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    files: BundleFilesDep,
    fleet_root: FleetRootDep,
    clock: ClockDep,
) -> BundlePublic:
    """Upload a bundle file as the raw request body; stored once verified against the fleet root."""
    declared = _declared_length(request)
    try:
        if declared is not None and declared > settings.max_bundle_bytes:
            raise BundleTooLarge(settings.max_bundle_bytes)
        trusted = await run_in_threadpool(
            lambda: fleet_root.current(
                now=clock().timestamp(), clock_skew_s=settings.bundle_clock_skew_s
            )
        )
        upload = await run_in_threadpool(files.begin_upload, max_bytes=settings.max_bundle_bytes)
        try:
            await _receive(request, upload, settings)
            sha256 = await run_in_threadpool(upload.finish)
            now = clock()
            verified = await run_in_threadpool(
                lambda: verify_upload(
                    upload.path,
                    sha256=sha256,
                    size=upload.size,
                    trusted_root=trusted,
                    now=now.timestamp(),
                    clock_skew_s=settings.bundle_clock_skew_s,
                )
            )
            row, created = await run_in_threadpool(
                lambda: store.add_bundle(
                    session, verified=verified, upload=upload, files=files, now=now
                )
            )
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled request still cleans up
                await run_in_threadpool(upload.discard)
    except BundleTooLarge as exc:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(exc)) from None
    except BundleRejected as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"bundle refused: {exc}"
        ) from None
    except NoFleetRoot as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    except ClientDisconnect:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "upload interrupted: the client disconnected"
        ) from None
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{row.sha256}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return BundlePublic.from_row(row)


@router.get("", response_model=BundlePage)
def list_bundles(
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int | None, Query(ge=1, le=API_MAX_PAGE_SIZE, description="page size")] = None,
    offset: Annotated[int, Query(ge=0, le=API_MAX_OFFSET)] = 0,
    name: Annotated[str | None, Query(pattern=NAME_PATTERN, description="bundle name")] = None,
) -> BundlePage:
    page = settings.page_size_default if limit is None else limit
    if page > settings.page_size_max:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"limit {page} exceeds the maximum page size {settings.page_size_max}",
        )
    rows, total = store.list_bundles(session, limit=page, offset=offset, name=name)
    return BundlePage(
        items=[BundlePublic.from_row(r) for r in rows], total=total, limit=page, offset=offset
    )


@router.get("/{sha256}", response_model=BundlePublic, responses=responses(404))
def get_bundle(sha256: Sha256Path, session: SessionDep) -> BundlePublic:
    try:
        return BundlePublic.from_row(store.get_bundle(session, sha256=sha256))
    except BundleNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.delete(
    "/{sha256}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require(Role.operator))],
    responses=responses(403, 404, 409),
)
def delete_bundle(sha256: Sha256Path, session: SessionDep, files: BundleFilesDep) -> Response:
    try:
        store.delete_bundle(session, sha256=sha256, files=files)
    except BundleNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except (BundleInUse, BundleInDeployment) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return Response(status_code=status.HTTP_204_NO_CONTENT)


_FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {}}, "description": "the bundle file"},
    206: {"description": "the requested byte range, with Content-Range"},
    416: {"description": "range not satisfiable; Content-Range: bytes */SIZE"},
    **responses(404, 500),
}


class _CountedFileResponse(FileResponse):
    """A bundle file download that counts the bytes it sends (on the event loop)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        stat_result: os.stat_result,
        filename: str,
        headers: dict[str, str],
        metrics: HubMetrics,
    ) -> None:
        super().__init__(
            path,
            stat_result=stat_result,
            media_type="application/octet-stream",
            filename=filename,
            headers=headers,
        )
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        announced = 0

        async def counted(message: Message) -> None:
            nonlocal announced
            await send(message)
            kind = message["type"]
            if kind == "http.response.body":
                self._metrics.count_http_bundle_bytes(len(message.get("body", b"")))
            elif kind == "http.response.start":
                announced = int(dict(message.get("headers", [])).get(b"content-length", 0))
            elif kind == "http.response.pathsend":  # the server sends the whole file itself
                self._metrics.count_http_bundle_bytes(announced)

        await super().__call__(scope, receive, counted)


# One route for both methods, so a 405 or OPTIONS names both in ``Allow`` (the schema
# gets an operation id per method: hub.api.main.finish_openapi).
@files_router.api_route(
    "/{sha256}/file",
    methods=["GET", "HEAD"],
    response_class=FileResponse,
    responses=_FILE_RESPONSES,
    operation_id="download_bundle",
)
def download_bundle(
    sha256: Sha256Path, session: SessionDep, files: BundleFilesDep, metrics: MetricsDep
) -> Response:
    """The bundle file, whole or one byte range (``Range: bytes=a-b``); resumable with If-Range."""
    try:
        row, path = store.bundle_path(session, sha256=sha256, files=files)
        stat_result = os.stat(path)
    except BundleNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except (BundleFileMissing, FileNotFoundError):
        raise HTTPException(
            status.HTTP_500_INTERNAL_SERVER_ERROR, str(BundleFileMissing(sha256))
        ) from None
    return _CountedFileResponse(
        path,
        stat_result=stat_result,
        filename=f"{row.name}-{row.version}.bundle",
        headers={
            "ETag": f'"{row.sha256}"',
            "Cache-Control": "private, max-age=31536000, immutable",
        },
        metrics=metrics,
    )
