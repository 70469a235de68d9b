"""The raw side of a local collection: vectors, external ids and metadata, by slot.

Every item lives in a *slot* (a row of one float32 matrix); approximate indexes know items only
by slot number, so slots stay stable while the item lives. A slot goes through three states:

- **alive**: holds an item;
- **retired**: its item was deleted, but an approximate index may still return the slot
  (HNSW and ScaNN delete by tombstone) - it is never reused until that index is rebuilt;
- **free**: reusable by the next insert.

The table is the exact ground truth: every search result is re-scored here, filters are
applied here, and an exact scan here is the fallback of every index. It is not thread-safe;
the store's lock guards it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from clipserve.index.base import Hit, Metric, Vectors
from clipserve.index.filters import MetadataFilter

Slots = npt.NDArray[np.int64]

_CHUNK = 32_768
"""Rows scored at once by batched exact scans (bounds the score matrix)."""


@dataclass(frozen=True, slots=True)
class TableSnapshot:
    """A copy of a table's state, taken under the lock and written out without it."""

    vectors: Vectors
    items: list[tuple[int, str, dict[str, Any]]]
    retired: list[int]


class VectorTable:
    def __init__(self, dim: int, metric: Metric) -> None:
        self.dim = dim
        self.metric: Metric = metric
        self._vectors: Vectors = np.zeros((0, dim), np.float32)
        self._sqnorms = np.zeros(0, np.float32)
        self._alive = np.zeros(0, bool)
        self._ids: list[str | None] = []
        self._metadata: list[dict[str, Any] | None] = []
        self._slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._retired: set[int] = set()

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._slot_of

    @property
    def n_slots(self) -> int:
        return len(self._ids)

    @property
    def retired_count(self) -> int:
        return len(self._retired)

    def slots_of(self, ids: Iterable[str]) -> Slots:
        """Slots of the ids that exist (unknown ids are skipped)."""
        found = [self._slot_of[i] for i in ids if i in self._slot_of]
        return np.asarray(found, dtype=np.int64)

    def alive_slots(self) -> Slots:
        return np.flatnonzero(self._alive).astype(np.int64)

    def is_alive(self, slots: Slots) -> npt.NDArray[np.bool_]:
        ok = (slots >= 0) & (slots < self.n_slots)
        out = np.zeros(len(slots), bool)
        out[ok] = self._alive[slots[ok]]
        return out

    def vectors_of(self, slots: Slots) -> Vectors:
        return self._vectors[slots]

    # --- mutation ----------------------------------------------------------------------------

    def insert(self, ids: Sequence[str], vectors: Vectors, metadata: list[dict[str, Any]]) -> Slots:
        """Store new items (their ids must not exist) and return their slots."""
        n = len(ids)
        reuse = [self._free.pop() for _ in range(min(n, len(self._free)))]
        fresh = n - len(reuse)
        start = self.n_slots
        self._grow(start + fresh)
        slots = np.asarray(reuse + list(range(start, start + fresh)), dtype=np.int64)
        self._ids.extend([None] * fresh)
        self._metadata.extend([None] * fresh)
        self._vectors[slots] = vectors
        self._sqnorms[slots] = np.einsum("ij,ij->i", vectors, vectors)
        self._alive[slots] = True
        for slot, item_id, meta in zip(slots.tolist(), ids, metadata, strict=True):
            self._ids[slot] = item_id
            self._metadata[slot] = meta
            self._slot_of[item_id] = slot
        return slots

    def _grow(self, rows: int) -> None:
        capacity = len(self._vectors)
        if rows <= capacity:
            return
        new = max(rows, capacity + capacity // 2, 1024)
        vectors = np.zeros((new, self.dim), np.float32)
        vectors[:capacity] = self._vectors
        self._vectors = vectors
        self._sqnorms = np.concatenate([self._sqnorms, np.zeros(new - capacity, np.float32)])
        self._alive = np.concatenate([self._alive, np.zeros(new - capacity, bool)])

    def remove(self, ids: Iterable[str]) -> Slots:
        """Delete these ids (unknown ones are skipped); their slots become retired."""
        slots = []
        for item_id in ids:
            slot = self._slot_of.pop(item_id, None)
            if slot is None:
                continue
            self._ids[slot] = None
            self._metadata[slot] = None
            self._alive[slot] = False
            self._vectors[slot] = 0.0
            self._retired.add(slot)
            slots.append(slot)
        return np.asarray(slots, dtype=np.int64)

    def release(self, slots: Iterable[int] | None = None) -> None:
        """Retired slots (all of them when None) that no index references any more."""
        freed = set(self._retired) if slots is None else self._retired.intersection(slots)
        self._retired -= freed
        self._free.extend(sorted(freed, reverse=True))

    # --- search ------------------------------------------------------------------------------

    def scores(self, query: Vectors, slots: Slots) -> npt.NDArray[np.float64]:
        """Exact public scores (similarity, or Euclidean distance for l2) of these slots."""
        rows = self._vectors[slots].astype(np.float64)
        if self.metric == "l2":
            diff = rows - query.astype(np.float64)
            return np.sqrt(np.asarray(np.einsum("ij,ij->i", diff, diff), dtype=np.float64))
        return np.asarray(rows @ query.astype(np.float64), dtype=np.float64)

    def rank(self, query: Vectors, slots: Slots, k: int) -> list[Hit]:
        """The k best of these (alive, distinct) slots, exactly scored, best first."""
        best, scores = self.best(query, slots, k)
        return [self._hit(s, sc) for s, sc in zip(best.tolist(), scores.tolist(), strict=True)]

    def best(self, query: Vectors, slots: Slots, k: int) -> tuple[Slots, npt.NDArray[np.float64]]:
        """``rank`` as arrays: the k best slots and their public scores."""
        if len(slots) == 0:
            return slots, np.zeros(0)
        scores = self.scores(query, slots)
        key = scores if self.metric == "l2" else -scores
        order = np.lexsort((slots, key))[:k]
        return slots[order], scores[order]

    def exact(self, query: Vectors, k: int, slots: Slots | None = None) -> list[Hit]:
        """Exact top-k over all alive items, or over ``slots`` (alive ones) when given."""
        if slots is None:
            n = self.n_slots
            key = self._key_all(query, n)
            key[~self._alive[:n]] = np.inf
            candidates = np.flatnonzero(np.isfinite(key))
        else:
            candidates = slots[self.is_alive(slots)]
            key = np.full(self.n_slots, np.inf)
            key[candidates] = self._key(query.reshape(1, -1), candidates)[0]
        if len(candidates) == 0:
            return []
        # a cheap pass picks a margin of candidates; rank() re-scores them exactly
        keep = min(len(candidates), 2 * k + 16)
        part = candidates[np.argpartition(key[candidates], keep - 1)[:keep]]
        return self.rank(query, part.astype(np.int64), k)

    def exact_batch(self, queries: Vectors, k: int) -> Slots:
        """Exact top-k slots of many queries at once (chunked gemm), ``(len(queries), k)``."""
        best_key = np.full((len(queries), k), np.inf, np.float32)
        best_slot = np.full((len(queries), k), -1, np.int64)
        for start in range(0, self.n_slots, _CHUNK):
            stop = min(start + _CHUNK, self.n_slots)
            chunk = np.arange(start, stop, dtype=np.int64)
            key = queries @ self._vectors[start:stop].T
            key = self._sqnorms[start:stop][None, :] - 2.0 * key if self.metric == "l2" else -key
            key[:, ~self._alive[chunk]] = np.inf
            both_key = np.concatenate([best_key, key], axis=1)
            both_slot = np.concatenate([best_slot, np.broadcast_to(chunk, key.shape)], axis=1)
            top = np.argpartition(both_key, k - 1, axis=1)[:, :k]
            best_key = np.take_along_axis(both_key, top, axis=1)
            best_slot = np.take_along_axis(both_slot, top, axis=1)
        best_slot[~np.isfinite(best_key)] = -1
        order = np.argsort(best_key, axis=1, kind="stable")
        return np.take_along_axis(best_slot, order, axis=1)

    def _key_all(self, query: Vectors, n: int) -> npt.NDArray[np.float32]:
        """``_key`` of one query over slots ``0..n-1``, without copying the matrix."""
        dots = self._vectors[:n] @ query
        if self.metric == "l2":
            return np.asarray(self._sqnorms[:n] - 2.0 * dots, dtype=np.float32)
        return np.asarray(-dots, dtype=np.float32)

    def _key(self, queries: Vectors, slots: Slots) -> npt.NDArray[np.float32]:
        """Sort keys (lower is better) of ``slots`` for each query, in float32."""
        dots = queries @ self._vectors[slots].T
        if self.metric == "l2":
            return self._sqnorms[slots][None, :] - 2.0 * dots
        return -dots

    def matching(self, flt: MetadataFilter) -> Slots:
        """Slots of the alive items whose metadata passes the filter (a linear scan)."""
        if flt.matches_nothing:
            return np.zeros(0, np.int64)
        found = [
            slot
            for slot, meta in enumerate(self._metadata)
            if meta is not None and flt.matches(meta)
        ]
        return np.asarray(found, dtype=np.int64)

    def _hit(self, slot: int, score: float) -> Hit:
        item_id, meta = self._ids[slot], self._metadata[slot]
        assert item_id is not None
        assert meta is not None
        return Hit(item_id, score, dict(meta))

    # --- size and persistence ----------------------------------------------------------------

    def nbytes(self) -> int:
        """Vectors and bookkeeping, plus a rough 200 bytes per item for ids and metadata."""
        arrays = self._vectors.nbytes + self._sqnorms.nbytes + self._alive.nbytes
        return int(arrays + 200 * len(self))

    def snapshot(self) -> TableSnapshot:
        items = [
            (slot, item_id, meta)
            for slot, (item_id, meta) in enumerate(zip(self._ids, self._metadata, strict=True))
            if item_id is not None and meta is not None
        ]
        return TableSnapshot(self._vectors[: self.n_slots].copy(), items, sorted(self._retired))

    @classmethod
    def restore(cls, dim: int, metric: Metric, snap: TableSnapshot) -> VectorTable:
        table = cls(dim, metric)
        n = len(snap.vectors)
        table._grow(n)
        table._vectors[:n] = snap.vectors
        table._sqnorms[:n] = np.einsum("ij,ij->i", snap.vectors, snap.vectors)
        table._ids = [None] * n
        table._metadata = [None] * n
        for slot, item_id, meta in snap.items:
            table._ids[slot] = item_id
            table._metadata[slot] = meta
            table._slot_of[item_id] = slot
            table._alive[slot] = True
        table._retired = set(snap.retired)
        used = table._retired.union(table._slot_of.values())
        table._free = [s for s in range(n - 1, -1, -1) if s not in used]
        return table
