"""The collection manager: one owner per data directory, atomic create/delete, start-up load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clipserve.errors import (
    CollectionConflictError,
    CollectionNotFoundError,
    IndexBackendError,
    InvalidInputError,
)
from clipserve.index.manager import CollectionManager


def test_collections_are_reloaded_at_start_up(tmp_path: Path) -> None:
    with CollectionManager(tmp_path) as manager:
        store = manager.create("a", dim=3, metric="ip", index="hnsw", model="clip-b32")
        store.add(["x", "y"], np.eye(2, 3), [{"k": 1}, {"k": 2}])
        manager.create("b", dim=5)
    with CollectionManager(tmp_path) as manager:  # closing saved everything
        assert manager.names() == ["a", "b"]
        a = manager.get("a")
        assert (a.spec.dim, a.spec.metric, a.spec.index, a.spec.model) == (
            3,
            "ip",
            "hnsw",
            "clip-b32",
        )
        assert [h.id for h in a.search(np.eye(2, 3)[1], top_k=1)] == ["y"]
        assert "a" in manager


def test_one_process_owns_a_data_directory(tmp_path: Path) -> None:
    first = CollectionManager(tmp_path)
    with pytest.raises(IndexBackendError, match="in use by another clipserve process"):
        CollectionManager(tmp_path)
    first.close()
    CollectionManager(tmp_path).close()


def test_names_conflicts_and_unknown_collections(tmp_path: Path) -> None:
    with CollectionManager(tmp_path) as manager:
        manager.create("a", dim=2)
        with pytest.raises(CollectionConflictError):
            manager.create("a", dim=4)
        with pytest.raises(InvalidInputError, match="invalid collection name"):
            manager.create("../escape", dim=2)
        with pytest.raises(InvalidInputError, match="not local"):
            manager.create("m", dim=2, index="milvus")
        with pytest.raises(InvalidInputError, match="unknown hnsw parameter"):
            manager.create("bad", dim=2, index="hnsw", params={"M": 3})
        assert not (tmp_path / "bad").exists(), "a rejected create leaves nothing"
        with pytest.raises(CollectionNotFoundError, match="collections: a"):
            manager.get("zzz")


def test_delete_removes_the_files(tmp_path: Path) -> None:
    with CollectionManager(tmp_path) as manager:
        store = manager.create("a", dim=2)
        store.add(["x"], np.ones((1, 2)))
        store.save()
        manager.delete("a")
        assert not (tmp_path / "a").exists()
        assert manager.names() == []
        manager.create("a", dim=7)  # the name is free again
        assert manager.get("a").spec.dim == 7


def test_leftovers_are_cleaned_and_broken_collections_reported(tmp_path: Path) -> None:
    with CollectionManager(tmp_path) as manager:
        manager.create("good", dim=2).add(["x"], np.ones((1, 2)))
        manager.create("bad", dim=2).add(["x"], np.ones((1, 2)))
    (tmp_path / ".new-half-0123").mkdir()
    (tmp_path / ".trash-old-4567").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("garbage")
    with CollectionManager(tmp_path) as manager:
        assert manager.names() == ["good"]
        assert "bad" in manager.broken
        with pytest.raises(IndexBackendError, match="'bad' cannot be loaded"):
            manager.get("bad")
        with pytest.raises(CollectionConflictError):
            manager.create("bad", dim=2)
        manager.delete("bad")  # a broken collection can still be dropped
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "good"]


def test_a_closed_manager_refuses_calls(tmp_path: Path) -> None:
    manager = CollectionManager(tmp_path)
    manager.close()
    with pytest.raises(IndexBackendError, match="closed"):
        manager.create("a", dim=2)
