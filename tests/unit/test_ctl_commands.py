"""``driftless apply/diff/delete/get/describe`` against an in-memory hub (httpx.MockTransport).

The fake hub answers as the design contract says (``/api/v1/deployments``), records
every request, and lets a test set the preview and refusals; each test checks the
exact requests sent, what was printed and the exit code. The real hub is the
integration test's (tests/integration/test_ctl.py).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from ctl import commands
from ctl.client import HubClient, api_base
from driftless.cli import build_parser

SHA1, SHA2 = "1" * 64, "2" * 64
DEFAULTS = {"selector": "", "priority": 0, "kind": "fleet"}


def _entry(name: str = "web", bundle: str = SHA1, **extra: Any) -> dict[str, Any]:
    return {"name": name, "bundle": bundle, **extra}


def _device(device_id: str, **change: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "device_id": device_id,
        "generation_bump": True,
        "added": [],
        "removed": [],
        "changed": [],
        "before": {},
        "after": {},
        "contributions": {},
        "ties": [],
    }
    base.update(change)
    return base


def _preview(
    devices: list[dict[str, Any]] = (),  # type: ignore[assignment]
    unplaceable: list[dict[str, Any]] = (),  # type: ignore[assignment]
    unchanged: int = 0,
) -> dict[str, Any]:
    return {
        "devices": list(devices),
        "unplaceable": list(unplaceable),
        "summary": {
            "changed": len(devices),
            "unchanged": unchanged,
            "unplaceable": len(unplaceable),
        },
    }


@dataclass
class FakeHub:
    """The deployment routes of the contract, in memory."""

    stored: dict[str, dict[str, Any]] = field(default_factory=dict)
    previews: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> the preview its PUT or DELETE answers (default: nothing changes)."""
    real_previews: dict[str, dict[str, Any]] = field(default_factory=dict)
    """name -> the preview a real (not dry-run) change answers, when it differs."""
    refusals: dict[tuple[str, str], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    """(method, name) -> (status, problem)."""
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_page: int = 1000
    requests: list[tuple[str, str, Any]] = field(default_factory=list)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        target = request.url.raw_path.decode()
        self.requests.append((request.method, target, body))
        assert request.headers["authorization"] == "Bearer t0ken"
        path = unquote(request.url.path)
        assert path.startswith("/api/v1/deployments")
        parts = path.removeprefix("/api/v1/deployments").strip("/").split("/")
        name = parts[0]
        dry_run = request.url.params.get("dry_run") == "true"
        refusal = self.refusals.get((request.method, name))
        if refusal is not None:
            status, problem = refusal
            return httpx.Response(
                status, json=problem, headers={"content-type": "application/problem+json"}
            )
        if not name:
            return self._page(request)
        if request.method == "GET" and len(parts) == 2:
            return httpx.Response(200, json=self.statuses[name])
        if request.method == "GET":
            if name not in self.stored:
                return self._missing(name)
            return httpx.Response(200, json=self.stored[name])
        if request.method == "PUT":
            return self._put(name, body["spec"], dry_run=dry_run)
        assert request.method == "DELETE"
        if name not in self.stored:
            return self._missing(name)
        preview = self._preview_for(name, dry_run)
        if not dry_run:
            del self.stored[name]
        return httpx.Response(200, json={"preview": preview, "dry_run": dry_run})

    def _put(self, name: str, spec: dict[str, Any], *, dry_run: bool) -> httpx.Response:
        normal = {**DEFAULTS, **spec}  # the hub fills in defaults
        old = self.stored.get(name)
        version = 1 if old is None else old["version"] + (old["spec"] != normal)
        deployment = {
            "name": name,
            "spec": normal,
            "version": version,
            "created_at": "2026-12-01T00:00:00Z" if old is None else old["created_at"],
            "updated_at": "2026-12-06T00:00:00Z",
            "status": None,
        }
        preview = self._preview_for(name, dry_run)
        if not dry_run:
            self.stored[name] = deployment
        status = 200 if dry_run or old is not None else 201
        return httpx.Response(
            status, json={"deployment": deployment, "preview": preview, "dry_run": dry_run}
        )

    def _preview_for(self, name: str, dry_run: bool) -> dict[str, Any]:
        if not dry_run and name in self.real_previews:
            return self.real_previews[name]
        return self.previews.get(name, _preview())

    def _page(self, request: httpx.Request) -> httpx.Response:
        limit = min(int(request.url.params["limit"]), self.max_page)
        offset = int(request.url.params["offset"])
        items = [self.stored[k] for k in sorted(self.stored)]
        page = items[offset : offset + limit]
        return httpx.Response(
            200, json={"items": page, "total": len(items), "limit": limit, "offset": offset}
        )

    def _missing(self, name: str) -> httpx.Response:
        problem = {"title": "Not Found", "status": 404, "detail": f"no deployment {name!r}"}
        return httpx.Response(404, json=problem)

    def sent(self) -> list[tuple[str, str]]:
        return [(method, target) for method, target, _ in self.requests]


@dataclass
class Run:
    code: int
    out: str
    err: str


def _run(
    hub: FakeHub | Callable[[httpx.Request], httpx.Response],
    *argv: str,
    answer: str = "",
    tty: bool = True,
) -> Run:
    handler = hub.handle if isinstance(hub, FakeHub) else hub
    args = build_parser(list(argv)).parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    console = commands.Console(out, err, io.StringIO(answer), interactive=tty)
    connects: list[int] = []

    def connect() -> HubClient:
        connects.append(1)
        http = httpx.Client(
            transport=httpx.MockTransport(handler),
            base_url="http://hub.test/api/v1",
            headers={"Authorization": "Bearer t0ken"},
        )
        return HubClient(http)

    code = commands.run(args, console=console, connect=connect)
    return Run(code, out.getvalue(), err.getvalue())


def _file(tmp_path: Path, *docs: tuple[str, dict[str, Any]], name: str = "d.yaml") -> str:
    path = tmp_path / name
    text = ""
    for deployment, spec in docs:
        document = {
            "apiVersion": "driftless/v1",
            "kind": "Deployment",
            "metadata": {"name": deployment},
            "spec": spec,
        }
        text += "---\n" + json.dumps(document) + "\n"
    path.write_text(text)
    return str(path)


WEB = {"selector": "env=prod", "priority": 10, "workloads": [_entry()]}
NEW_ON_TWO = _preview(
    [
        _device(
            f"pump-0{n}",
            added=["web"],
            after={"web": _entry()},
            contributions={"web": "deployment:web"},
        )
        for n in (1, 2)
    ],
    unchanged=5,
)


# ---------------------------------------------------------------- apply


def test_apply_previews_asks_and_applies_with_exactly_these_requests(tmp_path: Path) -> None:
    hub = FakeHub(previews={"web": NEW_ON_TWO})
    done = _run(hub, "apply", "-f", _file(tmp_path, ("web", WEB)), answer="y\n")
    assert done.code == commands.EXIT_OK, done.err
    assert hub.requests == [
        ("GET", "/api/v1/deployments/web", None),
        ("PUT", "/api/v1/deployments/web?dry_run=true", {"spec": WEB}),
        ("PUT", "/api/v1/deployments/web", {"spec": WEB}),
    ]
    assert done.out.splitlines() == [
        'deployment/web: created (fleet, priority 10, selector "env=prod")',
        "  ~ 2 devices: pump-01, pump-02",
        f"      + web  bundle {SHA1[:12]}…  (from deployment:web)",
        "  2 devices change, 5 unchanged, 0 unplaceable",
        "1 deployment to change of 1; 2 device documents change",
        "deployment/web created (version 1): 2 devices change, 5 unchanged, 0 unplaceable",
    ]
    assert done.err == "Apply 1 changes? [y/N] "
    assert hub.stored["web"]["spec"] == {**DEFAULTS, **WEB}


@pytest.mark.parametrize("answer", ["n\n", "\n", "", "yess\n"])
def test_anything_but_yes_declines_and_changes_nothing(tmp_path: Path, answer: str) -> None:
    hub = FakeHub(previews={"web": NEW_ON_TWO})
    done = _run(hub, "apply", "-f", _file(tmp_path, ("web", WEB)), answer=answer)
    assert done.code == commands.EXIT_DECLINED == 3
    assert [m for m, t in hub.sent() if "dry_run" not in t and m != "GET"] == []
    assert "declined: nothing changed (1 deployment left as they are)" in done.err
    assert hub.stored == {}


def test_without_a_terminal_apply_needs_yes(tmp_path: Path) -> None:
    hub = FakeHub(previews={"web": NEW_ON_TWO})
    path = _file(tmp_path, ("web", WEB))
    refused = _run(hub, "apply", "-f", path, tty=False, answer="y\n")
    assert refused.code == commands.EXIT_USAGE
    assert "stdin is not a terminal" in refused.err and "--yes" in refused.err
    assert "Apply" not in refused.err  # it never asked
    assert "+ web" in refused.out  # but it showed what would change
    assert hub.stored == {}
    done = _run(hub, "apply", "-f", path, "--yes", tty=False)
    assert done.code == commands.EXIT_OK
    assert hub.sent()[-1] == ("PUT", "/api/v1/deployments/web")
    assert done.err == ""


def test_applying_again_changes_nothing_and_asks_nothing(tmp_path: Path) -> None:
    hub = FakeHub()
    path = _file(tmp_path, ("web", WEB))
    assert _run(hub, "apply", "-f", path, "--yes").code == 0
    hub.requests.clear()
    again = _run(hub, "apply", "-f", path)
    assert again.code == commands.EXIT_OK
    assert "deployment/web: unchanged" in again.out
    assert "nothing to apply" in again.err and "[y/N]" not in again.err
    assert hub.sent() == [
        ("GET", "/api/v1/deployments/web"),
        ("PUT", "/api/v1/deployments/web?dry_run=true"),
    ]
    assert hub.stored["web"]["version"] == 1


def test_only_the_deployments_that_change_something_are_written(tmp_path: Path) -> None:
    hub = FakeHub()
    first = _file(tmp_path, ("a", WEB), ("b", WEB), ("c", WEB))
    assert _run(hub, "apply", "-f", first, "--yes").code == 0
    changed = {**WEB, "priority": 20}
    hub.previews["c"] = NEW_ON_TWO  # c's spec is the same but devices would change
    hub.requests.clear()
    second = _file(tmp_path, ("a", WEB), ("b", changed), ("c", WEB), name="e.yaml")
    done = _run(hub, "apply", "-f", second, answer="yes\n")
    assert done.code == 0
    assert [t for m, t in hub.sent() if m == "PUT" and "dry_run" not in t] == [
        "/api/v1/deployments/b",
        "/api/v1/deployments/c",
    ]
    assert "deployment/a: unchanged" in done.out
    assert "deployment/b: configured (fleet, priority 20" in done.out
    assert "Apply 2 changes? [y/N]" in done.err


def test_documents_go_in_file_order_and_one_file_may_hold_several(tmp_path: Path) -> None:
    directory = tmp_path / "deploy"
    directory.mkdir()
    _file(directory, ("second", WEB), ("third", WEB), name="b.yaml")
    _file(directory, ("first", WEB), name="a.yaml")
    hub = FakeHub()
    assert _run(hub, "apply", "-f", str(directory), "--yes").code == 0
    assert [t for m, t in hub.sent() if m == "PUT" and "dry_run" not in t] == [
        "/api/v1/deployments/first",
        "/api/v1/deployments/second",
        "/api/v1/deployments/third",
    ]


def test_an_invalid_file_sends_nothing_and_exits_2(tmp_path: Path) -> None:
    hub = FakeHub()
    bad = _file(tmp_path, ("web", {**WEB, "priority": 5000}))
    for command in ("apply", "diff"):
        done = _run(hub, command, "-f", bad, "--yes" if command == "apply" else "-o=text")
        assert done.code == commands.EXIT_USAGE
        assert done.err.splitlines() == [
            f"error: {bad}:2: document 1: $.spec.priority: "
            "5000 is greater than the maximum of 1000",
            "1 problem; nothing was sent",
        ]
    assert hub.requests == []


def test_a_refusal_prints_the_problem_and_exits_1(tmp_path: Path) -> None:
    problem = {
        "type": "about:blank",
        "title": "Unprocessable Entity",
        "status": 422,
        "detail": "spec.selector: 'region in (eu' at 10: expected ')'",
        "errors": [{"loc": ["body", "spec", "selector"], "msg": "bad selector", "type": "x"}],
    }
    hub = FakeHub(refusals={("PUT", "web"): (422, problem)})
    done = _run(hub, "apply", "-f", _file(tmp_path, ("web", WEB)), "--yes")
    assert done.code == commands.EXIT_API == 1
    assert done.err.splitlines() == [
        "error: PUT /api/v1/deployments/web?dry_run=true: 422 Unprocessable Entity: "
        "spec.selector: 'region in (eu' at 10: expected ')'",
        "  body.spec.selector: bad selector",
    ]
    assert done.out == ""


@pytest.mark.parametrize(
    ("status", "hint"),
    [
        pytest.param(401, "--token-file FILE or DRIFTLESS_TOKEN", id="no-token"),
        pytest.param(403, "role operator or admin", id="viewer"),
    ],
)
def test_auth_refusals_say_what_to_do(tmp_path: Path, status: int, hint: str) -> None:
    problem = {"title": "x", "status": status, "detail": "no"}
    hub = FakeHub(refusals={("GET", "web"): (status, problem)})
    done = _run(hub, "diff", "-f", _file(tmp_path, ("web", WEB)))
    assert done.code == commands.EXIT_DIFF_API == 4
    assert hint in done.err


def test_an_unreachable_hub_or_a_foreign_answer_is_exit_1(tmp_path: Path) -> None:
    path = _file(tmp_path, ("web", WEB))

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    done = _run(refused, "apply", "-f", path, "--yes")
    assert done.code == commands.EXIT_API
    assert "cannot reach the hub at http://hub.test: Connection refused" in done.err

    def html(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>a proxy</html>")

    done = _run(html, "apply", "-f", path, "--yes")
    assert done.code == commands.EXIT_API
    assert "not the API's JSON (is --hub the hub's address?)" in done.err

    def broken(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="Bad Gateway from nginx")

    done = _run(broken, "apply", "-f", path, "--yes")
    assert done.code == commands.EXIT_API
    assert "502 Bad Gateway: Bad Gateway from nginx" in done.err


def test_a_failure_half_way_says_how_far_it_got(tmp_path: Path) -> None:
    hub = FakeHub()
    path = _file(tmp_path, ("a", WEB), ("b", WEB))
    original = hub.handle

    def failing_second_write(request: httpx.Request) -> httpx.Response:
        if (
            request.method == "PUT"
            and "dry_run" not in str(request.url)
            and "/b" in str(request.url)
        ):
            return httpx.Response(409, json={"title": "Conflict", "status": 409, "detail": "busy"})
        return original(request)

    done = _run(failing_second_write, "apply", "-f", path, "--yes")
    assert done.code == commands.EXIT_API
    assert "deployment/a created (version 1)" in done.out
    assert "409 Conflict: busy" in done.err
    assert "applied 1 of 2; the rest were not sent" in done.err
    assert list(hub.stored) == ["a"]


def test_a_real_answer_unlike_its_preview_is_reported(tmp_path: Path) -> None:
    hub = FakeHub(previews={"web": NEW_ON_TWO})
    hub.real_previews["web"] = _preview([NEW_ON_TWO["devices"][0]], unchanged=6)
    done = _run(hub, "apply", "-f", _file(tmp_path, ("web", WEB)), "--yes")
    assert done.code == 0
    assert "the hub's answer differs from the preview shown" in done.err
    assert "1 device change, 6 unchanged" in done.err


# ---------------------------------------------------------------- diff and the preview's text


def test_diff_exits_1_on_changes_0_without_and_never_writes(tmp_path: Path) -> None:
    hub = FakeHub(previews={"web": NEW_ON_TWO})
    path = _file(tmp_path, ("web", WEB))
    done = _run(hub, "diff", "-f", path)
    assert done.code == commands.EXIT_CHANGES == 1
    assert "deployment/web: created" in done.out
    hub.previews.clear()
    assert _run(hub, "apply", "-f", path, "--yes").code == 0
    hub.requests.clear()
    same = _run(hub, "diff", "-f", path)
    assert same.code == 0, same.out
    assert all(m == "GET" or "dry_run=true" in t for m, t in hub.sent())


def test_the_preview_groups_identical_changes_and_lists_each_difference(tmp_path: Path) -> None:
    old = _entry("web", SHA1, config={"rate": 10}, env={"A": "1"})
    new = _entry("web", SHA2, config={"rate": 20}, env={"A": "1"})
    same_change = {
        "changed": ["web"],
        "removed": ["legacy"],
        "before": {"web": old, "legacy": _entry("legacy")},
        "after": {"web": new},
        "contributions": {"web": "deployment:web-canary"},
    }
    devices = [_device(f"d{n}", **same_change) for n in range(1, 5)]
    devices.append(
        _device(
            "d9",
            added=["web"],
            after={"web": new},
            ties=["web"],
            contributions={"web": "deployment:web-canary"},
        )
    )
    unplaceable = [
        {"device_id": "d5", "reasons": ["arch: armv7 not in (aarch64, x86_64)"]},
        {"device_id": "d6", "reasons": ["arch: armv7 not in (aarch64, x86_64)"]},
        {"device_id": "d7", "reasons": ["no inventory yet", "memory: 10 MiB free, 64 MiB asked"]},
    ]
    hub = FakeHub(previews={"web-canary": _preview(devices, unplaceable, unchanged=12)})
    placed = {**WEB, "kind": "placed", "replicas": 3, "selector": ""}
    done = _run(hub, "diff", "-f", _file(tmp_path, ("web-canary", placed)), "--device-ids", "2")
    assert done.code == 1
    assert done.out.splitlines() == [
        "deployment/web-canary: created (placed, 3 replicas, priority 10, every device)",
        "  ~ 4 devices: d1, d2, … (+2 more)",
        "      ~ web  (from deployment:web-canary)",
        f"          bundle: {SHA1[:12]}… -> {SHA2[:12]}…",
        '          config: {"rate":10} -> {"rate":20}',
        "      - legacy",
        "  ~ 1 device: d9",
        f"      + web  bundle {SHA2[:12]}…  (from deployment:web-canary)",
        "      ! tie on web: equal priority, the smaller deployment name wins",
        "  ! 2 devices cannot run it: d5, d6",
        "      arch: armv7 not in (aarch64, x86_64)",
        "  ! 1 device cannot run it: d7",
        "      no inventory yet",
        "      memory: 10 MiB free, 64 MiB asked",
        "  5 devices change, 12 unchanged, 3 unplaceable",
        "1 deployment to change of 1; 5 device documents change",
    ]


def test_diff_as_json_is_the_hubs_preview(tmp_path: Path) -> None:
    hub = FakeHub(previews={"web": NEW_ON_TWO})
    done = _run(hub, "diff", "-f", _file(tmp_path, ("web", WEB)), "-o", "json")
    assert done.code == 1
    (plan,) = json.loads(done.out)
    assert plan["name"] == "web" and plan["action"] == "created"
    assert plan["preview"] == NEW_ON_TWO
    assert plan["source"].endswith("d.yaml: document 1")


# ---------------------------------------------------------------- delete


def test_delete_by_name_previews_asks_and_deletes(tmp_path: Path) -> None:
    hub = FakeHub()
    assert _run(hub, "apply", "-f", _file(tmp_path, ("web", WEB)), "--yes").code == 0
    gone = _preview([_device("pump-01", removed=["web"], before={"web": _entry()})], unchanged=3)
    hub.previews["web"] = gone
    hub.requests.clear()
    declined = _run(hub, "delete", "deployment", "web", answer="n\n")
    assert declined.code == commands.EXIT_DECLINED
    assert "web" in hub.stored
    assert "Delete 1 deployment? [y/N]" in declined.err
    assert "  ~ 1 device: pump-01" in declined.out and "      - web" in declined.out
    hub.requests.clear()
    done = _run(hub, "delete", "deployment", "web", answer="y\n")
    assert done.code == 0
    assert hub.sent() == [
        ("DELETE", "/api/v1/deployments/web?dry_run=true"),
        ("DELETE", "/api/v1/deployments/web"),
    ]
    assert "deployment/web deleted: 1 device change, 3 unchanged, 0 unplaceable" in done.out
    assert hub.stored == {}


def test_delete_from_files_and_names_the_hub_does_not_know(tmp_path: Path) -> None:
    hub = FakeHub()
    path = _file(tmp_path, ("a", WEB), ("b", WEB))
    assert _run(hub, "apply", "-f", path, "--yes").code == 0
    del hub.stored["b"]
    missing = _run(hub, "delete", "-f", path, "--yes")
    assert missing.code == commands.EXIT_API
    assert "404 Not Found: no deployment 'b'" in missing.err
    assert "a" in hub.stored  # nothing deleted before every preview was in
    done = _run(hub, "delete", "-f", path, "--yes", "--ignore-not-found")
    assert done.code == 0
    assert "deployment/b: not found, nothing to delete" in done.err
    assert hub.stored == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["delete"], "say what to delete", id="nothing"),
        pytest.param(["delete", "device", "x"], "only deployments can be deleted", id="kind"),
        pytest.param(["delete", "deployment"], "give at least one name", id="no-name"),
        pytest.param(
            ["delete", "deployment", "../x"], "'../x' is not a deployment name", id="name"
        ),
        pytest.param(["delete", "-f", "x.yaml", "deployment", "a"], "not both", id="both"),
        pytest.param(
            ["describe", "deployment", "A"], "'A' is not a deployment name", id="describe"
        ),
    ],
)
def test_bad_usage_is_exit_2_before_any_request(argv: list[str], message: str) -> None:
    hub = FakeHub()
    done = _run(hub, *argv)
    assert done.code == commands.EXIT_USAGE
    assert message in done.err
    assert hub.requests == []


