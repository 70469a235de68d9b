"""The local store: exact fallbacks, filtered search paths, saving, loading, closing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from clipserve.errors import CollectionNotFoundError, IndexBackendError
from clipserve.index import local, snapshot
from clipserve.index.base import CollectionSpec, IndexKind, Vectors
from clipserve.index.local import LocalVectorStore
from clipserve.index.table import Slots, VectorTable


class FakeIndex:
    """An index that is always ready and proposes whatever the test says."""

    kind: ClassVar[IndexKind] = "hnsw"
    ready = True
    frees_on_remove = True

    def __init__(self, propose: Any = None, fail: bool = False) -> None:
        self.propose = propose or (lambda q, k: np.zeros(0, np.int64))
        self.fail = fail
        self.calls = 0

    def add(self, slots: Slots, vectors: Vectors) -> None: ...

    def remove(self, slots: Slots) -> None: ...

    def candidates(self, query: Vectors, top_k: int) -> Slots:
        self.calls += 1
        return np.asarray(self.propose(query, top_k), dtype=np.int64)

    def maintain(self, table: VectorTable) -> bool:
        if self.fail:
            raise RuntimeError("training exploded")
        return False

    def effective_params(self) -> dict[str, Any]:
        return {}

    def memory_bytes(self) -> int:
        return 0

    def dump(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        return {}, {}


def store_with(tmp_path: Path, index: Any, n: int = 500) -> tuple[LocalVectorStore, Any]:
    spec = CollectionSpec("t", 8, "ip", "hnsw")
    store = LocalVectorStore(
        tmp_path, spec, VectorTable(8, "ip"), index, generation=0, created_at=""
    )
    data = np.random.default_rng(0).standard_normal((n, 8)).astype(np.float32)
    store.add([str(i) for i in range(n)], data, [{"odd": i % 2 == 1} for i in range(n)])
    return store, data


def exact(data: Any, q: Any, k: int, rows: Any = None) -> list[str]:
    rows = np.arange(len(data)) if rows is None else np.asarray(rows)
    order = np.argsort(-(data[rows] @ q), kind="stable")[:k]
    return [str(int(rows[i])) for i in order]


def test_too_few_candidates_fall_back_to_an_exact_scan(tmp_path: Path) -> None:
    index = FakeIndex(lambda q, k: [0, 1, -1])
    store, data = store_with(tmp_path, index)
    q = data[7] + 0.1
    assert [h.id for h in store.search(q, top_k=5)] == exact(data, q, 5)
    assert index.calls == 1


def test_candidates_are_re_ranked_exactly(tmp_path: Path) -> None:
    store, data = store_with(tmp_path, FakeIndex(lambda q, k: [9, 3, 3, 8, 7, 400, -1]))
    q = data[3]
    hits = store.search(q, top_k=3)
    assert [h.id for h in hits] == exact(data, q, 3, [9, 3, 8, 7, 400])
    assert hits[0].score == pytest.approx(float(data[int(hits[0].id)] @ q), rel=1e-5)


def test_narrow_filters_scan_their_matches_exactly(tmp_path: Path) -> None:
    index = FakeIndex(lambda q, k: list(range(500)))
    store, data = store_with(tmp_path, index, n=500)
    q = data[0]
    hits = store.search(q, top_k=4, filter={"odd": True})
    assert [h.id for h in hits] == exact(data, q, 4, range(1, 500, 2))
    assert index.calls == 0, "500 items is below FILTER_ANN_MIN: no index call"


def test_broad_filters_use_the_index_then_fall_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local, "FILTER_ANN_MIN", 10)
    everything = FakeIndex(lambda q, k: list(range(500)))
    store, data = store_with(tmp_path / "a", everything)
    q = data[0]
    want = exact(data, q, 4, range(1, 500, 2))
    assert [h.id for h in store.search(q, top_k=4, filter={"odd": True})] == want
    assert everything.calls == 1
    only_even = FakeIndex(lambda q, k: list(range(0, 500, 2)))  # no candidate matches
    store, _ = store_with(tmp_path / "b", only_even)
    assert [h.id for h in store.search(q, top_k=4, filter={"odd": True})] == want
    assert only_even.calls == 1


def test_a_failing_index_leaves_the_store_exact_and_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        store, data = store_with(tmp_path, FakeIndex(fail=True))
    assert "index maintenance of collection t failed" in caplog.text
    assert len(store) == 500
    assert store.search(data[5], top_k=1)[0].id == exact(data, data[5], 1)[0]


def new_store(tmp_path: Path, index: IndexKind = "flat") -> LocalVectorStore:
    folder = tmp_path / "c"
    folder.mkdir()
    LocalVectorStore.initialize(folder, CollectionSpec("c", 4, "l2", index))
    return LocalVectorStore.open(folder)


def manifest(tmp_path: Path) -> dict[str, Any]:
    return snapshot.read_json(tmp_path / "c" / "manifest.json")


def test_saves_write_new_generations_and_skip_when_unchanged(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    assert manifest(tmp_path)["generation"] == 0
    store.add(["a", "b"], np.eye(2, 4))
    store.save()
    store.save()
    assert (manifest(tmp_path)["generation"], manifest(tmp_path)["size"]) == (1, 2)
    store.delete(["a"])
    store.save()
    assert manifest(tmp_path)["generation"] == 2
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["gen-00000002", "manifest.json"]
    again = LocalVectorStore.open(tmp_path / "c")
    assert len(again) == 1
    assert again.search(np.eye(2, 4)[1], top_k=1)[0].id == "b"


def test_a_failed_save_keeps_the_last_saved_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(tmp_path)
    store.add(["a"], np.ones((1, 4)))
    store.save()
    store.add(["b"], np.zeros((1, 4)))

    def full_disk(folder: Path, snap: Any) -> None:
        (folder / "vectors.npy").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot, "write_table", full_disk)
    with pytest.raises(IndexBackendError, match="could not be saved: No space left"):
        store.save()
    monkeypatch.undo()
    assert len(LocalVectorStore.open(tmp_path / "c")) == 1
    store.save()  # the state is still dirty: a later save succeeds
    assert len(LocalVectorStore.open(tmp_path / "c")) == 2


def test_corrupt_collections_fail_to_load_clearly(tmp_path: Path) -> None:
    store = new_store(tmp_path, "hnsw")
    store.add(["a"], np.ones((1, 4)))
    store.save()
    path = tmp_path / "c" / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "size": 5}))
    with pytest.raises(IndexBackendError, match="'c' cannot be loaded: .*5 items, found 1"):
        LocalVectorStore.open(tmp_path / "c")
    path.write_text("{not json")
    with pytest.raises(IndexBackendError, match="'c' cannot be loaded: JSONDecodeError"):
        LocalVectorStore.open(tmp_path / "c")


def test_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    store.add(["a"], np.ones((1, 4)))
    store.close()
    with pytest.raises(CollectionNotFoundError, match="'c' does not exist"):
        store.search(np.ones(4), top_k=1)
    with pytest.raises(CollectionNotFoundError):
        store.add(["b"], np.ones((1, 4)))
    with pytest.raises(CollectionNotFoundError):
        store.save()
