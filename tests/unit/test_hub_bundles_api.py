"""GET/DELETE /bundles: listing, reading, and deletion guarded by desired-state references."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hub.bundles.refs import bundle_references, references
from tests.unit.hub_bundles_support import NOW, BundleHub, bundle_hub, upload


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[BundleHub, TestClient]]:
    with bundle_hub(tmp_path) as pair:
        yield pair


def stored(hub: BundleHub, client: TestClient, **kwargs: Any) -> dict[str, Any]:
    response = upload(client, hub.bundle(**kwargs))
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def workloads(*shas: str) -> dict[str, Any]:
    return {"workloads": [{"name": f"w{i}", "bundle": sha} for i, sha in enumerate(shas)]}


def register(client: TestClient, device_id: str, config: dict[str, Any] | None = None) -> None:
    assert client.post("devices", json={"id": device_id}).status_code == 201
    if config is not None:
        response = client.put(f"devices/{device_id}/desired", json={"config": config})
        assert response.status_code == 200, response.text


# --- the reference convention (pure) ---------------------------------------------------

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param({"workloads": [{"name": "a", "bundle": SHA}]}, {SHA}, id="one-workload"),
        pytest.param(
            {"workloads": [{"bundle": SHA}, {"bundle": "cd" * 32}]}, {SHA, "cd" * 32}, id="two"
        ),
        pytest.param({"workloads": [{"bundle": SHA.upper()}]}, {SHA}, id="upper-case"),
        pytest.param({}, set(), id="no-workloads"),
        pytest.param({"workloads": {"a": {"bundle": SHA}}}, set(), id="workloads-not-a-list"),
        pytest.param({"workloads": [SHA]}, set(), id="entry-not-an-object"),
        pytest.param({"workloads": [{"bundle": 5}]}, set(), id="bundle-not-a-string"),
        pytest.param({"note": SHA, "bundle": SHA}, set(), id="elsewhere-in-config"),
        pytest.param({"x": {"workloads": [{"bundle": SHA}]}}, set(), id="nested-deeper"),
    ],
)
def test_bundle_references(config: dict[str, Any], expected: set[str]) -> None:
    assert bundle_references(config) == expected
    assert references(config, SHA) == (SHA in expected)


def test_openapi_schema_builds_without_warnings(env: tuple[BundleHub, TestClient]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a duplicate operation id for GET and HEAD
        paths = env[0].app.openapi()["paths"]
    assert set(paths["/api/v1/bundles/{sha256}/file"]) == {"get", "head"}
    assert "requestBody" in paths["/api/v1/bundles"]["post"]


# --- list and read ------------------------------------------------------------------------


def test_list_is_paged_and_filtered_by_name(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    a1 = stored(hub, client, name="alpha", version="1")
    hub.now = NOW + 10
    a2 = stored(hub, client, name="alpha", version="2")
    b1 = stored(hub, client, name="beta", version="1")
    page = client.get("bundles").json()
    assert page["total"] == 3 and (page["limit"], page["offset"]) == (20, 0)
    # by name, newest upload first
    assert [i["sha256"] for i in page["items"]] == [a2["sha256"], a1["sha256"], b1["sha256"]]
    alpha = client.get("bundles", params={"name": "alpha"}).json()
    assert alpha["total"] == 2 and {i["name"] for i in alpha["items"]} == {"alpha"}
    second = client.get("bundles", params={"limit": 1, "offset": 1}).json()
    assert second["total"] == 3 and [i["sha256"] for i in second["items"]] == [a1["sha256"]]
    assert client.get("bundles", params={"name": "nothing"}).json() == {
        "items": [],
        "total": 0,
        "limit": 20,
        "offset": 0,
    }


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"limit": 51}, id="over-page-max"),
        pytest.param({"limit": 0}, id="zero"),
        pytest.param({"offset": -1}, id="negative-offset"),
        pytest.param({"name": "Bad Name"}, id="bad-name"),
    ],
)
def test_bad_list_parameters_are_422(
    env: tuple[BundleHub, TestClient], params: dict[str, Any]
) -> None:
    assert env[1].get("bundles", params=params).status_code == 422


def test_get_returns_the_upload_answer(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    record = stored(hub, client)
    assert client.get(f"bundles/{record['sha256']}").json() == record


def test_unknown_bundle_is_404(env: tuple[BundleHub, TestClient]) -> None:
    client = env[1]
    for response in (
        client.get(f"bundles/{SHA}"),
        client.get(f"bundles/{SHA}/file"),
        client.delete(f"bundles/{SHA}"),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == f"bundle {SHA} is not stored"


@pytest.mark.parametrize(
    "sha", [pytest.param(SHA.upper(), id="upper-case"), pytest.param("ab" * 31, id="short")]
)
def test_malformed_sha256_is_422(env: tuple[BundleHub, TestClient], sha: str) -> None:
    client = env[1]
    assert client.get(f"bundles/{sha}").status_code == 422
    assert client.delete(f"bundles/{sha}").status_code == 422


# --- delete ---------------------------------------------------------------------------


def test_delete_removes_row_and_file(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    sha = stored(hub, client)["sha256"]
    assert client.delete(f"bundles/{sha}").status_code == 204
    assert client.get(f"bundles/{sha}").status_code == 404
    assert hub.leftovers() == []
    assert client.delete(f"bundles/{sha}").status_code == 404


def test_delete_refused_while_desired_state_references_it(
    env: tuple[BundleHub, TestClient],
) -> None:
    hub, client = env
    sha = stored(hub, client)["sha256"]
    other = stored(hub, client, name="other")["sha256"]
    register(client, "pump-1", workloads(sha, other))
    register(client, "pump-2", workloads(other))
    register(client, "pump-3", {"note": f"mentions {sha} but does not use it"})
    response = client.delete(f"bundles/{sha}")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"bundle {sha} is referenced by the desired state of 1 device(s) (pump-1); "
        "change their desired state first"
    )
    assert client.get(f"bundles/{sha}").status_code == 200
    assert f"{sha}.bundle" in hub.leftovers()

    client.put("devices/pump-1/desired", json={"config": workloads(other)})
    assert client.delete(f"bundles/{sha}").status_code == 204
    assert client.delete(f"bundles/{other}").status_code == 409
    assert hub.leftovers() == [f"{other}.bundle"]


def test_a_desired_state_naming_a_bundle_the_hub_does_not_hold_is_422(
    env: tuple[BundleHub, TestClient],
) -> None:
    """Refused at once, not discovered by every device failing its fetch."""
    hub, client = env
    sha = stored(hub, client)["sha256"]
    missing = "ab" * 32
    register(client, "pump-1", workloads(sha))
    before = client.get("devices/pump-1").json()["desired_generation"]
    for path in ("devices/pump-1/desired", "fleet/desired"):
        response = client.put(path, json={"config": workloads(sha, missing)})
        assert response.status_code == 422, path
        assert missing in response.json()["detail"] and sha not in response.json()["detail"]
    # Nothing was written: the generation did not move.
    assert client.get("devices/pump-1").json()["desired_generation"] == before
    # The same hex anywhere else in the config is not a reference.
    note = {"note": missing}
    assert client.put("devices/pump-1/desired", json={"config": note}).status_code == 200


def test_delete_allowed_once_the_referencing_device_is_deleted(
    env: tuple[BundleHub, TestClient],
) -> None:
    hub, client = env
    sha = stored(hub, client)["sha256"]
    register(client, "pump-1", workloads(sha))
    assert client.delete(f"bundles/{sha}").status_code == 409
    assert client.delete("devices/pump-1").status_code == 204
    assert client.delete(f"bundles/{sha}").status_code == 204


def test_delete_scans_thousands_of_devices(env: tuple[BundleHub, TestClient]) -> None:
    hub, client = env
    sha = stored(hub, client)["sha256"]
    other = stored(hub, client, name="other")["sha256"]
    ids = [f"dev-{i:05d}" for i in range(5000)]
    assert client.post("devices/batch", json={"devices": [{"id": i} for i in ids]}).is_success
    assert client.put("fleet/desired", json={"config": workloads(other)}).is_success
    for device_id in ("dev-00017", "dev-04999", "dev-02500"):
        client.put(f"devices/{device_id}/desired", json={"config": workloads(other, sha)})
    start = time.monotonic()
    response = client.delete(f"bundles/{sha}")
    elapsed = time.monotonic() - start
    assert response.status_code == 409
    assert "3 device(s) (dev-00017, dev-02500, dev-04999)" in response.json()["detail"]
    assert elapsed < 2.0, f"reference scan of 5,000 devices took {elapsed:.2f}s"
    many = client.delete(f"bundles/{other}")
    assert "5000 device(s) (dev-00000, dev-00001," in many.json()["detail"]
    assert "and 4990 more" in many.json()["detail"]


def test_delete_refused_while_a_deployment_names_it_even_with_no_device_placed(
    env: tuple[BundleHub, TestClient],
) -> None:
    """A device that registers later would be placed and need the bundle."""
    hub, client = env
    sha = stored(hub, client)["sha256"]
    spec = {"selector": "site=nowhere", "workloads": [{"name": "web", "bundle": sha}]}
    assert client.put("deployments/web", json={"spec": spec}).status_code == 200
    response = client.delete(f"bundles/{sha}")
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"bundle {sha} is named by deployment(s) web; change or delete them first"
    )
    assert f"{sha}.bundle" in hub.leftovers()
    assert client.delete("deployments/web").status_code == 200
    assert client.delete(f"bundles/{sha}").status_code == 204
