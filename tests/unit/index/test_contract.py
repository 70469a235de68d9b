"""The VectorStore contract, run on every kind: flat, ivf-pq, hnsw, scann (local) and milvus
(milvus-lite). The ``backend`` fixture (conftest.py) is parametrised over the kinds."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from clipserve.errors import (
    CollectionConflictError,
    CollectionNotFoundError,
    DimensionMismatchError,
    InvalidInputError,
)
from clipserve.index.base import Hit, Metric, VectorStore

N, DIM = 400, 16


def gaussian(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def expected_scores(data: np.ndarray[Any, Any], q: np.ndarray[Any, Any], metric: Metric) -> Any:
    d, q = data.astype(np.float64), q.astype(np.float64)
    if metric == "l2":
        return np.linalg.norm(d - q, axis=1)
    if metric == "cosine":
        d = d / np.linalg.norm(d, axis=1, keepdims=True)
        q = q / np.linalg.norm(q)
    return d @ q


def assert_same_hits(got: list[Hit], want: list[Hit]) -> None:
    """Same ids, metadata and order; scores equal up to float noise (Milvus recomputes them)."""
    assert [(h.id, h.metadata) for h in got] == [(h.id, h.metadata) for h in want]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], rel=1e-5, abs=1e-6)


def fill(store: VectorStore, n: int = N, seed: int = 0) -> tuple[list[str], Any]:
    data = gaussian(n, store.spec.dim, seed)
    ids = [f"item-{i}" for i in range(n)]
    meta = [{"group": i % 4, "even": i % 2 == 0, "name": f"n{i}"} for i in range(n)]
    store.add(ids, data, meta)
    return ids, data


@pytest.mark.parametrize("metric", ["cosine", "ip", "l2"])
def test_each_item_is_its_own_best_hit_with_exact_scores(backend: Any, metric: Metric) -> None:
    store = backend.create(metric=metric)
    ids, data = fill(store)
    assert store.info().trained, "the approximate path is what this suite tests"
    for i in (0, 17, 123, 399):
        hits = store.search(data[i], top_k=5)
        assert len(hits) == 5
        if metric != "ip":  # under ip a longer vector can beat the item itself
            assert hits[0].id == ids[i]
        truth = expected_scores(data, data[i], metric)
        for hit in hits:
            assert hit.score == pytest.approx(truth[ids.index(hit.id)], rel=1e-4, abs=1e-4)
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=metric != "l2"), "best first"
    assert store.search(data[5], top_k=1)[0].metadata == {"group": 1, "even": False, "name": "n5"}


def test_upsert_replaces_vector_and_metadata(backend: Any) -> None:
    store = backend.create()
    ids, data = fill(store)
    new = -data[7]
    store.add([ids[7]], new[None, :], [{"group": 99}])
    assert len(store) == N
    hit = store.search(new, top_k=1)[0]
    assert (hit.id, hit.metadata) == (ids[7], {"group": 99})
    assert hit.score == pytest.approx(1.0, abs=1e-5)
    assert ids[7] not in [h.id for h in store.search(data[7], top_k=5)]


def test_delete_forgets_items_and_counts_only_known_ids(backend: Any) -> None:
    store = backend.create()
    ids, data = fill(store)
    assert store.delete([ids[3], ids[4], "never-added"]) == 2
    assert store.delete([ids[3]]) == 0
    assert len(store) == N - 2
    found = [h.id for h in store.search(data[3], top_k=20)]
    assert ids[3] not in found
    assert ids[4] not in found
    store.add([ids[3]], data[3][None, :])
    assert store.search(data[3], top_k=1)[0].id == ids[3]
    assert len(store) == N - 1


def test_many_deletes_keep_results_correct(backend: Any) -> None:
    store = backend.create()
    ids, data = fill(store)
    gone = ids[: N // 2]  # enough to trigger tombstone rebuilds in hnsw and scann
    assert store.delete(gone) == N // 2
    assert len(store) == N - N // 2
    for i in (250, 399):
        hits = store.search(data[i], top_k=10)
        assert hits[0].id == ids[i]
        assert not set(gone) & {h.id for h in hits}


def test_filter_equality_membership_and_conjunction(backend: Any) -> None:
    store = backend.create()
    ids, data = fill(store)
    q = data[0]
    for flt, ok in [
        ({"group": 2}, lambda i: i % 4 == 2),
        ({"group": {"$in": [1, 3]}}, lambda i: i % 2 == 1),
        ({"even": True, "group": {"$in": [0, 1, 2]}}, lambda i: i % 4 in (0, 2)),
        ({"name": "n10"}, lambda i: i == 10),
    ]:
        hits = store.search(q, top_k=10, filter=flt)
        assert hits, flt
        assert all(ok(ids.index(h.id)) for h in hits), flt
        allowed = [i for i in range(N) if ok(i)]
        assert len(hits) == min(10, len(allowed)), "never fewer hits than matching items"


def test_filter_returns_every_match_when_fewer_than_top_k(backend: Any) -> None:
    store = backend.create()
    ids, data = fill(store)
    hits = store.search(data[0], top_k=50, filter={"name": {"$in": ["n1", "n2", "n3"]}})
    assert sorted(h.id for h in hits) == [ids[1], ids[2], ids[3]]
    assert store.search(data[0], top_k=5, filter={"group": 7}) == []
    assert store.search(data[0], top_k=5, filter={"group": {"$in": []}}) == []
    assert store.search(data[0], top_k=5, filter={"missing": 1}) == []


def test_filtered_search_ranks_matches_correctly(backend: Any) -> None:
    store = backend.create()
    ids, data = fill(store)
    q = gaussian(1, seed=9)[0]
    hits = store.search(q, top_k=5, filter={"group": 1})
    scores = expected_scores(data, q, "cosine")
    truth = sorted((i for i in range(N) if i % 4 == 1), key=lambda i: -scores[i])[:5]
    found = [ids.index(h.id) for h in hits]
    assert len(set(found) & set(truth)) >= (5 if backend.kind == "flat" else 4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_state_survives_save_and_reopen(backend: Any) -> None:
    store = backend.create("keep", metric="l2")
    ids, data = fill(store)
    store.delete(ids[:10])
    store.add([ids[20]], (data[20] + 1)[None, :], [{"group": "moved"}])
    queries = gaussian(5, seed=3)
    before = [store.search(q, top_k=7) for q in queries]
    filtered = store.search(queries[0], top_k=7, filter={"group": 2})
    info = store.info()
    backend.reopen()
    again = backend.catalog.get("keep")
    assert len(again) == N - 10
    assert again.spec.metric == "l2"
    for q, hits in zip(queries, before, strict=True):
        assert_same_hits(again.search(q, top_k=7), hits)
    assert_same_hits(again.search(queries[0], top_k=7, filter={"group": 2}), filtered)
    assert again.search(data[20] + 1, top_k=1)[0].metadata == {"group": "moved"}
    assert (again.info().size, again.info().dim, again.info().index) == (
        info.size,
        info.dim,
        info.index,
    )


def test_info_describes_the_collection(backend: Any) -> None:
    store = backend.create(dim=8, metric="ip")
    store.add(["a", "b"], gaussian(2, 8))
    info = store.info()
    assert (info.name, info.size, info.dim, info.metric, info.index) == (
        "c",
        2,
        8,
        "ip",
        backend.kind,
    )
    assert isinstance(info.trained, bool)
    assert info.memory_bytes is None or info.memory_bytes > 0


def test_input_errors_are_clear(backend: Any) -> None:
    store = backend.create()
    with pytest.raises(InvalidInputError, match="empty"):
        store.search(gaussian(1)[0], top_k=1)
    ids, data = fill(store, n=20)
    with pytest.raises(
        DimensionMismatchError, match="dimension 15 but collection 'c' has dimension 16"
    ):
        store.add(["x"], gaussian(1, 15))
    with pytest.raises(DimensionMismatchError, match="query has dimension 17"):
        store.search(gaussian(1, 17)[0])
    with pytest.raises(InvalidInputError, match=r"top_k 21 exceeds .*\(20 items\)"):
        store.search(data[0], top_k=21)
    with pytest.raises(InvalidInputError, match="top_k must be a positive integer"):
        store.search(data[0], top_k=0)
    with pytest.raises(InvalidInputError, match="2 ids but 1 vectors"):
        store.add(["x", "y"], gaussian(1))
    with pytest.raises(InvalidInputError, match="finite"):
        store.add(["x"], np.full((1, DIM), np.nan, np.float32))
    with pytest.raises(InvalidInputError, match="appears twice"):
        store.add(["x", "x"], gaussian(2))
    with pytest.raises(InvalidInputError, match="unsupported operator"):
        store.search(data[0], filter={"group": {"$gt": 1}})
    with pytest.raises(InvalidInputError, match="zero"):
        store.search(np.zeros(DIM, np.float32))
    assert len(store) == 20, "failed calls change nothing"


def test_catalog_create_get_list_delete(backend: Any) -> None:
    cat = backend.catalog
    a = backend.create("alpha")
    backend.create("beta_2-x")
    with pytest.raises(CollectionConflictError, match="'alpha' already exists"):
        backend.create("alpha")
    with pytest.raises(InvalidInputError, match="invalid collection name"):
        backend.create("no/slashes")
    assert [s.name for s in cat.specs()] == ["alpha", "beta_2-x"]
    assert cat.get("alpha") is a
    cat.delete("alpha")
    with pytest.raises(CollectionNotFoundError, match="'alpha' does not exist"):
        cat.get("alpha")
    with pytest.raises(CollectionNotFoundError):
        a.search(gaussian(1)[0])
    with pytest.raises(CollectionNotFoundError):
        cat.delete("alpha")
    assert [s.name for s in cat.specs()] == ["beta_2-x"]


def test_concurrent_adds_and_searches(backend: Any) -> None:
    store = backend.create()
    ids, data = fill(store, n=200)
    extra = gaussian(160, seed=5)
    errors: list[BaseException] = []

    def writer(part: int) -> None:
        try:
            for j in range(part * 40, part * 40 + 40, 10):
                store.add([f"new-{k}" for k in range(j, j + 10)], extra[j : j + 10])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader() -> None:
        try:
            for i in range(0, 200, 10):
                assert store.search(data[i], top_k=3)[0].id == ids[i]
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    assert not any(t.is_alive() for t in threads)
    assert len(store) == 360
