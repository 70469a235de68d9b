"""Input checks: names, ids, vectors, metadata, queries, top_k."""

from __future__ import annotations

import numpy as np
import pytest

from clipserve.errors import DimensionMismatchError, InvalidInputError
from clipserve.index.base import MAX_METADATA_BYTES, MAX_TOP_K
from clipserve.index.validation import (
    check_ids,
    check_metadata,
    check_name,
    check_query,
    check_spec,
    check_top_k,
    check_vectors,
)


@pytest.mark.parametrize("name", ["a", "A-b_9", "x" * 64])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a/b", "..", "a b", ".hidden", "é", 5])
def test_invalid_names(name: object) -> None:
    with pytest.raises(InvalidInputError, match="invalid collection name"):
        check_name(name)


def test_spec_checks() -> None:
    spec = check_spec("c", 8, "l2", "hnsw", "clip", {"m": 16})
    assert (spec.dim, spec.metric, spec.index, spec.model, dict(spec.params)) == (
        8,
        "l2",
        "hnsw",
        "clip",
        {"m": 16},
    )
    with pytest.raises(InvalidInputError, match="dim must be an integer"):
        check_spec("c", 0, "l2", "flat", None, None)
    with pytest.raises(InvalidInputError, match="metric must be one of cosine, ip, l2"):
        check_spec("c", 8, "dot", "flat", None, None)
    with pytest.raises(InvalidInputError, match="index must be one of"):
        check_spec("c", 8, "ip", "annoy", None, None)


def test_ids() -> None:
    assert check_ids(("a", "b")) == ["a", "b"]
    with pytest.raises(InvalidInputError, match="list of strings"):
        check_ids("abc")
    with pytest.raises(InvalidInputError, match="non-empty string"):
        check_ids(["a", ""])
    with pytest.raises(InvalidInputError, match="longer than 512 bytes"):
        check_ids(["é" * 300])  # 300 characters, 600 bytes
    with pytest.raises(InvalidInputError, match="'b' appears twice"):
        check_ids(["a", "b", "b"])


def test_vectors_are_float32_and_unit_length_for_cosine() -> None:
    out = check_vectors([[3.0, 4.0]], 1, 2, "cosine", "c")
    assert out.dtype == np.float32
    assert out[0].tolist() == pytest.approx([0.6, 0.8])
    assert check_vectors([3.0, 4.0], 1, 2, "l2", "c").tolist() == [[3.0, 4.0]]
    with pytest.raises(DimensionMismatchError) as info:
        check_vectors(np.zeros((2, 3)), 2, 4, "ip", "c")
    assert (info.value.expected, info.value.got) == (4, 3)
    with pytest.raises(InvalidInputError, match="2-D"):
        check_vectors(np.zeros((2, 3, 1)), 2, 3, "ip", "c")
    with pytest.raises(InvalidInputError, match="at most 1e\\+15"):
        check_vectors([[1e20, 0.0]], 1, 2, "ip", "c")
    with pytest.raises(InvalidInputError, match="numeric"):
        check_vectors([["a", "b"]], 1, 2, "ip", "c")


def test_query_shapes() -> None:
    assert check_query([[1.0, 0.0]], 2, "ip", "c").shape == (2,)
    with pytest.raises(InvalidInputError, match="one vector"):
        check_query(np.zeros((2, 2)), 2, "ip", "c")
    with pytest.raises(DimensionMismatchError, match="query has dimension 3"):
        check_query([1.0, 2.0, 3.0], 2, "ip", "c")


def test_metadata() -> None:
    assert check_metadata(None, 2) == [{}, {}]
    src = [{"a": [1, {"b": None}]}]
    out = check_metadata(src, 1)
    assert out == src
    assert out[0] is not src[0], "a deep copy: callers may mutate theirs"
    with pytest.raises(InvalidInputError, match="2 ids but 1 metadata"):
        check_metadata([{}], 2)
    with pytest.raises(InvalidInputError, match="must be JSON"):
        check_metadata([{"a": float("inf")}], 1)
    with pytest.raises(InvalidInputError, match="must be JSON"):
        check_metadata([{"a": object()}], 1)
    with pytest.raises(InvalidInputError, match="string keys"):
        check_metadata([{1: "a"}], 1)
    with pytest.raises(InvalidInputError, match=f"over {MAX_METADATA_BYTES} bytes"):
        check_metadata([{"a": "x" * MAX_METADATA_BYTES}], 1)


def test_top_k() -> None:
    assert check_top_k(3, 3, "c") == 3
    with pytest.raises(InvalidInputError, match="is empty"):
        check_top_k(1, 0, "c")
    with pytest.raises(InvalidInputError, match=r"top_k 4 exceeds the size of collection 'c' \(3"):
        check_top_k(4, 3, "c")
    with pytest.raises(InvalidInputError, match="over the limit"):
        check_top_k(MAX_TOP_K + 1, 10**6, "c")
    for bad in (0, -1, True, 1.5, "3"):
        with pytest.raises(InvalidInputError, match="positive integer"):
            check_top_k(bad, 10, "c")
