"""The published JSON Schema of deployment files stays in step with the API's spec model.

``ctl`` never imports the hub, so its schema is written by hand; this test (which
may import both) walks the API's own JSON Schema of ``DeploymentSpecIn`` and
checks that ``ctl/schema/deployment.schema.json``'s ``spec`` has the same fields,
at every level the API describes, with the same bounds, patterns and choices. A
field added to the API without the schema (or a bound changed on one side only)
fails here, naming its path.
"""

from __future__ import annotations

from typing import Any

from ctl import documents

COMPARED = ("minimum", "maximum", "maxLength", "maxItems", "pattern")


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow ``$ref`` and drop a ``null`` branch of an optional field's ``anyOf``."""
    while True:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            node = {**root["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
            continue
        branches = [b for b in node.get("anyOf", ()) if b.get("type") != "null"]
        if "anyOf" in node and len(branches) == 1:
            node = {**branches[0], **{k: v for k, v in node.items() if k != "anyOf"}}
            continue
        return node


def _choices(node: dict[str, Any]) -> set[Any] | None:
    if "enum" in node:
        return set(node["enum"])
    if "const" in node:
        return {node["const"]}
    return None


def _differences(
    ours: dict[str, Any],
    api: dict[str, Any],
    ours_root: dict[str, Any],
    api_root: dict[str, Any],
    path: str,
) -> list[str]:
    ours, api = _resolve(ours, ours_root), _resolve(api, api_root)
    found: list[str] = []
    for key in COMPARED:
        if key in api and ours.get(key) != api[key]:
            found.append(f"{path}: {key} is {ours.get(key)!r} here, {api[key]!r} in the API")
    if _choices(api) is not None and _choices(ours) != _choices(api):
        found.append(f"{path}: choices {_choices(ours)} here, {_choices(api)} in the API")
    if "properties" in api:
        mine = ours.get("properties", {})
        if set(mine) != set(api["properties"]):
            found.append(
                f"{path}: fields {sorted(mine)} here, {sorted(api['properties'])} in the API"
            )
        for name in sorted(set(mine) & set(api["properties"])):
            found += _differences(
                mine[name], api["properties"][name], ours_root, api_root, f"{path}.{name}"
            )
    if isinstance(api.get("items"), dict) and isinstance(ours.get("items"), dict):
        found += _differences(ours["items"], api["items"], ours_root, api_root, f"{path}[]")
    return found


def test_the_files_schema_has_the_apis_spec_fields_and_bounds() -> None:
    from hub.deployments.models import DeploymentSpecIn

    api = DeploymentSpecIn.model_json_schema()
    ours = documents.schema()
    assert _differences(ours["$defs"]["spec"], api, ours, api, "$.spec") == []


def test_the_files_schema_requires_what_the_api_requires() -> None:
    from hub.deployments.models import DeploymentSpecIn

    api = DeploymentSpecIn.model_json_schema()
    assert set(documents.schema()["$defs"]["spec"]["required"]) == set(api.get("required", ()))


def test_the_name_pattern_is_the_apis() -> None:
    from hub.deployments.models import DEPLOYMENT_NAME_PATTERN

    metadata = documents.schema()["properties"]["metadata"]
    assert metadata["properties"]["name"]["pattern"] == DEPLOYMENT_NAME_PATTERN