# ---------------------------------------------------------------- get and describe


def test_get_deployments_pages_through_and_prints_a_table(tmp_path: Path) -> None:
    hub = FakeHub(max_page=2)
    path = _file(tmp_path, *[(f"d{n}", WEB) for n in range(5)])
    assert _run(hub, "apply", "-f", path, "--yes").code == 0
    hub.stored["d1"]["status"] = {
        "targeted": 7,
        "placed": 7,
        "in_sync": 6,
        "failed": 0,
        "offline": 1,
        "unplaceable": 2,
        "reasons": {},
        "instances": [],
    }
    hub.requests.clear()
    done = _run(hub, "get", "deployments")
    assert done.code == 0
    assert [t for _, t in hub.sent()] == [
        "/api/v1/deployments?limit=500&offset=0",
        "/api/v1/deployments?limit=500&offset=2",
        "/api/v1/deployments?limit=500&offset=4",
    ]
    lines = done.out.splitlines()
    assert lines[0].split() == [
        "NAME",
        "KIND",
        "PRIORITY",
        "SELECTOR",
        "TARGETED",
        "PLACED",
        "IN-SYNC",
        "FAILED",
        "OFFLINE",
        "UNPLACEABLE",
        "VERSION",
        "AGE",
    ]
    assert [line.split()[0] for line in lines[1:]] == ["d0", "d1", "d2", "d3", "d4"]
    assert lines[2].split()[:11] == [
        "d1",
        "fleet",
        "10",
        "env=prod",
        "7",
        "7",
        "6",
        "0",
        "1",
        "2",
        "1",
    ]
    assert lines[1].split()[4:9] == ["-"] * 5


