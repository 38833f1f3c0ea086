"""Deployment files (``ctl/documents.py``): reading, the published JSON Schema, the errors.

Every refusal names the file, the line (YAML), the document number and the JSON
path; the schema published under docs/ is the package's, and the examples in
docs/ are valid.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest

from ctl import documents
from ctl.errors import DocumentError, UsageError

ROOT = Path(__file__).resolve().parents[2]
SHA = "a" * 64


def _doc(name: str = "web", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"workloads": [{"name": "web", "bundle": SHA}]}
    body.update(spec)
    return {
        "apiVersion": "driftless/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": body,
    }


def _violations(value: object) -> list[tuple[str, str]]:
    with pytest.raises(DocumentError) as caught:
        documents.check("f.yaml", 1, value)
    return [(v.json_path, v.message) for v in caught.value.violations]


def _placed(**extra: Any) -> dict[str, Any]:
    return _doc(**{"kind": "placed", "replicas": 2, **extra})


def _with(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    document = _doc()
    target: Any = document
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("document", "path", "fragment"),
    [
        pytest.param(
            {**_doc(), "apiVersion": "v1"}, "$.apiVersion", "driftless/v1", id="api-version"
        ),
        pytest.param({**_doc(), "kind": "Job"}, "$.kind", "must be Deployment", id="kind"),
        pytest.param(
            _doc(name="Web_1"), "$.metadata.name", '"Web_1" is not valid: lowercase', id="name"
        ),
        pytest.param(_doc(name="a" * 64), "$.metadata.name", "at most 63", id="name-too-long"),
        pytest.param(
            {k: v for k, v in _doc().items() if k != "spec"},
            "$",
            "'spec' is a required",
            id="no-spec",
        ),
        pytest.param(
            _with(("spec", "workloads"), None),
            "$.spec.workloads",
            "not of type 'array'",
            id="workloads-null",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "bundle"), "abc"),
            "$.spec.workloads[0].bundle",
            "SHA-256",
            id="bundle",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "name"), "Web"),
            "$.spec.workloads[0].name",
            "workload name",
            id="workload-name",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "image"), "x"),
            "$.spec.workloads[0]",
            "'image' was unexpected",
            id="workload-unknown-field",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "env"), {"DRIFTLESS_X": "1"}),
            "$.spec.workloads[0].env",
            '"DRIFTLESS_X": DRIFTLESS_* variables are reserved',
            id="reserved-env",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "env"), {"9A": "1"}),
            "$.spec.workloads[0].env",
            '"9A" is not valid: an env name',
            id="env-name",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "env"), {"A": 1}),
            "$.spec.workloads[0].env.A",
            "not of type 'string'",
            id="env-value",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "restart"), {"policy": "sometimes"}),
            "$.spec.workloads[0].restart.policy",
            "is not one of",
            id="restart-policy",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "limits"), {"memory_bytes": 0}),
            "$.spec.workloads[0].limits.memory_bytes",
            "less than the minimum of 1",
            id="limit-zero",
        ),
        pytest.param(
            _doc(replica=2), "$.spec", "'replica' was unexpected", id="unknown-spec-field"
        ),
        pytest.param(
            _doc(priority=1001),
            "$.spec.priority",
            "greater than the maximum of 1000",
            id="priority",
        ),
        pytest.param(
            _doc(priority=True), "$.spec.priority", "not of type 'integer'", id="priority-bool"
        ),
        pytest.param(_doc(kind="daemon"), "$.spec.kind", "is not one of", id="spec-kind"),
        pytest.param(
            _doc(kind="placed"),
            "$.spec",
            "'replicas' is a required property",
            id="placed-without-replicas",
        ),
        pytest.param(
            _doc(replicas=2),
            "$.spec.replicas",
            "only kind: placed takes replicas",
            id="replicas-on-fleet",
        ),
        pytest.param(
            _doc(distinct=["label.site"]),
            "$.spec.distinct",
            "only kind: placed",
            id="distinct-on-fleet",
        ),
        pytest.param(
            _placed(replicas=10001), "$.spec.replicas", "maximum of 10000", id="replicas-max"
        ),
        pytest.param(
            _doc(constraints=[{"attribute": "arch", "op": "in", "value": "x"}]),
            "$.spec.constraints[0]",
            "'values' is a required property",
            id="in-without-values",
        ),
        pytest.param(
            _doc(constraints=[{"attribute": "arch", "op": "in", "values": ["x"], "value": "x"}]),
            "$.spec.constraints[0].value",
            "op in/notin takes values",
            id="in-with-value",
        ),
        pytest.param(
            _doc(constraints=[{"attribute": "label.gpu", "op": "exists", "value": "x"}]),
            "$.spec.constraints[0].value",
            "takes no operand",
            id="exists-with-value",
        ),
        pytest.param(
            _doc(constraints=[{"attribute": "arch", "op": "="}]),
            "$.spec.constraints[0]",
            "'value' is a required property",
            id="eq-without-value",
        ),
        pytest.param(
            _doc(constraints=[{"attribute": "arch", "op": "=", "values": ["x"], "value": "x"}]),
            "$.spec.constraints[0].values",
            "one value, not values",
            id="eq-with-values",
        ),
        pytest.param(
            _doc(constraints=[{"attribute": "colour", "op": "exists"}]),
            "$.spec.constraints[0].attribute",
            "an attribute is arch",
            id="attribute",
        ),
        pytest.param(
            _doc(constraints=[{"attribute": "arch", "op": "~", "value": "x"}]),
            "$.spec.constraints[0].op",
            "is not one of",
            id="op",
        ),
        pytest.param(
            _doc(affinities=[{"attribute": "label.zone", "op": "=", "value": "z", "weight": 101}]),
            "$.spec.affinities[0].weight",
            "maximum of 100",
            id="weight",
        ),
        pytest.param(
            _doc(affinities=[{"attribute": "label.zone", "op": "=", "value": "z"}]),
            "$.spec.affinities[0]",
            "'weight' is a required",
            id="weight-missing",
        ),
        pytest.param(
            _placed(spread={"targets": {"a": 50}}),
            "$.spec.spread",
            "'attribute' is a required",
            id="spread-attribute",
        ),
        pytest.param(
            _doc(resources={"memory_bytes": -1}),
            "$.spec.resources.memory_bytes",
            "minimum of 0",
            id="resources",
        ),
        pytest.param(
            _placed(lost_after_s=-1), "$.spec.lost_after_s", "minimum of 0", id="lost-after"
        ),
        pytest.param(
            _placed(reconcile="best_score"), "$.spec.reconcile", "is not one of", id="reconcile"
        ),
        pytest.param(
            _doc(selector="x" * 1025), "$.spec.selector", "is too long", id="selector-length"
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "config"), {True: 1}),
            "$.spec.workloads[0].config",
            "key True is not a string (YAML reads unquoted on/off",
            id="bool-key",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "config"), float("nan")),
            "$.spec.workloads[0].config",
            "nan is not a JSON number",
            id="nan",
        ),
        pytest.param(
            _with(("spec", "workloads", 0, "config"), b"x"),
            "$.spec.workloads[0].config",
            "a bytes has no JSON form",
            id="binary",
        ),
    ],
)
def test_a_document_that_breaks_the_schema_is_refused_where_it_breaks(
    document: dict[str, Any], path: str, fragment: str
) -> None:
    found = _violations(document)
    assert any(where == path and fragment in message for where, message in found), found


def test_a_document_using_every_field_is_valid() -> None:
    document = _placed(
        selector="env=prod,region in (eu,us),!legacy",
        priority=-1000,
        constraints=[
            {"attribute": "arch", "op": "in", "values": ["x86_64", "aarch64"]},
            {"attribute": "agent_version", "op": ">=", "value": "0.4.0"},
            {"attribute": "label.site", "op": "exists"},
            {"attribute": "inventory.cpu_count", "op": ">=", "value": 2},
            {"attribute": "os", "op": "!exists"},
        ],
        resources={"memory_bytes": 64 << 20, "disk_bytes": 100 << 20},
        spread={"attribute": "label.site", "targets": {"a": 50, "b": 50}},
        distinct=["label.site"],
        affinities=[{"attribute": "label.zone", "op": "=", "value": "z1", "weight": -100}],
        lost_after_s=0.5,
        reschedule={"delay_s": 30, "max_delay_s": 3600},
        reconcile="keep_replacement",
    )
    document["spec"]["workloads"][0].update(
        env={"PORT": "8080"},
        config={"anything": [1, "two", None, {"three": 3.0}]},
        depends_on=["db"],
        restart={
            "policy": "always",
            "attempts": 0,
            "interval_s": 1,
            "delay_ms": 1,
            "max_delay_ms": 3600000,
            "jitter_pct": 100,
        },
        limits={
            "memory_bytes": 1,
            "cpu_seconds": 1,
            "open_files": 1,
            "cgroup_memory_bytes": 1,
            "cgroup_cpu_millicores": 1,
        },
    )
    checked = documents.check("f.yaml", 3, document)
    assert (checked.name, checked.index, checked.spec) == ("web", 3, document["spec"])
    assert documents.check("f.yaml", 1, _doc(selector="", workloads=[])).spec["workloads"] == []


YAML_WITH_PROBLEMS = """\
# a comment first
apiVersion: driftless/v1
kind: Deployment
metadata:
  name: web
