"""ScaNN index: recall against exact search, delta + rebuilds, persistence, the missing-library
guard."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipserve.errors import IndexBackendError
from clipserve.index.manager import CollectionManager
from clipserve.index.table import VectorTable

scann_index = pytest.importorskip("clipserve.index.scann_index", reason="scann is not installed")
pytest.importorskip("scann", reason="scann is not installed")

N, DIM, QUERIES, K = 20_000, 64, 200, 10


@pytest.mark.slow
def test_scann_recall_at_10_is_at_least_095(tmp_path: Path) -> None:
    rng = np.random.default_rng(42)
    data = rng.standard_normal((N, DIM)).astype(np.float32)
    queries = rng.standard_normal((QUERIES, DIM)).astype(np.float32)
    unit = data / np.linalg.norm(data, axis=1, keepdims=True)
    qunit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(qunit @ unit.T), axis=1)[:, :K]
    store = CollectionManager(tmp_path).create("s", dim=DIM, index="scann")
    for start in range(0, N, 5_000):
        store.add([str(i) for i in range(start, start + 5_000)], data[start : start + 5_000])
    info = store.info()
    assert info.trained
    assert info.params["built_n"] == N, "the delta grew past half the built size: rebuilt"
    found = 0
    for q, want in zip(queries, truth, strict=True):
        found += len({int(h.id) for h in store.search(q, top_k=K)} & set(want.tolist()))
    assert found / (K * QUERIES) >= 0.95


def _filled(n: int, params: dict[str, Any]) -> tuple[Any, VectorTable, Any]:
    rng = np.random.default_rng(3)
    table = VectorTable(8, "ip")
    index = scann_index.ScannIndex(8, "ip", params)
    vectors = rng.standard_normal((n, 8)).astype(np.float32)
    slots = table.insert([str(i) for i in range(n)], vectors, [{}] * n)
    index.add(slots, vectors)
    index.maintain(table)
    return index, table, vectors


def test_adds_after_a_build_go_to_the_delta_until_a_rebuild() -> None:
    index, table, _ = _filled(200, {"exact_below": 100, "delta_ratio": 0.5})
    assert index.ready
    assert index.effective_params()["built_n"] == 200
    extra = np.ones((50, 8), np.float32)
    slots = table.insert([f"x{i}" for i in range(50)], extra, [{}] * 50)
    index.add(slots, extra)
    assert index.maintain(table) is False
    assert set(slots.tolist()) <= set(index.candidates(extra[0], 10).tolist())
    more = table.insert([f"y{i}" for i in range(60)], extra[:1].repeat(60, 0), [{}] * 60)
    index.add(more, extra[:1].repeat(60, 0))
    assert index.maintain(table) is True, "delta 110 > half of 200"
    assert index.effective_params()["built_n"] == 310


def test_deletes_are_tombstones_until_a_rebuild() -> None:
    index, table, _ = _filled(200, {"exact_below": 100, "rebuild_ratio": 0.25})
    assert index.frees_on_remove is False
    index.remove(table.remove([str(i) for i in range(40)]))
    assert index.maintain(table) is False
    index.remove(table.remove([str(i) for i in range(40, 60)]))
    assert index.maintain(table) is True
    assert index.effective_params()["tombstones"] == 0


def test_dump_and_load_give_the_same_candidates() -> None:
    index, _, vectors = _filled(300, {"exact_below": 100})
    state, files = index.dump()
    again = scann_index.ScannIndex(8, "ip", {"exact_below": 100}, state, files)
    for q in vectors[:5]:
        assert again.candidates(q, 10).tolist() == index.candidates(q, 10).tolist()


def test_missing_scann_is_a_clear_backend_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_import = builtins.__import__

    def no_scann(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "scann" or name.startswith("scann."):
            raise ImportError("No module named 'scann'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scann)
    with pytest.raises(IndexBackendError, match="scann is not installed"):
        CollectionManager(tmp_path).create("s", dim=4, index="scann")
    assert not (tmp_path / "s").exists()
