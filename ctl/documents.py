"""Deployment files: YAML or JSON documents, checked against the published JSON Schema.

Rules:
- ``-f PATH`` names a file, a directory (its ``*.yaml``, ``*.yml`` and ``*.json``
  files, sorted by name, not recursive) or ``-`` (YAML on stdin). Files are read
  whole, at most :data:`MAX_FILE_BYTES` each.
- A YAML file holds any number of documents (``---``); a ``.json`` file holds one.
  Documents are numbered from 1 in their file; an empty document is skipped but
  keeps its number, so "document 3" is the third in the file.
- YAML is read with PyYAML's safe loader, made stricter where YAML surprises
  people: a key given twice in one mapping is refused (PyYAML keeps the last one
  silently), timestamps stay strings, and a value JSON has no form for (a binary,
  a set, a non-string key such as an unquoted ``on`` read as true, NaN) is
  refused with its place named.
- Each document is checked against ``ctl/schema/deployment.schema.json`` before
  anything is sent to the hub; every violation is reported at once, each with the
  file, the line (YAML), the document number and the JSON path
  (``$.spec.workloads[0].bundle``). The schema's ``errorMessage`` and
  ``patternErrorMessage`` (what editors show too) word the messages.
- Two documents naming the same deployment are refused: which one should win is a
  guess.
- Nothing here talks to the hub; reading files is the only I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import IO, Any

from ctl.errors import DocumentError, UsageError, Violation

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_VIOLATIONS = 20
SUFFIXES = (".yaml", ".yml", ".json")
STDIN = "-"


@dataclass(frozen=True, slots=True)
class Document:
    """One valid deployment document and where it came from."""

    source: str
    index: int
    name: str
    spec: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}: document {self.index}"


@cache
def schema() -> dict[str, Any]:
    """The published JSON Schema (package data)."""
    text = resources.files("ctl").joinpath("schema/deployment.schema.json").read_text("utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def expand(paths: Sequence[str]) -> list[str]:
    """The files ``-f`` names, in order: a directory becomes its deployment files, sorted.

    Raises UsageError for a path that does not exist or a directory with no such file.
    """
    files: list[str] = []
    for raw in paths:
        if raw == STDIN:
            files.append(STDIN)
            continue
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                str(child)
                for child in path.iterdir()
                if child.is_file() and child.suffix.lower() in SUFFIXES
            )
            if not found:
                raise UsageError(f"{raw}: no *.yaml, *.yml or *.json file in this directory")
            files.extend(found)
        elif path.is_file():
            files.append(raw)
        else:
            raise UsageError(f"{raw}: no such file or directory")
    return files


def load(paths: Sequence[str], *, stdin: IO[str]) -> list[Document]:
    """Every document of ``paths`` (see :func:`expand`), checked.

    Raises UsageError (a path, a size, two documents with one name) or DocumentError
    with every violation of every document (up to :data:`MAX_VIOLATIONS` each).
    """
    documents: list[Document] = []
    violations: list[Violation] = []
    for source in expand(paths):
        text = _read(source, stdin)
        try:
            for index, value, node in _parse(source, text):
                try:
                    documents.append(check(source, index, value, node))
                except DocumentError as exc:
                    violations.extend(exc.violations)
        except DocumentError as exc:  # the file cannot be read past this point
            violations.extend(exc.violations)
    if violations:
        raise DocumentError(violations)
    _refuse_duplicate_names(documents)
    return documents


def check(source: str, index: int, value: object, node: Any = None) -> Document:
    """Pure: ``value`` as a :class:`Document`, or DocumentError listing each violation.

    ``node`` (the YAML node of the document) lets a violation name its line.
    """
    found = list(_not_json(value, "$"))
    if not found:
        found = _schema_violations(value)
    if found:
        located = [
            Violation(source, index, path, message, _line_of(node, path)) for path, message in found
        ]
        located.sort(key=lambda violation: violation.line or 0)
        if len(located) > MAX_VIOLATIONS:
            extra = len(located) - MAX_VIOLATIONS
            located = [
                *located[:MAX_VIOLATIONS],
                Violation(source, index, "$", f"and {extra} more"),
            ]
        raise DocumentError(located)
    assert isinstance(value, dict)
    return Document(source, index, value["metadata"]["name"], value["spec"])


def _parse(source: str, text: str) -> Iterator[tuple[int, object, Any]]:
    if source.endswith(".json"):
        yield 1, _json_document(source, text), None
    else:
        yield from _yaml_documents(source, text)


# ---------------------------------------------------------------- reading


def _read(source: str, stdin: IO[str]) -> str:
    if source == STDIN:
        text = stdin.read(MAX_FILE_BYTES + 1)
        where = "stdin"
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise UsageError(f"{source}: {size} bytes; at most {MAX_FILE_BYTES}")
            text = path.read_text("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"{exc.reason} at byte {exc.start}"
            raise UsageError(f"{source}: not UTF-8 text ({reason})") from None
        except OSError as exc:
            raise UsageError(f"{source}: {exc.strerror or exc}") from None
        where = source
    if len(text) > MAX_FILE_BYTES:
        raise UsageError(f"{where}: more than {MAX_FILE_BYTES} bytes")
    return text


def _json_document(source: str, text: str) -> object:
    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        result: dict[str, object] = {}
        for key, value in items:
            if key in result:
                raise ValueError(f"the key {key!r} is given twice in one object")
            result[key] = value
        return result

    def constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        failure = Violation(source, None, "$", f"not JSON: {exc.msg}", exc.lineno)
        raise DocumentError([failure]) from None
    except ValueError as exc:
        raise DocumentError([Violation(source, None, "$", str(exc))]) from None


def _yaml_documents(source: str, text: str) -> Iterator[tuple[int, object, Any]]:
    """(number, value, node) of each non-empty document; raises DocumentError."""
    import yaml

    loader = _strict_loader()(text)
    index = 0
    try:
        while loader.check_node():
            index += 1
            node = loader.get_node()
            value = loader.construct_document(node)
            if value is not None:
                yield index, value, node
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(part for part in (exc.context, exc.problem) if part)
        failure = Violation(source, index or None, "$", f"YAML: {problem}", line)
        raise DocumentError([failure]) from None
    except yaml.YAMLError as exc:
        raise DocumentError([Violation(source, index or None, "$", f"YAML: {exc}")]) from None
    finally:
        loader.dispose()


@cache
def _strict_loader() -> type[Any]:
    """PyYAML's SafeLoader refusing duplicate keys and keeping timestamps as text."""
    import yaml
    from yaml.constructor import ConstructorError

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            if isinstance(node, yaml.MappingNode):
                seen: set[object] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:  # an unhashable key: the JSON check names it
                        continue
                    if duplicate:
                        raise ConstructorError(
                            "in a mapping",
                            node.start_mark,
                            f"the key {key!r} is given twice",
                            key_node.start_mark,
                        )
            mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
            return mapping

    def as_text(loader: yaml.SafeLoader, node: Any) -> str:
        return str(loader.construct_scalar(node))

    StrictLoader.add_constructor("tag:yaml.org,2002:timestamp", as_text)
    return StrictLoader