spec:
  priority: 5000
  workloads:
    - name: web
      bundle: abc
---
---
apiVersion: driftless/v1
kind: Deployment
metadata: {name: api}
spec:
  workloads: []
  workloads: []
"""


def test_errors_name_file_line_document_and_path_and_every_document_is_checked(
    tmp_path: Path,
) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text(YAML_WITH_PROBLEMS)
    with pytest.raises(DocumentError) as caught:
        documents.load([str(path)], stdin=io.StringIO())
    lines = str(caught.value).splitlines()
    assert lines == [
        f"{path}:7: document 1: $.spec.priority: 5000 is greater than the maximum of 1000",
        f'{path}:10: document 1: $.spec.workloads[0].bundle: "abc" is not valid: '
        "a bundle is named by its file's SHA-256: 64 lowercase hex digits",
        f"{path}:18: document 3: $: YAML: in a mapping the key 'workloads' is given twice",
    ]


def test_yaml_surprises_are_refused_or_kept_as_text(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text(
        "apiVersion: driftless/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n"
        f"  workloads:\n    - name: web\n      bundle: {SHA}\n"
        "      config: {released: 2026-01-02, on: 1}\n"
    )
    with pytest.raises(DocumentError) as caught:
        documents.load([str(path)], stdin=io.StringIO())
    (violation,) = caught.value.violations
    assert (violation.line, violation.json_path) == (8, "$.spec.workloads[0].config")
    assert "key True is not a string" in violation.message
    path.write_text(path.read_text().replace(", on: 1", ""))
    (document,) = documents.load([str(path)], stdin=io.StringIO())
    assert document.spec["workloads"][0]["config"] == {"released": "2026-01-02"}


def test_a_yaml_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.yaml"
    path.write_text("apiVersion: driftless/v1\nkind: [Deployment\nmetadata: {}\n")
    with pytest.raises(DocumentError) as caught:
        documents.load([str(path)], stdin=io.StringIO())
    (violation,) = caught.value.violations
    assert violation.line is not None and violation.line >= 2
    assert violation.message.startswith("YAML: ")


def _write(path: Path, *docs: dict[str, Any]) -> None:
    if path.suffix == ".json":
        (only,) = docs
        path.write_text(json.dumps(only))
    else:
        path.write_text("".join("---\n" + json.dumps(doc) + "\n" for doc in docs))


def test_a_directory_is_its_deployment_files_sorted_and_documents_keep_their_numbers(
    tmp_path: Path,
) -> None:
    _write(tmp_path / "b.yml", _doc("b1"), _doc("b2"))
    _write(tmp_path / "a.json", _doc("a"))
    _write(tmp_path / "c.yaml", _doc("c"))
    (tmp_path / "c.yaml").write_text("---\n# empty\n" + (tmp_path / "c.yaml").read_text())
    (tmp_path / "notes.txt").write_text("not a deployment")
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "d.yaml", _doc("d"))  # not recursive
    loaded = documents.load([str(tmp_path)], stdin=io.StringIO())
    assert [(Path(d.source).name, d.index, d.name) for d in loaded] == [
        ("a.json", 1, "a"),
        ("b.yml", 1, "b1"),
        ("b.yml", 2, "b2"),
        ("c.yaml", 2, "c"),
    ]


def test_stdin_is_read_with_a_dash() -> None:
    loaded = documents.load(["-"], stdin=io.StringIO(json.dumps(_doc("from-stdin"))))
    assert [(d.source, d.name) for d in loaded] == [("-", "from-stdin")]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param(
            '{"apiVersion": 1, "apiVersion": 2}',
            "the key 'apiVersion' is given twice",
            id="duplicate",
        ),
        pytest.param('{"a": NaN}', "NaN is not JSON", id="nan"),
        pytest.param('{"a": ', "not JSON: Expecting value", id="syntax"),
    ],
)
def test_a_json_file_is_strict_json(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DocumentError, match=r"d\.json") as caught:
        documents.load([str(path)], stdin=io.StringIO())
    assert fragment in str(caught.value)


def test_two_documents_naming_one_deployment_are_refused(tmp_path: Path) -> None:
    _write(tmp_path / "a.yaml", _doc("web"))
    _write(tmp_path / "b.yaml", _doc("api"), _doc("web"))
    with pytest.raises(
        UsageError, match=r"b.yaml: document 2: deployment 'web' is also in .*a.yaml: document 1"
    ):
        documents.load([str(tmp_path)], stdin=io.StringIO())


def test_paths_that_are_not_there_or_too_big_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UsageError, match=r"nope\.yaml: no such file or directory"):
        documents.load([str(tmp_path / "nope.yaml")], stdin=io.StringIO())
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"empty: no \*.yaml, \*.yml or \*.json file"):
        documents.load([str(tmp_path / "empty")], stdin=io.StringIO())
    big = tmp_path / "big.yaml"
    big.write_text("#" * 101)
    monkeypatch.setattr(documents, "MAX_FILE_BYTES", 100)
    with pytest.raises(UsageError, match=r"big\.yaml: 101 bytes; at most 100"):
        documents.load([str(big)], stdin=io.StringIO())
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(UsageError, match=r"latin1\.yaml: not UTF-8 text"):
        documents.load([str(tmp_path / "latin1.yaml")], stdin=io.StringIO())


def test_many_violations_are_capped() -> None:
    document = _doc(workloads=[{"name": "w", "bundle": str(n)} for n in range(30)])
    found = _violations(document)
    assert len(found) == documents.MAX_VIOLATIONS + 1
    assert found[-1] == ("$", "and 10 more")


# ---------------------------------------------------------------- the published schema


def test_the_schema_published_in_docs_is_the_packages() -> None:
    published = json.loads((ROOT / "docs/schema/deployment.schema.json").read_text())
    assert published == documents.schema()


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(documents.schema())


def test_the_examples_in_docs_are_valid_and_point_editors_at_the_schema() -> None:
    examples = sorted((ROOT / "docs/examples/deployments").glob("*.yaml"))
    assert len(examples) >= 3
    loaded = documents.load([str(ROOT / "docs/examples/deployments")], stdin=io.StringIO())
    assert {d.spec.get("kind", "fleet") for d in loaded} == {"fleet", "placed"}
    for example in examples:
        first = example.read_text().splitlines()[0]
        assert first == "# yaml-language-server: $schema=../../schema/deployment.schema.json"
        assert (example.parent / "../../schema/deployment.schema.json").resolve().is_file()


def test_checking_does_not_change_the_document() -> None:
    document = _placed()
    before = copy.deepcopy(document)
    documents.check("f.yaml", 1, document)
    assert document == before