def test_get_one_deployment_as_json_and_yaml(tmp_path: Path) -> None:
    import yaml

    hub = FakeHub()
    assert _run(hub, "apply", "-f", _file(tmp_path, ("web", WEB)), "--yes").code == 0
    as_json = _run(hub, "get", "deployment", "web", "-o", "json")
    assert json.loads(as_json.out) == hub.stored["web"]
    as_yaml = _run(hub, "get", "deployment", "web", "-o", "yaml")
    assert yaml.safe_load(as_yaml.out) == hub.stored["web"]
    everything = _run(hub, "get", "deployments", "-o", "json")
    assert json.loads(everything.out) == {"items": [hub.stored["web"]], "total": 1}
    missing = _run(hub, "get", "deployment", "nope")
    assert missing.code == 1 and "404 Not Found" in missing.err
    assert _run(FakeHub(), "get", "deployments").err == "no deployments\n"


def test_describe_shows_spec_status_reasons_and_instances(tmp_path: Path) -> None:
    hub = FakeHub()
    placed = {**WEB, "kind": "placed", "replicas": 2}
    assert _run(hub, "apply", "-f", _file(tmp_path, ("gw", placed)), "--yes").code == 0
    hub.statuses["gw"] = {
        "targeted": 4,
        "placed": 2,
        "unplaceable": 2,
        "in_sync": 1,
        "failed": 0,
        "offline": 1,
        "reasons": {"arch: armv7 not in (x86_64)": 1, "no inventory yet": 1},
        "instances": [
            {
                "deployment": "gw",
                "index": 0,
                "device_id": "d2",
                "placed_at": 1796000000.0,
                "original_device_id": "d1",
                "attempts": 1,
                "next_attempt_at": None,
                "reason": None,
                "history": [
                    {
                        "at": 1796000000.0,
                        "from_device": "d1",
                        "to_device": "d2",
                        "reason": "d1 offline for 300 s (lost_after_s 300)",
                    }
                ],
            },
            {
                "deployment": "gw",
                "index": 1,
                "device_id": None,
                "placed_at": None,
                "original_device_id": None,
                "attempts": 0,
                "next_attempt_at": None,
                "reason": "no eligible device",
                "history": [],
            },
        ],
    }
    done = _run(hub, "describe", "deployment", "gw")
    assert done.code == 0, done.err
    assert hub.sent()[-2:] == [
        ("GET", "/api/v1/deployments/gw"),
        ("GET", "/api/v1/deployments/gw/status"),
    ]
    text = done.out
    for expected in (
        "Name:        gw",
        "Kind:        placed",
        "Selector:    env=prod",
        "Spec:\n  selector: env=prod\n",
        "  replicas: 2\n",
        "  Targeted:    4",
        "  Unplaceable: 2",
        "Unplaceable reasons:\n      1  arch: armv7 not in (x86_64)\n      1  no inventory yet",
        "Instances:\n  #0  d2  first on d1  attempts 1\n"
        "      2026-11-30T00:53:20+00:00  d1 -> d2  d1 offline for 300 s (lost_after_s 300)\n"
        "  #1  (unplaced)  reason: no eligible device",
    ):
        assert expected in text, text


