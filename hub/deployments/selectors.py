"""Label selectors in Kubernetes syntax (pure): parse, match, print canonically.

Rules:
- Syntax: requirements joined by ``,`` (AND): ``key=value`` (also ``key==value``),
  ``key!=value``, ``key in (v1,v2)``, ``key notin (v1,v2)``, ``key`` (the label
  exists), ``!key`` (it does not). Whitespace around tokens is ignored. The empty
  selector (or only whitespace) matches every device.
- Keys and values follow the device label rules (``LABEL_KEY_PATTERN``,
  ``LABEL_VALUE_PATTERN`` in :mod:`hub.devices.labels`); ``key=`` selects an empty
  value, a set holds at least one non-empty value and no trailing comma.
- As in Kubernetes, ``!=`` and ``notin`` also match a device without the label;
  ``=`` and ``in`` need it.
- A selector is at most ``MAX_SELECTOR_CHARS`` characters. Anything else is a
  :class:`SelectorError` whose message quotes the selector, the position and why.
- A :class:`Selector` is canonical: requirements sorted by key, then operator, then
  values, duplicates dropped, so ``parse_selector(str(s)) == s`` and two spellings of
  the same selector compare equal (``==`` prints as ``=``, set values sorted).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from hub.devices.labels import LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN

__all__ = [
    "MAX_SELECTOR_CHARS",
    "Op",
    "Requirement",
    "Selector",
    "SelectorError",
    "parse_selector",
]

MAX_SELECTOR_CHARS = 1024

Op = Literal["=", "!=", "in", "notin", "exists", "!"]

_KEY = re.compile(LABEL_KEY_PATTERN)
_VALUE = re.compile(LABEL_VALUE_PATTERN)
_OP_ORDER: dict[str, int] = {"exists": 0, "!": 1, "=": 2, "!=": 3, "in": 4, "notin": 5}
_WORD = re.compile(r"[A-Za-z0-9_./-]+")
_SPACE = re.compile(r"\s*")


class SelectorError(ValueError):
    """A selector that cannot be parsed or a requirement that cannot exist (bad input)."""

    def __init__(self, text: str, position: int | None, why: str) -> None:
        where = f" at position {position}" if position is not None else ""
        super().__init__(f"invalid selector {text!r}{where}: {why}")
        self.text = text
        self.position = position
        self.why = why


@dataclass(frozen=True, slots=True)
class Requirement:
    """One condition on one label; validated on construction (raises SelectorError)."""

    key: str
    op: Op
    values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.op not in _OP_ORDER:
            raise SelectorError(str(self.key), None, f"unknown operator {self.op!r}")
        if not _KEY.match(self.key):
            raise SelectorError(self.key, None, f"bad label key {self.key!r}")
        counts = {"=": (1, 1), "!=": (1, 1), "in": (1, None), "notin": (1, None)}
        low, high = counts.get(self.op, (0, 0))
        if len(self.values) < low or (high is not None and len(self.values) > high):
            raise SelectorError(self.key, None, f"wrong number of values for {self.op!r}")
        for value in self.values:
            if not _VALUE.match(value) or (self.op in ("in", "notin") and not value):
                raise SelectorError(self.key, None, f"bad label value {value!r}")

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Pure: whether ``labels`` satisfy this requirement (Kubernetes semantics)."""
        value = labels.get(self.key)
        match self.op:
            case "exists":
                return value is not None
            case "!":
                return value is None
            case "=" | "in":
                return value is not None and value in self.values
            case _:  # "!=" | "notin": an absent label matches
                return value is None or value not in self.values

    def __str__(self) -> str:
        match self.op:
            case "exists":
                return self.key
            case "!":
                return f"!{self.key}"
            case "=" | "!=":
                return f"{self.key}{self.op}{next(iter(self.values))}"
            case _:
                return f"{self.key} {self.op} ({','.join(sorted(self.values))})"

    def sort_key(self) -> tuple[str, int, tuple[str, ...]]:
        """The canonical order of requirements in a selector."""
        return (self.key, _OP_ORDER[self.op], tuple(sorted(self.values)))