# ---------------------------------------------------------------- checking


def _not_json(value: object, path: str) -> Iterator[tuple[str, str]]:
    """Places where ``value`` holds something JSON cannot say."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                hint = " (YAML reads unquoted on/off/yes/no as booleans: quote it)"
                yield path, f"the key {key!r} is not a string{hint}"
            else:
                yield from _not_json(item, _child(path, key))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            yield from _not_json(item, f"{path}[{number}]")
    elif isinstance(value, float) and not math.isfinite(value):
        yield path, f"{value!r} is not a JSON number"
    elif value is not None and not isinstance(value, str | int | float | bool):
        yield path, f"a {type(value).__name__} has no JSON form"


def _child(path: str, key: str) -> str:
    if key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{json.dumps(key)}]"


def _schema_violations(value: object) -> list[tuple[str, str]]:
    errors = sorted(
        _validator().iter_errors(value), key=lambda e: [str(part) for part in e.absolute_path]
    )
    return [(_path_of(error.absolute_path), _message(error)) for error in errors]


@cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


def _path_of(parts: Sequence[object]) -> str:
    path = "$"
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _child(path, str(part))
    return path


def _message(error: Any) -> str:
    """The schema's own wording when it has one (what editors show), else jsonschema's."""
    own = error.schema if isinstance(error.schema, dict) else {}
    shown = json.dumps(error.instance)[:80]
    if error.validator == "pattern" and "patternErrorMessage" in own:
        return f"{shown} is not valid: {own['patternErrorMessage']}"
    if error.validator in ("not", "const", "enum") and "errorMessage" in own:
        # under propertyNames the instance is a key of the object the path names
        key = f"{shown}: " if "propertyNames" in error.relative_schema_path else ""
        return f"{key}{own['errorMessage']}"
    text, whole = str(error.message), repr(error.instance)
    if len(whole) > 80:  # jsonschema quotes the whole value: keep its start
        text = text.replace(whole, whole[:60] + "…")
    return text


def _line_of(node: Any, json_path: str) -> int | None:
    """The 1-based line of ``json_path``'s node in the YAML ``node`` (the deepest found)."""
    if node is None:
        return None
    import yaml

    line: int = node.start_mark.line + 1
    for part in _parts(json_path):
        if isinstance(node, yaml.MappingNode):
            found = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part),
                None,
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            found = node.value[part] if part < len(node.value) else None
        else:
            found = None
        if found is None:
            break
        node = found
        line = node.start_mark.line + 1
    return line


def _parts(json_path: str) -> Iterator[str | int]:
    """Pure: the keys and indexes of a path made by :func:`_path_of`."""
    rest = json_path[1:]
    while rest:
        if rest.startswith("."):
            end = min((i for i in (rest.find(".", 1), rest.find("[", 1)) if i > 0), default=None)
            yield rest[1:end]
            rest = rest[end:] if end is not None else ""
        else:  # [n] or ["key"]
            end = rest.index("]")
            inner = rest[1:end]
            if inner.startswith('"'):
                # a quoted key can hold "]": find the closing quote first
                decoder = json.JSONDecoder()
                key, used = decoder.raw_decode(rest, 1)
                yield str(key)
                rest = rest[used + 1 :]
            else:
                yield int(inner)
                rest = rest[end + 1 :]


def _refuse_duplicate_names(documents: Sequence[Document]) -> None:
    first: dict[str, Document] = {}
    for document in documents:
        earlier = first.setdefault(document.name, document)
        if earlier is not document:
            raise UsageError(
                f"{document.where}: deployment {document.name!r} is also in {earlier.where}; "
                "give each deployment once"
            )