# ---------------------------------------------------------------- the connection


def test_the_token_comes_from_the_flag_the_file_or_the_environment(tmp_path: Path) -> None:
    def args(**given: Any) -> Any:
        return type("Args", (), {"token": None, "token_file": None, **given})()

    secret = tmp_path / "token"
    secret.write_text("from-file\nignored\n")
    assert commands.token_of(args(token="flag", token_file=str(secret)), {}) == "flag"
    assert commands.token_of(args(token_file=str(secret)), {"DRIFTLESS_TOKEN": "e"}) == "from-file"
    assert commands.token_of(args(), {"DRIFTLESS_TOKEN_FILE": str(secret)}) == "from-file"
    assert commands.token_of(args(), {"DRIFTLESS_TOKEN": "env"}) == "env"
    with pytest.raises(commands.UsageError, match="no API token"):
        commands.token_of(args(), {})
    with pytest.raises(commands.UsageError, match="No such file"):
        commands.token_of(args(token_file=str(tmp_path / "nope")), {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(commands.UsageError, match="the file is empty"):
        commands.token_of(args(token_file=str(tmp_path / "empty")), {})


def test_a_missing_token_is_exit_2_after_the_files_were_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DRIFTLESS_TOKEN", raising=False)
    monkeypatch.delenv("DRIFTLESS_TOKEN_FILE", raising=False)
    argv = ["diff", "-f", _file(tmp_path, ("web", WEB)), "--hub", "http://127.0.0.1:9"]
    args = build_parser(argv).parse_args(argv)
    assert commands.main(args) == commands.EXIT_USAGE
    assert "no API token: give --token-file FILE, or set DRIFTLESS_TOKEN" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://h:8080", "http://h:8080/api/v1"),
        ("http://h:8080/", "http://h:8080/api/v1"),
        ("https://h/api/v1", "https://h/api/v1"),
        ("https://h/api/v1/", "https://h/api/v1"),
    ],
)
def test_the_hub_url_may_be_given_with_or_without_the_api_prefix(url: str, base: str) -> None:
    assert api_base(url) == base


