"""The admin API's routes, as the command line calls them (httpx, synchronous).

Rules:
- Only the routes of the design contracts (``docs/api.md``, "Deployments"):
  ``GET/PUT/DELETE /api/v1/deployments/{name}`` (``?dry_run=true`` for a preview),
  ``GET /api/v1/deployments`` (paged) and ``GET …/{name}/status``; rollouts
  (``docs/rollouts.md``): ``GET …/{name}/rollout`` and
  ``POST …/{name}/rollout/{action}`` with an optional ``{"reason"}``; jobs
  (``docs/jobs.md``): ``GET /api/v1/jobs``, ``GET /api/v1/jobs/{id}`` and
  ``POST /api/v1/jobs/{id}/cancel``.
- A refusal becomes :class:`~ctl.errors.ApiError` with the problem's title, detail
  and field errors; no answer, or an answer that is not the API's JSON, becomes
  :class:`~ctl.errors.HubUnreachable`. A 401 or 403 adds what to do about it.
- The token travels only in the ``Authorization`` header; no message carries it.
- Names go into the path percent-encoded, after the caller checked them.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import quote

import httpx

from ctl.errors import ApiError, HubUnreachable

API_PREFIX = "/api/v1"
PAGE_SIZE = 500
_HINTS = {
    401: " (give the hub's API token: --token-file FILE or DRIFTLESS_TOKEN)",
    403: " (changes need a token of role operator or admin)",
}


def api_base(url: str) -> str:
    """Pure: the API's base URL for a hub URL given with or without ``/api/v1``."""
    base = url.rstrip("/")
    return base if base.endswith(API_PREFIX) else base + API_PREFIX


class HubClient:
    """The deployment routes over one ``httpx.Client`` whose base URL is the API's."""

    def __init__(self, http: httpx.Client) -> None:
        self._http = http

    @classmethod
    def connect(
        cls, *, url: str, token: str | None, ca_file: str | None, timeout_s: float
    ) -> HubClient:
        """A client for the hub at ``url`` (``https://`` verified against ``ca_file`` when
        given, else the system's CAs)."""
        headers = {"Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        verify: ssl.SSLContext | bool = True
        if ca_file:
            try:
                verify = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise HubUnreachable(f"--ca-file {ca_file}: {exc}") from None
        return cls(
            httpx.Client(base_url=api_base(url), headers=headers, timeout=timeout_s, verify=verify)
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- routes

    def put_deployment(
        self, name: str, spec: Mapping[str, Any], *, dry_run: bool
    ) -> dict[str, Any]:
        """``PUT /deployments/{name}``: ``{"deployment", "preview"}`` (nothing stored on a
        dry run)."""
        return self._call("PUT", _path(name), dry_run=dry_run, body={"spec": dict(spec)})

    def delete_deployment(self, name: str, *, dry_run: bool) -> dict[str, Any]:
        """``DELETE /deployments/{name}``: ``{"preview"}``."""
        return self._call("DELETE", _path(name), dry_run=dry_run)

    def get_deployment(self, name: str) -> dict[str, Any]:
        return self._call("GET", _path(name))

    def find_deployment(self, name: str) -> dict[str, Any] | None:
        """The deployment, or None when the hub has none of that name (404)."""
        try:
            return self.get_deployment(name)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def deployment_status(self, name: str) -> dict[str, Any]:
        return self._call("GET", _path(name) + "/status")

    def list_deployments(self) -> list[dict[str, Any]]:
        """Every deployment, page by page (sorted as the hub sorts them)."""
        return list(self._pages())

    def _pages(self) -> Iterator[dict[str, Any]]:
        offset = 0
        while True:
            page = self._call("GET", "/deployments", params={"limit": PAGE_SIZE, "offset": offset})
            items = page.get("items")
            total = page.get("total")
            if not isinstance(items, list) or not isinstance(total, int):
                raise HubUnreachable("GET /deployments: the answer has no items and total")
            yield from items
            offset += len(items)
            if not items or offset >= total:
                return

    # ---------------------------------------------------------------- rollouts

    def get_rollout(self, name: str) -> dict[str, Any]:
        """``GET /deployments/{name}/rollout``: the deployment's newest rollout (404: none)."""
        return self._call("GET", _path(name) + "/rollout")

    def rollout_action(self, name: str, action: str, *, reason: str = "") -> dict[str, Any]:
        """``POST /deployments/{name}/rollout/{action}``: the rollout view after it (409: the
        rollout's state does not allow it; 404: no rollout). The body only with a reason."""
        body = {"reason": reason} if reason else None
        return self._call("POST", _path(name) + "/rollout/" + quote(action, safe=""), body=body)

    # ---------------------------------------------------------------- jobs

    def list_jobs(
        self, *, state: str | None = None, device_id: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """``GET /jobs``: newest first, at most ``limit``."""
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        if device_id:
            params["device_id"] = device_id
        page = self._call("GET", "/jobs", params=params)
        items = page.get("items")
        if not isinstance(items, list):
            raise HubUnreachable("GET /jobs: the answer has no items")
        return items

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", "/jobs/" + quote(job_id, safe=""))

    def cancel_job(self, job_id: str, *, reason: str = "") -> dict[str, Any]:
        """``POST /jobs/{id}/cancel``: the job view after it."""
        body = {"reason": reason} if reason else None
        return self._call("POST", "/jobs/" + quote(job_id, safe="") + "/cancel", body=body)

    # ---------------------------------------------------------------- transport

    def _call(
        self,
        method: str,
        path: str,
        *,
        dry_run: bool = False,
        body: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        query = dict(params or {})
        if dry_run:
            query["dry_run"] = "true"
        shown = API_PREFIX + path + ("?dry_run=true" if dry_run else "")
        try:
            response = self._http.request(method, path, params=query or None, json=body)
        except httpx.HTTPError as exc:
            base = str(self._http.base_url).removesuffix(API_PREFIX + "/").rstrip("/")
            raise HubUnreachable(
                f"{method} {shown}: cannot reach the hub at {base}: {exc}"
            ) from None
        if response.status_code >= 400:
            raise _refusal(method, shown, response)
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise HubUnreachable(
                f"{method} {shown}: {response.status_code} with an answer that is not the "
                "API's JSON (is --hub the hub's address?)"
            )
        return answer


def _path(name: str) -> str:
    return "/deployments/" + quote(name, safe="")


def _refusal(method: str, shown: str, response: httpx.Response) -> ApiError:
    """The problem details of a refusal, or what there is of them."""
    try:
        problem = response.json()
    except ValueError:
        problem = None
    if not isinstance(problem, dict):
        problem = {}
    status = response.status_code
    title = str(problem.get("title") or response.reason_phrase or "error")
    detail = str(problem.get("detail") or response.text[:200] or "(no detail)")
    errors = []
    for item in problem.get("errors") or ():
        if isinstance(item, dict):
            where = ".".join(str(part) for part in item.get("loc") or ())
            errors.append(f"{where}: {item.get('msg', '')}" if where else str(item.get("msg")))
    return ApiError(
        method=method,
        path=shown,
        status=status,
        title=title,
        detail=detail + _HINTS.get(status, ""),
        errors=errors,
    )
