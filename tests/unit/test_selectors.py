"""Label selectors (pure): every form, the canonical text, and every way to get one wrong."""

from __future__ import annotations

import pytest

from hub.deployments.selectors import (
    MAX_SELECTOR_CHARS,
    Requirement,
    Selector,
    SelectorError,
    parse_selector,
)

PROD_EU = {"env": "prod", "region": "eu", "gpu": "nvidia"}
DEV_AP = {"env": "dev", "region": "ap", "legacy": "yes"}
BARE: dict[str, str] = {}


@pytest.mark.parametrize(
    ("text", "canonical", "prod_eu", "dev_ap", "bare"),
    [
        pytest.param("", "", True, True, True, id="empty-selects-everything"),
        pytest.param("   ", "", True, True, True, id="whitespace-only-selects-everything"),
        pytest.param("env=prod", "env=prod", True, False, False, id="equals"),
        pytest.param("env==prod", "env=prod", True, False, False, id="double-equals"),
        pytest.param("env!=prod", "env!=prod", False, True, True, id="not-equals-absent-matches"),
        pytest.param(
            "region in (eu,us)", "region in (eu,us)", True, False, False, id="in-needs-the-label"
        ),
        pytest.param(
            "region notin (ap)", "region notin (ap)", True, False, True, id="notin-absent-matches"
        ),
        pytest.param("gpu", "gpu", True, False, False, id="exists"),
        pytest.param("!legacy", "!legacy", True, False, True, id="does-not-exist"),
        pytest.param("env=", "env=", False, False, False, id="equals-empty-value"),
        pytest.param(
            " env = prod ,  region in ( us , eu ) ",
            "env=prod,region in (eu,us)",
            True,
            False,
            False,
            id="whitespace-ignored-values-sorted",
        ),
        pytest.param(
            "region in (eu,us),env=prod,!legacy,gpu",
            "env=prod,gpu,!legacy,region in (eu,us)",
            True,
            False,
            False,
            id="and-of-all-forms-sorted-by-key",
        ),
        pytest.param("env=prod,env=prod", "env=prod", True, False, False, id="duplicates-dropped"),
        pytest.param(
            "env=prod,env=dev", "env=dev,env=prod", False, False, False, id="contradiction"
        ),
        pytest.param("in", "in", False, False, False, id="key-named-in-exists"),
        pytest.param("in in (a)", "in in (a)", False, False, False, id="key-named-in-with-in"),
        pytest.param(
            "example.com/site-name_2 notin (x.y,A-b)",
            "example.com/site-name_2 notin (A-b,x.y)",
            True,
            True,
            True,
            id="key-with-prefix-and-dots",
        ),
    ],
)
def test_every_form_matches_as_kubernetes_does_and_prints_canonically(
    text: str, canonical: str, prod_eu: bool, dev_ap: bool, bare: bool
) -> None:
    selector = parse_selector(text)
    assert str(selector) == canonical
    assert parse_selector(str(selector)) == selector
    assert [selector.matches(x) for x in (PROD_EU, DEV_AP, BARE)] == [prod_eu, dev_ap, bare]


def test_spellings_of_one_selector_are_equal_and_hash_alike() -> None:
    a = parse_selector("region in (us,eu), env==prod")
    b = parse_selector("env=prod,region in (eu,us)")
    assert a == b
    assert hash(a) == hash(b)


def test_a_selector_built_in_code_is_canonical_too() -> None:
    built = Selector((Requirement("z", "exists"), Requirement("a", "in", frozenset({"y", "x"}))))
    assert str(built) == "a in (x,y),z"
    assert parse_selector(str(built)) == built


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("=prod", "at position 0: expected a label key, found '='", id="empty-key"),
        pytest.param(",env=prod", "at position 0: expected a label key", id="leading-comma"),
        pytest.param("env=prod,,x", "at position 9: expected a label key", id="double-comma"),
        pytest.param("-env=prod", "bad label key '-env'", id="key-starts-badly"),
        pytest.param("k" * 64, "bad label key", id="key-too-long"),
        pytest.param("env=pr/od", "bad label value 'pr/od'", id="bad-value"),
        pytest.param("env=" + "v" * 64, "bad label value", id="value-too-long"),
        pytest.param("env=prod$", "at position 8: expected ',' between requirements", id="junk"),
        pytest.param("env=a b", "expected ',' between requirements", id="two-values"),
        pytest.param("region in (eu,us", "unclosed '('", id="unclosed-paren"),
        pytest.param("region in (eu", "unclosed '('", id="unclosed-paren-one-value"),
        pytest.param("region in ()", "empty set after 'in'", id="in-empty-set"),
        pytest.param("region notin ( )", "empty set after 'notin'", id="notin-empty-set"),
        pytest.param("region in (eu,)", "trailing comma in a set", id="trailing-comma-in-set"),
        pytest.param("region in eu", "expected '(' after 'in'", id="in-without-paren"),
        pytest.param("env=prod,", "at position 9: trailing comma", id="trailing-comma"),
        pytest.param("env=prod, ", "trailing comma", id="trailing-comma-and-space"),
        pytest.param("region within (eu)", "unknown operator 'within'", id="unknown-operator"),
        pytest.param("!", "expected a label key, found the end", id="bang-without-key"),
        pytest.param("!env=prod", "expected ',' between requirements", id="negated-equality"),
        pytest.param("env>1", "expected an operator", id="greater-than"),
        pytest.param(
            "a" * (MAX_SELECTOR_CHARS + 1), "longer than 1024 characters (1025)", id="too-long"
        ),
    ],
)
def test_bad_selectors_say_where_and_why(text: str, fragment: str) -> None:
    with pytest.raises(SelectorError) as caught:
        parse_selector(text)
    message = str(caught.value)
    assert fragment in message
    assert message.startswith("invalid selector '")  # quotes the selector


def test_the_longest_allowed_selector_parses() -> None:
    text = ",".join(f"k{i:03d}" for i in range(205))[:MAX_SELECTOR_CHARS].rstrip(",")
    assert len(parse_selector(text).requirements) > 200


@pytest.mark.parametrize(
    ("key", "op", "values", "fragment"),
    [
        pytest.param("", "exists", frozenset(), "bad label key", id="empty-key"),
        pytest.param("env", "=", frozenset(), "wrong number of values", id="equals-no-value"),
        pytest.param("env", "=", frozenset({"a", "b"}), "wrong number", id="equals-two-values"),
        pytest.param("env", "in", frozenset(), "wrong number", id="in-no-values"),
        pytest.param("env", "exists", frozenset({"a"}), "wrong number", id="exists-with-value"),
        pytest.param("env", "in", frozenset({""}), "bad label value ''", id="in-empty-value"),
        pytest.param("env", "~", frozenset(), "unknown operator", id="unknown-op"),
    ],
)
def test_a_requirement_that_cannot_exist_is_refused(
    key: str, op: str, values: frozenset[str], fragment: str
) -> None:
    with pytest.raises(SelectorError, match=fragment):
        Requirement(key, op, values)  # type: ignore[arg-type]


def test_selector_error_is_a_value_error_with_its_parts() -> None:
    with pytest.raises(ValueError) as caught:
        parse_selector("env=prod,")
    assert isinstance(caught.value, SelectorError)
    assert (caught.value.text, caught.value.position) == ("env=prod,", 9)
