"""FAISS approximate indexes: IVF-PQ and HNSW (``faiss-cpu``).

**IVF-PQ** (``ivf-pq``) needs training, so a collection answers by exact scan until it holds
``max(train_threshold, 39 * nlist)`` items; then the index trains *once* on (a sample of) them,
takes every item, and answers from then on. Chosen from the size and dim at training time:

- ``nlist`` = ``sqrt(n)`` (clamped to 4..65536);
- ``m`` = ``dim / 4`` sub-quantizers up to 128 dims, ``dim / 8`` above (PQ training time grows
  sharply for 4-dim sub-vectors), always a divisor of ``dim``;
- ``nbits`` = 8, fewer when the training set is small (a k-means wants 39 points per centroid);
- ``nprobe`` and the re-ranking pool are calibrated (see :mod:`clipserve.index.ann`).

Removal is real (``remove_ids``); slots are reused at once. Items added after training are
encoded with the first training's codebooks: a collection that grows far past its training
size keeps working but its lists grow long (create a new one to re-train).

**HNSW** (``hnsw``) is built incrementally (``IndexHNSWFlat``, no training), answers once the
collection holds ``exact_below`` items, and calibrates ``efSearch``. FAISS cannot remove from an
HNSW graph, so a delete (or the old version of an upserted item) leaves a *tombstone*: its slot
stays in the graph, is filtered out of candidates, and is not reused; when tombstones exceed
``rebuild_ratio`` of the graph, the graph is rebuilt from the live items (an ``add`` or
``delete`` that triggers it takes as long as building the index anew).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import faiss
import numpy as np

from clipserve.index.ann import (
    calibrate,
    calibration_set,
    effort_ladder,
    parse_params,
    require,
)
from clipserve.index.base import IndexKind, Metric, Vectors
from clipserve.index.table import Slots, VectorTable

TRAIN_SAMPLE = 20_000
"""IVF-PQ trains on at most max(TRAIN_SAMPLE, 50 * nlist) items."""


def _faiss_metric(metric: Metric) -> int:
    return cast(int, faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)


def _to_bytes(index: Any) -> bytes:
    return bytes(faiss.serialize_index(index).tobytes())


def _from_bytes(blob: bytes) -> Any:
    return faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))


def auto_nlist(n: int) -> int:
    return max(4, min(65_536, int(math.sqrt(n))))


def auto_m(dim: int) -> int:
    """The number of PQ sub-quantizers: sub-vectors of 4 (<= 128 dims) or 8 values, rounded to
    a divisor of ``dim``."""
    target = max(1, dim // (4 if dim <= 128 else 8))
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


def auto_nbits(n_train: int) -> int:
    return max(4, min(8, int(math.log2(max(16, n_train) / 39))))


# --- IVF-PQ ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IvfPqParams:
    nlist: int | None = None
    m: int | None = None
    nbits: int | None = None
    nprobe: int | None = None
    rerank: int | None = None
    """Candidates re-ranked exactly, as a multiple of max(top_k, 10); None calibrates it."""
    train_threshold: int = 10_000
    target_recall: float = 0.97

    def check(self, dim: int) -> None:
        kind = "ivf-pq"
        require(self.nlist is None or 1 <= self.nlist <= 65_536, kind, "nlist is 1..65536")
        require(self.m is None or (self.m >= 1 and dim % self.m == 0), kind, f"m divides {dim}")
        require(self.nbits is None or 4 <= self.nbits <= 12, kind, "nbits is 4..12")
        require(self.nprobe is None or self.nprobe >= 1, kind, "nprobe is >= 1")
        require(self.rerank is None or 1 <= self.rerank <= 100, kind, "rerank is 1..100")
        require(self.train_threshold >= 1, kind, "train_threshold is >= 1")
        require(0 < self.target_recall <= 1, kind, "target_recall is in (0, 1]")


class IvfPqIndex:
    kind: ClassVar[IndexKind] = "ivf-pq"
    frees_on_remove = True

    def __init__(
        self,
        dim: int,
        metric: Metric,
        params: dict[str, Any],
        state: dict[str, Any] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        self.dim, self.metric = dim, metric
        self.params = parse_params(IvfPqParams, params, self.kind)
        self.params.check(dim)
        self._state: dict[str, Any] = dict(state or {})
        self._index: Any = None
        if files and "ivfpq.faiss" in files:
            self._index = _from_bytes(files["ivfpq.faiss"])

    @property
    def ready(self) -> bool:
        return self._index is not None

    def add(self, slots: Slots, vectors: Vectors) -> None:
        if self._index is not None and len(slots):
            self._index.add_with_ids(vectors, slots)

    def remove(self, slots: Slots) -> None:
        if self._index is not None and len(slots):
            self._index.remove_ids(np.ascontiguousarray(slots, dtype=np.int64))

    def candidates(self, query: Vectors, top_k: int) -> Slots:
        pool = int(self._state["rerank"]) * max(top_k, 10)
        return self._search(query.reshape(1, -1), int(self._state["nprobe"]), pool)[0]

    def _search(self, queries: Vectors, nprobe: int, pool: int) -> list[Slots]:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        _, labels = self._index.search(queries, pool, params=params)
        return list(np.asarray(labels, dtype=np.int64))

    def maintain(self, table: VectorTable) -> bool:
        n = len(table)
        if self._index is None:
            nlist = self.params.nlist or auto_nlist(n)
            if n < max(self.params.train_threshold, 39 * nlist):
                return False
            self._train(table, nlist)
            self._calibrate(table)
        elif n >= 2 * int(self._state.get("calibrated_at", 0)):
            self._calibrate(table)
        return False

    def _train(self, table: VectorTable, nlist: int) -> None:
        alive = table.alive_slots()
        rng = np.random.default_rng(0)
        limit = max(TRAIN_SAMPLE, 50 * nlist)
        sample = rng.choice(alive, size=limit, replace=False) if len(alive) > limit else alive
        m = self.params.m or auto_m(self.dim)
        nbits = self.params.nbits or auto_nbits(len(sample))
        index = faiss.index_factory(
            self.dim, f"IVF{nlist},PQ{m}x{nbits}", _faiss_metric(self.metric)
        )
        index.do_polysemous_training = False  # the factory's default; slow, and unused here
        index.train(table.vectors_of(np.sort(sample)))
        index.add_with_ids(table.vectors_of(alive), alive)
        self._index = index
        self._state.update(nlist=nlist, m=m, nbits=nbits, trained_on=len(alive))

    def _calibrate(self, table: VectorTable) -> None:
        nlist = int(self._state["nlist"])
        efforts = [self.params.nprobe] if self.params.nprobe else effort_ladder(1, nlist)
        pools = [self.params.rerank] if self.params.rerank else [10, 20, 40, 80]
        cal = calibration_set(table)
        if cal is None:
            self._state.update(nprobe=efforts[-1], rerank=pools[-1], calibrated_at=len(table))
            return
        nprobe, rerank, recall = calibrate(
            table,
            cal,
            efforts,
            pools,
            lambda q, e, p: self._search(q, min(e, nlist), p * 10),
            self.params.target_recall,
        )
        self._state.update(
            nprobe=nprobe,
            rerank=rerank,
            calibrated_recall=round(recall, 4),
            calibrated_at=len(table),
        )

    def effective_params(self) -> dict[str, Any]:
        return {"train_threshold": self.params.train_threshold, **self._state}

    def memory_bytes(self) -> int:
        if self._index is None:
            return 0
        s = self._state
        codes = int(self._index.ntotal) * (int(self._index.code_size) + 8)
        centroids = int(s["nlist"]) * self.dim * 4
        codebooks = (1 << int(s["nbits"])) * self.dim * 4
        return codes + centroids + codebooks

    def dump(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        files = {} if self._index is None else {"ivfpq.faiss": _to_bytes(self._index)}
        return dict(self._state), files


# --- HNSW ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HnswParams:
    m: int = 32
    ef_construction: int = 64
    ef_search: int | None = None
    exact_below: int = 1_000
    rebuild_ratio: float = 0.25
    target_recall: float = 0.97

    def check(self, dim: int) -> None:
        kind = "hnsw"
        require(4 <= self.m <= 128, kind, "m is 4..128")
        require(8 <= self.ef_construction <= 2048, kind, "ef_construction is 8..2048")
        require(self.ef_search is None or 1 <= self.ef_search <= 8192, kind, "ef_search 1..8192")
        require(self.exact_below >= 0, kind, "exact_below is >= 0")
        require(0 < self.rebuild_ratio <= 1, kind, "rebuild_ratio is in (0, 1]")
        require(0 < self.target_recall <= 1, kind, "target_recall is in (0, 1]")


class HnswIndex:
    kind: ClassVar[IndexKind] = "hnsw"
    frees_on_remove = False

    def __init__(
        self,
        dim: int,
        metric: Metric,
        params: dict[str, Any],
        state: dict[str, Any] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        self.dim, self.metric = dim, metric
        self.params = parse_params(HnswParams, params, self.kind)
        self.params.check(dim)
        self._state: dict[str, Any] = {"tombstones": 0, "calibrated_at": 0, **(state or {})}
        self._labels = np.zeros(0, np.int64)
        if files and "hnsw.faiss" in files:
            self._index = _from_bytes(files["hnsw.faiss"])
            self._labels = np.load(io.BytesIO(files["hnsw_labels.npy"]), allow_pickle=False)
        else:
            self._index = self._new()
        self._index.hnsw.efConstruction = self.params.ef_construction

    def _new(self) -> Any:
        index = faiss.IndexHNSWFlat(self.dim, self.params.m, _faiss_metric(self.metric))
        index.hnsw.efConstruction = self.params.ef_construction
        return index

    @property
    def ready(self) -> bool:
        return bool(self._state.get("ready", False))

    def add(self, slots: Slots, vectors: Vectors) -> None:
        if len(slots):
            self._index.add(vectors)
            self._labels = np.concatenate([self._labels, slots.astype(np.int64)])

    def remove(self, slots: Slots) -> None:
        self._state["tombstones"] = int(self._state["tombstones"]) + len(slots)

    def candidates(self, query: Vectors, top_k: int) -> Slots:
        pool = 2 * max(top_k, 10)
        return self._search(query.reshape(1, -1), int(self._state["ef_search"]), pool)[0]

    def _search(self, queries: Vectors, ef: int, pool: int) -> list[Slots]:
        params = faiss.SearchParametersHNSW(efSearch=max(ef, pool))
        _, pos = self._index.search(queries, pool, params=params)
        pos = np.asarray(pos, dtype=np.int64)
        out = np.where(pos >= 0, self._labels[np.clip(pos, 0, None)], -1)
        return list(out)

    def maintain(self, table: VectorTable) -> bool:
        rebuilt = False
        total = len(self._labels)
        if total and int(self._state["tombstones"]) > self.params.rebuild_ratio * total:
            alive = table.alive_slots()
            index = self._new()
            if len(alive):
                index.add(table.vectors_of(alive))
            self._index, self._labels = index, alive
            self._state.update(tombstones=0, calibrated_at=0, rebuilds=self._rebuilds + 1)
            rebuilt = True
        n = len(table)
        self._state["ready"] = n >= max(1, self.params.exact_below)
        if self.ready and n >= 2 * int(self._state["calibrated_at"]):
            self._calibrate(table)
        return rebuilt

    @property
    def _rebuilds(self) -> int:
        return int(self._state.get("rebuilds", 0))

    def _calibrate(self, table: VectorTable) -> None:
        given = self.params.ef_search
        efforts = [given] if given else effort_ladder(16, 1024)
        cal = calibration_set(table)
        if cal is None:
            self._state.update(ef_search=efforts[-1], calibrated_at=len(table))
            return
        ef, _, recall = calibrate(
            table,
            cal,
            efforts,
            [2],
            lambda q, e, p: self._search(q, e, p * 10),
            self.params.target_recall,
        )
        self._state.update(
            ef_search=ef, calibrated_recall=round(recall, 4), calibrated_at=len(table)
        )

    def effective_params(self) -> dict[str, Any]:
        p = self.params
        fixed = {"m": p.m, "ef_construction": p.ef_construction, "exact_below": p.exact_below}
        return {**fixed, **self._state}

    def memory_bytes(self) -> int:
        hnsw = self._index.hnsw
        graph = int(hnsw.neighbors.size()) * 4 + int(hnsw.levels.size()) * 4
        graph += int(hnsw.offsets.size()) * 8
        return int(self._index.ntotal) * self.dim * 4 + graph + self._labels.nbytes

    def dump(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        labels = io.BytesIO()
        np.save(labels, self._labels, allow_pickle=False)
        files = {"hnsw.faiss": _to_bytes(self._index), "hnsw_labels.npy": labels.getvalue()}
        return dict(self._state), files
