"""Vector indexes and collections: a leaf layer (numpy, FAISS, ScaNN, Milvus; nothing else
from clipserve but :mod:`clipserve.errors`).

- :mod:`.base`: the :class:`VectorStore` contract, :class:`Hit`, specs and limits;
- :mod:`.local` / :mod:`.manager`: collections in a local data directory (``flat``,
  ``ivf-pq``, ``hnsw``, ``scann``), saved atomically and reloaded at start-up;
- :mod:`.milvus`: the same contract on a Milvus server or a milvus-lite file.
"""

from clipserve.index.base import (
    INDEX_KINDS,
    LOCAL_KINDS,
    METRICS,
    Catalog,
    CollectionSpec,
    Hit,
    IndexKind,
    Metric,
    StoreInfo,
    VectorStore,
)
from clipserve.index.local import LocalVectorStore
from clipserve.index.manager import CollectionManager

__all__ = [
    "INDEX_KINDS",
    "LOCAL_KINDS",
    "METRICS",
    "Catalog",
    "CollectionManager",
    "CollectionSpec",
    "Hit",
    "IndexKind",
    "LocalVectorStore",
    "Metric",
    "StoreInfo",
    "VectorStore",
]
