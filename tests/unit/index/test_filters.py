"""Metadata filters: parsing limits and JSON-typed matching."""

from __future__ import annotations

from typing import Any

import pytest

from clipserve.errors import InvalidInputError
from clipserve.index.filters import MAX_CONDITIONS, MAX_IN_VALUES, parse_filter, same_value


def test_no_filter_and_empty_filter_are_none() -> None:
    assert parse_filter(None) is None
    assert parse_filter({}) is None


@pytest.mark.parametrize(
    ("flt", "meta", "ok"),
    [
        ({"c": "red"}, {"c": "red"}, True),
        ({"c": "red"}, {"c": "blue"}, False),
        ({"c": "red"}, {}, False),
        ({"n": 1}, {"n": 1.0}, True),
        ({"n": 1}, {"n": True}, False),
        ({"b": True}, {"b": 1}, False),
        ({"b": False}, {"b": False}, True),
        ({"n": 1}, {"n": "1"}, False),
        ({"n": {"$in": [1, 2]}}, {"n": 2}, True),
        ({"n": {"$in": [1, 2]}}, {"n": 3}, False),
        ({"n": {"$in": []}}, {"n": 3}, False),
        ({"a": 1, "b": "x"}, {"a": 1, "b": "x", "c": 0}, True),
        ({"a": 1, "b": "x"}, {"a": 1, "b": "y"}, False),
        ({"l": "x"}, {"l": ["x"]}, False),
    ],
)
def test_matching(flt: dict[str, Any], meta: dict[str, Any], ok: bool) -> None:
    parsed = parse_filter(flt)
    assert parsed is not None
    assert parsed.matches(meta) is ok


def test_empty_in_matches_nothing() -> None:
    parsed = parse_filter({"a": {"$in": []}})
    assert parsed is not None
    assert parsed.matches_nothing


@pytest.mark.parametrize(
    ("flt", "message"),
    [
        ({"a b": 1}, "filter key 'a b' is invalid"),
        ({'a"]': 1}, "is invalid"),
        ({"a": None}, "not null"),
        ({"a": [1]}, "not list"),
        ({"a": {"$in": [[1]]}}, "not list"),
        ({"a": {"$gt": 1}}, r"unsupported operator\(s\) \$gt"),
        ({"a": {"$in": 5}}, "takes a list"),
        ({"a": {"$in": list(range(MAX_IN_VALUES + 1))}}, "at most 256"),
        ({f"k{i}": 1 for i in range(MAX_CONDITIONS + 1)}, "at most 16 are allowed"),
        ({"a": float("nan")}, "finite"),
        ({"a": 2**64}, "64 bits"),
        ({"a": "x" * 2000}, "2000 characters"),
    ],
)
def test_invalid_filters_are_named(flt: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        parse_filter(flt)


def test_not_a_mapping() -> None:
    with pytest.raises(InvalidInputError, match="must be an object"):
        parse_filter(["a"])  # type: ignore[arg-type]


def test_same_value_is_json_typed() -> None:
    assert same_value(2, 2.0)
    assert not same_value(0, False)
    assert not same_value(None, "None")
