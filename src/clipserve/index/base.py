"""The vector-store contract: one collection of (id, vector, metadata) items, searched by vector.

Every store (the local FAISS/ScaNN store in :mod:`clipserve.index.local`, the Milvus store in
:mod:`clipserve.index.milvus`) follows :class:`VectorStore`:

- ``add`` upserts by external id: an id that exists is replaced (vector and metadata).
- ``search`` returns at most ``top_k`` hits, best first. Scores by metric:

  * ``cosine``: vectors and queries are normalised to unit length; score = cosine similarity
    (higher is better, in [-1, 1]).
  * ``ip``: score = inner product of the raw vectors (higher is better).
  * ``l2``: score = Euclidean distance, *not* squared (lower is better, >= 0).

- ``filter`` is a metadata filter (see :mod:`clipserve.index.filters`): equality on top-level
  keys, ``{"k": v}``, or membership, ``{"k": {"$in": [v1, v2]}}``; several keys must all match.
  A filtered search returns ``min(top_k, number of matching items)`` hits: never fewer while
  matches exist, even when the approximate index would miss them (stores fall back to an exact
  scan over the matching items).
- ``top_k`` must be in ``1..min(size, MAX_TOP_K)``; searching an empty collection, a ``top_k``
  above the collection's size, or a vector of the wrong dimension is an
  :class:`~clipserve.errors.InvalidInputError` that names the limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np
import numpy.typing as npt

Metric = Literal["cosine", "ip", "l2"]
IndexKind = Literal["flat", "ivf-pq", "hnsw", "scann", "milvus"]
LOCAL_KINDS: tuple[IndexKind, ...] = ("flat", "ivf-pq", "hnsw", "scann")
METRICS: tuple[Metric, ...] = get_args(Metric)
INDEX_KINDS: tuple[IndexKind, ...] = get_args(IndexKind)

Vectors = npt.NDArray[np.float32]
"""A float32 matrix, one row per vector (queries may be one row or a 1-D vector)."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOP_K = 10_000
MAX_DIM = 65_536
MAX_ID_BYTES = 512
"""An id is at most this many bytes of UTF-8 (Milvus' VARCHAR primary key limit)."""
MAX_METADATA_BYTES = 65_536
"""One item's metadata, as compact JSON, is at most this many bytes (Milvus' JSON field limit)."""


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result: the external id, its score (see the module docstring) and metadata."""

    id: str
    score: float
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CollectionSpec:
    """What a collection is, fixed at creation: persisted in its manifest."""

    name: str
    dim: int
    metric: Metric = "cosine"
    index: IndexKind = "flat"
    model: str | None = None
    """The embedding model (config name) the vectors come from, if the caller says."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Index parameters as given at creation (validated by the index kind)."""


@dataclass(frozen=True, slots=True)
class StoreInfo:
    """A collection's state, for ``GET /collections/{name}`` and logs."""

    name: str
    size: int
    dim: int
    metric: Metric
    index: IndexKind
    model: str | None
    trained: bool
    """False while an index that needs training (or building) still answers by exact scan."""
    memory_bytes: int | None
    """Approximate bytes held in this process (vectors, index, metadata); None when remote."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """The parameters in effect (chosen nlist/m/nprobe, efSearch...), not only those given."""


@runtime_checkable
class VectorStore(Protocol):
    """One collection. Implementations are safe to call from several threads at once."""

    @property
    def spec(self) -> CollectionSpec: ...

    def add(
        self,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Insert or replace (by id) ``len(ids)`` items; ``vectors`` is ``(len(ids), dim)``."""
        ...

    def delete(self, ids: Sequence[str]) -> int:
        """Remove these ids; unknown ids are ignored. Returns how many were removed."""
        ...

    def search(
        self,
        query: npt.ArrayLike,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """The ``top_k`` best items for ``query`` (shape ``(dim,)`` or ``(1, dim)``)."""
        ...

    def __len__(self) -> int: ...

    def info(self) -> StoreInfo: ...

    def save(self) -> None:
        """Make the current state durable (a no-op when nothing changed since the last save)."""
        ...

    def close(self) -> None:
        """Release resources; later calls raise CollectionNotFoundError. Does not save."""
        ...


class Catalog(Protocol):
    """Creates, finds and drops collections of one backend (local directory or Milvus)."""

    def create(
        self,
        name: str,
        *,
        dim: int,
        metric: Metric = "cosine",
        index: IndexKind = "flat",
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> VectorStore: ...

    def get(self, name: str) -> VectorStore: ...

    def specs(self) -> list[CollectionSpec]:
        """Every collection's spec, sorted by name."""
        ...

    def delete(self, name: str) -> None: ...

    def close(self) -> None: ...
