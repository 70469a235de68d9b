"""Milvus names and expressions: reversible names, escaped literals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clipserve.index.filters import parse_filter
from clipserve.index.milvus_expr import (
    collection_name,
    decode_name,
    expression,
    ids_expression,
    literal,
)


@given(st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z"))
def test_names_round_trip_and_stay_distinct(name: str) -> None:
    encoded = collection_name(name)
    assert encoded.startswith("cs_")
    assert all(c.isalnum() or c == "_" for c in encoded)
    assert decode_name(encoded) == name


def test_similar_names_do_not_collide() -> None:
    names = ["a-b", "a_b", "a__b", "a_0b", "a-0b", "a-_b"]
    assert len({collection_name(n) for n in names}) == len(names)
    assert decode_name("other") is None
    assert decode_name("cs_a_x") is None


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (True, "true"),
        (False, "false"),
        (-3, "-3"),
        (0.5, "0.5"),
        (1e-07, "1e-07"),
        ("plain", '"plain"'),
        ('say "hi"', r'"say \"hi\""'),
        ("back\\slash", r'"back\\slash"'),
        ("it's", r'"it\'s"'),
        ("two\nlines\r\tx", r'"two\nlines\r\tx"'),
        ("ü 日本", '"ü 日本"'),
    ],
)
def test_literals(value: str | int | float | bool, text: str) -> None:
    assert literal(value) == text


def test_expressions() -> None:
    assert expression(None) == ""
    flt = parse_filter({"a": 1, "b": {"$in": ["x", 'y"']}})
    assert (
        expression(flt)
        == r'metadata["a"] == 1 and (metadata["b"] == "x" or metadata["b"] == "y\"")'
    )
    assert ids_expression(["a", 'b"\\']) == r'id in ["a", "b\"\\"]'