@dataclass(frozen=True, slots=True)
class Selector:
    """Requirements that must all hold (AND); no requirements select everything.

    Construction puts the requirements in canonical order, so equal selectors compare
    equal however they were written.
    """

    requirements: tuple[Requirement, ...] = ()

    def __post_init__(self) -> None:
        canonical = tuple(sorted(set(self.requirements), key=Requirement.sort_key))
        object.__setattr__(self, "requirements", canonical)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Pure: whether a device with ``labels`` is selected."""
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


class _Parser:
    """A cursor over the text; each method consumes one grammar element or raises."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str, position: int | None = None) -> SelectorError:
        return SelectorError(self.text, self.pos if position is None else position, why)

    def skip_space(self) -> None:
        found = _SPACE.match(self.text, self.pos)
        assert found is not None  # \s* always matches
        self.pos = found.end()

    def at_end(self) -> bool:
        self.skip_space()
        return self.pos >= len(self.text)

    def peek(self, literal: str) -> bool:
        self.skip_space()
        return self.text.startswith(literal, self.pos)

    def take(self, literal: str) -> bool:
        if self.peek(literal):
            self.pos += len(literal)
            return True
        return False

    def word(self, what: str) -> str:
        self.skip_space()
        found = _WORD.match(self.text, self.pos)
        if found is None:
            shown = repr(self.text[self.pos]) if self.pos < len(self.text) else "the end"
            raise self.fail(f"expected {what}, found {shown}")
        self.pos = found.end()
        return found.group()

    def key(self) -> str:
        start = self.pos
        key = self.word("a label key")
        if not _KEY.match(key):
            raise self.fail(f"bad label key {key!r} (see the label rules)", start)
        return key

    def value(self, *, allow_empty: bool) -> str:
        self.skip_space()
        start = self.pos
        if allow_empty and (self.at_end() or self.peek(",")):
            return ""
        value = self.word("a label value")
        if not _VALUE.match(value):
            raise self.fail(f"bad label value {value!r} (see the label rules)", start)
        return value

    def value_set(self, op: str) -> frozenset[str]:
        if not self.take("("):
            raise self.fail(f"expected '(' after {op!r}")
        if self.peek(")"):
            raise self.fail(f"empty set after {op!r}: name at least one value")
        values = {self.value(allow_empty=False)}
        while self.take(","):
            if self.peek(")"):
                raise self.fail("trailing comma in a set")
            values.add(self.value(allow_empty=False))
        if not self.take(")"):
            raise self.fail("unclosed '(': expected ',' or ')'")
        return frozenset(values)

    def requirement(self) -> Requirement:
        if self.take("!"):
            return Requirement(self.key(), "!")
        key = self.key()
        if self.at_end() or self.peek(","):
            return Requirement(key, "exists")
        if self.take("!="):
            return Requirement(key, "!=", frozenset({self.value(allow_empty=True)}))
        if self.take("==") or self.take("="):
            return Requirement(key, "=", frozenset({self.value(allow_empty=True)}))
        start = self.pos
        op = self.word("an operator ('=', '==', '!=', 'in', 'notin') or ','")
        if op not in ("in", "notin"):
            raise self.fail(f"unknown operator {op!r}", start)
        return Requirement(key, "in" if op == "in" else "notin", self.value_set(op))


def parse_selector(text: str) -> Selector:
    """Pure: the selector ``text`` says; raises :class:`SelectorError` (see the rules)."""
    if len(text) > MAX_SELECTOR_CHARS:
        raise SelectorError(
            text[:40] + "...", None, f"longer than {MAX_SELECTOR_CHARS} characters ({len(text)})"
        )
    parser = _Parser(text)
    if parser.at_end():
        return Selector(())
    requirements = [parser.requirement()]
    while not parser.at_end():
        if not parser.take(","):
            raise parser.fail("expected ',' between requirements")
        if parser.at_end():
            raise parser.fail("trailing comma")
        requirements.append(parser.requirement())
    return Selector(tuple(requirements))
