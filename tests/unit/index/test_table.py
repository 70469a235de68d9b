"""The vector table: slot lifecycle, exact search, snapshots."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from clipserve.index.base import Metric
from clipserve.index.filters import parse_filter
from clipserve.index.table import VectorTable


def filled(metric: Metric = "ip", n: int = 50, dim: int = 6) -> tuple[VectorTable, Any]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    table = VectorTable(dim, metric)
    table.insert([f"i{i}" for i in range(n)], vectors, [{"i": i} for i in range(n)])
    return table, vectors


def test_slots_are_retired_then_freed_then_reused() -> None:
    table, vectors = filled(n=5)
    gone = table.remove(["i1", "i3", "nope"])
    assert gone.tolist() == [1, 3]
    assert (len(table), table.retired_count) == (3, 2)
    assert table.insert(["a"], vectors[:1], [{}]).tolist() == [5], "retired slots wait"
    table.release([3])
    assert table.insert(["b"], vectors[:1], [{}]).tolist() == [3]
    table.release()
    assert table.insert(["c", "d"], vectors[:2], [{}, {}]).tolist() == [1, 6]
    assert table.is_alive(np.array([0, 1, 2, 3, -1, 99])).tolist() == [
        True,
        True,
        True,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize("metric", ["ip", "l2", "cosine"])
def test_exact_search_matches_brute_force(metric: Metric) -> None:
    table, vectors = filled(metric, n=300)
    table.remove([f"i{i}" for i in range(0, 300, 3)])
    alive = [i for i in range(300) if i % 3]
    rng = np.random.default_rng(1)
    for q in rng.standard_normal((5, 6)).astype(np.float32):
        if metric == "l2":
            key = np.linalg.norm(vectors[alive] - q, axis=1)
        else:
            key = -(vectors[alive] @ q)
        want = [f"i{alive[j]}" for j in np.argsort(key)[:7]]
        hits = table.exact(q, 7)
        assert [h.id for h in hits] == want
        subset = np.arange(0, 300, 2, dtype=np.int64)
        sub_hits = table.exact(q, 4, subset)
        assert all(int(h.id[1:]) % 2 == 0 and int(h.id[1:]) % 3 for h in sub_hits)
        batch = table.exact_batch(q[None, :], 7)[0]
        assert [f"i{s}" for s in batch.tolist()] == want


def test_exact_batch_pads_with_minus_one() -> None:
    table, _ = filled(n=3)
    top = table.exact_batch(np.ones((2, 6), np.float32), 5)
    assert top.shape == (2, 5)
    assert (top[:, 3:] == -1).all()


def test_l2_scores_are_euclidean_distances() -> None:
    table = VectorTable(2, "l2")
    table.insert(["a", "b"], np.array([[0, 0], [3, 4]], np.float32), [{}, {}])
    hits = table.exact(np.zeros(2, np.float32), 2)
    assert [(h.id, h.score) for h in hits] == [("a", 0.0), ("b", 5.0)]


def test_matching_and_hits_copy_metadata() -> None:
    table, vectors = filled(n=10)
    flt = parse_filter({"i": {"$in": [2, 4, 11]}})
    assert flt is not None
    assert table.matching(flt).tolist() == [2, 4]
    hit = table.exact(vectors[2], 1, table.matching(flt))[0]
    hit.metadata["i"] = "changed"  # type: ignore[index]
    assert table.exact(vectors[2], 1)[0].metadata == {"i": 2}


def test_snapshot_round_trip_keeps_slots_and_retired() -> None:
    table, vectors = filled(n=20)
    table.remove(["i5", "i6"])
    table.release([5])
    snap = table.snapshot()
    again = VectorTable.restore(6, "ip", snap)
    assert len(again) == 18
    assert again.retired_count == 1
    assert again.slots_of(["i7", "i19"]).tolist() == [7, 19]
    assert again.insert(["new"], vectors[:1], [{}]).tolist() == [5]
    q = vectors[9]
    assert [h.id for h in again.exact(q, 5)] == [h.id for h in table.exact(q, 5)]
