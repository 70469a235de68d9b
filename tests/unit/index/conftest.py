"""Backends for the vector-store contract: every kind behind one small driver."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from clipserve.index.base import Catalog, IndexKind, Metric, VectorStore
from clipserve.index.manager import CollectionManager

KINDS: tuple[IndexKind, ...] = ("flat", "ivf-pq", "hnsw", "scann", "milvus")

SMALL_PARAMS: dict[str, dict[str, Any]] = {
    # thresholds lowered so that the contract's few hundred items exercise the approximate path
    "flat": {},
    "ivf-pq": {"train_threshold": 100, "nlist": 8},
    "hnsw": {"exact_below": 0},
    "scann": {"exact_below": 0},
    "milvus": {},
}

HAVE_SCANN = importlib.util.find_spec("scann") is not None
HAVE_MILVUS = (
    importlib.util.find_spec("pymilvus") is not None
    and importlib.util.find_spec("milvus_lite") is not None
)


def skip_unless_available(kind: str) -> None:
    if kind == "scann" and not HAVE_SCANN:
        pytest.skip("scann is not installed")
    if kind == "milvus" and not HAVE_MILVUS:
        pytest.skip("pymilvus / milvus-lite are not installed")


class Backend:
    """Creates collections of one kind, and reopens them as a restarted server would."""

    def __init__(self, kind: IndexKind, root: Path) -> None:
        skip_unless_available(kind)
        self.kind = kind
        self.root = root
        self.catalog: Catalog = self._open()

    def _open(self) -> Catalog:
        if self.kind == "milvus":
            from clipserve.index.milvus import MilvusCatalog

            return MilvusCatalog(str(self.root / "milvus.db"))
        return CollectionManager(self.root / "data")

    def create(
        self,
        name: str = "c",
        *,
        dim: int = 16,
        metric: Metric = "cosine",
        params: Mapping[str, Any] | None = None,
    ) -> VectorStore:
        given = SMALL_PARAMS[self.kind] if params is None else params
        return self.catalog.create(name, dim=dim, metric=metric, index=self.kind, params=given)

    def reopen(self) -> None:
        """Save everything, close, and open the catalog again from disk."""
        for spec in self.catalog.specs():
            self.catalog.get(spec.name).save()
        self.catalog.close()
        self.catalog = self._open()

    def close(self) -> None:
        self.catalog.close()


@pytest.fixture(params=KINDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = Backend(request.param, tmp_path)
    yield b
    b.close()
