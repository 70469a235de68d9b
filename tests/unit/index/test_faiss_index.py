"""FAISS indexes: recall against exact search, training, tombstones, persistence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipserve.errors import InvalidInputError
from clipserve.index.faiss_index import HnswIndex, IvfPqIndex, auto_m, auto_nbits, auto_nlist
from clipserve.index.local import LocalVectorStore
from clipserve.index.manager import CollectionManager
from clipserve.index.table import VectorTable

N, DIM, QUERIES, K = 20_000, 64, 200, 10


@pytest.fixture(scope="module")
def random_data() -> tuple[Any, Any, list[list[int]]]:
    """20k random gaussian vectors (hard for PQ and graphs), fresh queries and exact top-10."""
    rng = np.random.default_rng(42)
    data = rng.standard_normal((N, DIM)).astype(np.float32)
    queries = rng.standard_normal((QUERIES, DIM)).astype(np.float32)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    qunit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(qunit @ unit.T), axis=1)[:, :K]
    return data, queries, truth.tolist()


def recall(store: LocalVectorStore, queries: Any, truth: list[list[int]]) -> float:
    found = 0
    for q, want in zip(queries, truth, strict=True):
        got = {int(h.id) for h in store.search(q, top_k=K)}
        found += len(got & set(want))
    return found / (K * len(truth))


def build(tmp_path: Path, kind: str, data: Any, params: dict[str, Any]) -> LocalVectorStore:
    manager = CollectionManager(tmp_path)
    store = manager.create("r", dim=DIM, index=kind, params=params)  # type: ignore[arg-type]
    for start in range(0, N, 5_000):  # in batches: training / calibration happen on the way
        ids = [str(i) for i in range(start, start + 5_000)]
        store.add(ids, data[start : start + 5_000])
    return store


@pytest.mark.slow
def test_ivf_pq_recall_at_10_is_at_least_095(tmp_path: Path, random_data: Any) -> None:
    data, queries, truth = random_data
    store = build(tmp_path, "ivf-pq", data, {})
    info = store.info()
    assert info.trained
    assert info.params["trained_on"] == 10_000, "trained once, when the threshold was reached"
    assert DIM % info.params["m"] == 0
    assert recall(store, queries, truth) >= 0.95


@pytest.mark.slow
def test_hnsw_recall_at_10_is_at_least_095(tmp_path: Path, random_data: Any) -> None:
    data, queries, truth = random_data
    store = build(tmp_path, "hnsw", data, {})
    assert store.info().trained
    assert recall(store, queries, truth) >= 0.95


def test_ivf_pq_answers_exactly_until_trained(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    store = CollectionManager(tmp_path).create(
        "c", dim=8, index="ivf-pq", params={"train_threshold": 300, "nlist": 4}
    )
    store.add([f"a{i}" for i in range(299)], rng.standard_normal((299, 8)))
    assert not store.info().trained
    assert store.info().params == {"train_threshold": 300}
    store.add(["last"], rng.standard_normal((1, 8)))
    info = store.info()
    assert info.trained
    assert (info.params["nlist"], info.params["m"], info.params["trained_on"]) == (4, 2, 300)
    store.add([f"b{i}" for i in range(100)], rng.standard_normal((100, 8)))
    assert store.info().params["trained_on"] == 300, "never re-trained"


def test_hnsw_deletes_are_tombstones_until_a_rebuild() -> None:
    rng = np.random.default_rng(1)
    table = VectorTable(8, "l2")
    index = HnswIndex(8, "l2", {"exact_below": 0, "rebuild_ratio": 0.25})
    vectors = rng.standard_normal((100, 8)).astype(np.float32)
    slots = table.insert([str(i) for i in range(100)], vectors, [{}] * 100)
    index.add(slots, vectors)
    assert index.maintain(table) is False
    gone = table.remove([str(i) for i in range(20)])
    index.remove(gone)
    assert index.maintain(table) is False, "20% tombstones: below the rebuild ratio"
    assert index.effective_params()["tombstones"] == 20
    assert table.retired_count == 20, "slots still in the graph are not reused"
    index.remove(table.remove(["20", "21", "22", "23", "24", "25"]))
    assert index.maintain(table) is True
    assert index.effective_params()["tombstones"] == 0
    cands = index.candidates(vectors[50], 10)
    assert not set(cands.tolist()) & set(gone.tolist())


@pytest.mark.parametrize("cls", [IvfPqIndex, HnswIndex])
def test_dump_and_load_give_the_same_candidates(cls: Any) -> None:
    rng = np.random.default_rng(2)
    table = VectorTable(16, "cosine")
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    params = {"train_threshold": 100, "nlist": 8} if cls is IvfPqIndex else {"exact_below": 0}
    index = cls(16, "cosine", params)
    slots = table.insert([str(i) for i in range(600)], vectors, [{}] * 600)
    index.add(slots, vectors)
    index.maintain(table)
    assert index.ready
    state, files = index.dump()
    again = cls(16, "cosine", params, state, files)
    for q in vectors[:5]:
        assert again.candidates(q, 10).tolist() == index.candidates(q, 10).tolist()
    assert again.memory_bytes() == index.memory_bytes() > 0


def test_parameter_choices() -> None:
    assert auto_nlist(20_000) == 141
    assert auto_nlist(10) == 4
    assert [auto_m(d) for d in (64, 512, 768, 100, 7)] == [16, 64, 96, 25, 1]
    assert all(d % auto_m(d) == 0 for d in range(1, 300))
    assert auto_nbits(10_000) == 8
    assert auto_nbits(400) == 4
    with pytest.raises(InvalidInputError, match="m divides 64"):
        IvfPqIndex(64, "ip", {"m": 5})
    with pytest.raises(InvalidInputError, match="unknown ivf-pq parameter"):
        IvfPqIndex(64, "ip", {"nlists": 5})
    with pytest.raises(InvalidInputError, match="ef_search must be an integer"):
        HnswIndex(64, "ip", {"ef_search": 1.5})