def test_the_commands_load_none_of_the_hub_agent_or_web_stack() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from driftless.cli import build_parser\n"
        "argv = ['apply', '-f', 'x.yaml']\n"
        "assert build_parser(argv).parse_args(argv).command == 'apply'\n"
        "import ctl.commands, ctl.client, ctl.documents, ctl.render\n"
        "others = ('hub', 'edge_agent', 'simulator', 'devtools', 'fastapi', 'sqlmodel',\n"
        "          'sqlalchemy', 'pydantic', 'paho', 'aiomqtt')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(others)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_ctrl_c_at_the_question_changes_nothing(tmp_path: Path) -> None:
    class Interrupting(io.StringIO):
        def readline(self, size: int | None = -1) -> str:
            raise KeyboardInterrupt

    hub = FakeHub(previews={"web": NEW_ON_TWO})
    argv = ["apply", "-f", _file(tmp_path, ("web", WEB))]
    err = io.StringIO()
    console = commands.Console(io.StringIO(), err, Interrupting(), interactive=True)
    http = httpx.Client(
        transport=httpx.MockTransport(hub.handle),
        base_url="http://hub.test/api/v1",
        headers={"Authorization": "Bearer t0ken"},
    )
    args = build_parser(argv).parse_args(argv)
    code = commands.run(args, console=console, connect=lambda: HubClient(http))
    assert code == commands.EXIT_INTERRUPTED == 130
    assert "interrupted" in err.getvalue()
    assert hub.stored == {}
