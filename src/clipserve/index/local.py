"""The local vector store: one collection in one folder, an exact table plus an index.

Items live in a :class:`~clipserve.index.table.VectorTable` (vectors, ids, metadata: the
ground truth) and an approximate index (:mod:`~clipserve.index.faiss_index`,
:mod:`~clipserve.index.scann_index`, or none for ``flat``) proposes candidates that the table
re-scores exactly. A search falls back to an exact scan whenever the index is not ready
(untrained, too few items) or proposes fewer live candidates than asked; a filtered search
scans the matching items exactly unless the filter matches a large share of the collection,
and then too falls back when the index's candidates hold too few matches.

Persistence: ``save`` writes a new generation and commits it by replacing the manifest
atomically (see :mod:`~clipserve.index.snapshot`); ``open`` loads the last committed one.

Thread-safety: every method may be called from any thread (the server calls through a thread
executor). Each collection has its own readers-writer lock: ``search``, ``info`` and ``len``
share it, ``add``, ``delete`` and ``close`` hold it alone. ``save`` copies the state under the
shared lock, so searches go on while it writes, and writes outside the lock, one save at a
time. Training and rebuilds run inside the ``add``/``delete`` that makes them due.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from clipserve.errors import CollectionNotFoundError, IndexBackendError
from clipserve.index import snapshot as disk
from clipserve.index.ann import AnnIndex, FlatIndex
from clipserve.index.base import MAX_TOP_K, CollectionSpec, Hit, IndexKind, Metric, StoreInfo
from clipserve.index.filters import MetadataFilter, parse_filter
from clipserve.index.lock import ReadWriteLock
from clipserve.index.table import VectorTable
from clipserve.index.validation import (
    check_ids,
    check_metadata,
    check_query,
    check_spec,
    check_top_k,
    check_vectors,
)

log = logging.getLogger(__name__)

FILTER_ANN_MIN = 4_096
FILTER_ANN_SHARE = 0.2
"""A filter matching at least this many items and this share of the collection searches the
index (over-fetching by 1/share); narrower filters scan their matches exactly."""


def make_index(
    kind: IndexKind,
    dim: int,
    metric: Metric,
    params: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    files: Mapping[str, bytes] | None = None,
) -> AnnIndex:
    """The index of a local kind (parameters are validated here)."""
    state, files = dict(state or {}), dict(files or {})
    if kind == "flat":
        return FlatIndex(dim, metric, params)
    if kind in ("ivf-pq", "hnsw"):
        from clipserve.index.faiss_index import HnswIndex, IvfPqIndex

        cls = IvfPqIndex if kind == "ivf-pq" else HnswIndex
        return cls(dim, metric, dict(params), state, files)
    if kind == "scann":
        from clipserve.index.scann_index import ScannIndex

        return ScannIndex(dim, metric, dict(params), state, files)
    raise IndexBackendError(f"index kind '{kind}' is not a local index")


class LocalVectorStore:
    """Open with :meth:`open` (after :meth:`initialize` for a new collection)."""

    def __init__(
        self,
        directory: Path,
        spec: CollectionSpec,
        table: VectorTable,
        index: AnnIndex,
        *,
        generation: int,
        created_at: str,
    ) -> None:
        self._directory, self._spec = directory, spec
        self._table, self._index = table, index
        self._generation, self._created_at = generation, created_at
        self._lock = ReadWriteLock()
        self._save_lock = threading.Lock()
        self._version = self._saved_version = 0
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------

    @staticmethod
    def initialize(directory: Path, spec: CollectionSpec) -> None:
        """Write the manifest of a new, empty collection into ``directory`` (which exists)."""
        make_index(spec.index, spec.dim, spec.metric, spec.params)  # validates the params
        disk.write_json_atomic(directory / disk.MANIFEST, _manifest(spec, _now(), 0, 0))

    @classmethod
    def open(cls, directory: Path) -> LocalVectorStore:
        name = directory.name
        try:
            manifest = disk.read_json(directory / disk.MANIFEST)
            if manifest.get("format") != disk.FORMAT:
                raise ValueError(f"unknown format {manifest.get('format')!r}")
            spec = check_spec(
                manifest["name"],
                manifest["dim"],
                manifest["metric"],
                manifest["index"],
                manifest.get("model"),
                manifest.get("params") or {},
            )
            generation = int(manifest["generation"])
            table, index = cls._load(directory, spec, generation)
            if len(table) != int(manifest["size"]):
                raise ValueError(f"manifest says {manifest['size']} items, found {len(table)}")
        except IndexBackendError:
            raise
        except Exception as exc:
            log.exception("collection %s in %s cannot be loaded", name, directory)
            raise IndexBackendError(
                f"collection '{name}' cannot be loaded: {type(exc).__name__}: {exc}"
            ) from exc
        disk.remove_leftovers(directory, generation)
        return cls(
            directory,
            spec,
            table,
            index,
            generation=generation,
            created_at=str(manifest.get("created_at", "")),
        )

    @staticmethod
    def _load(
        directory: Path, spec: CollectionSpec, generation: int
    ) -> tuple[VectorTable, AnnIndex]:
        if generation == 0:
            return VectorTable(spec.dim, spec.metric), make_index(
                spec.index, spec.dim, spec.metric, spec.params
            )
        folder = disk.generation_dir(directory, generation)
        state = disk.read_json(folder / disk.STATE)
        snap = disk.read_table(folder, spec.dim, [int(s) for s in state["retired"]])
        table = VectorTable.restore(spec.dim, spec.metric, snap)
        index = make_index(
            spec.index,
            spec.dim,
            spec.metric,
            spec.params,
            state["index"],
            disk.read_files(folder),
        )
        return table, index

    def close(self) -> None:
        with self._save_lock, self._lock.write():
            self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise CollectionNotFoundError(self._spec.name)

    # --- the VectorStore contract ------------------------------------------------------------

    @property
    def spec(self) -> CollectionSpec:
        return self._spec

    @property
    def directory(self) -> Path:
        return self._directory

    def __len__(self) -> int:
        with self._lock.read():
            return len(self._table)

    def add(
        self,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        spec = self._spec
        ids = check_ids(ids)
        if not ids:
            return
        matrix = check_vectors(vectors, len(ids), spec.dim, spec.metric, spec.name)
        meta = check_metadata(metadata, len(ids))
        with self._lock.write():
            self._check_open()
            self._forget(ids)
            slots = self._table.insert(ids, matrix, meta)
            self._index.add(slots, matrix)
            self._maintain()
            self._version += 1

    def delete(self, ids: Sequence[str]) -> int:
        ids = check_ids(list(dict.fromkeys(ids)) if not isinstance(ids, str) else ids)
        with self._lock.write():
            self._check_open()
            removed = self._forget(ids)
            if removed:
                self._maintain()
                self._version += 1
            return removed

    def _forget(self, ids: Sequence[str]) -> int:
        slots = self._table.remove(ids)
        if len(slots):
            self._index.remove(slots)
            if self._index.frees_on_remove:
                self._table.release(slots.tolist())
        return len(slots)

    def _maintain(self) -> None:
        try:
            rebuilt = self._index.maintain(self._table)
        except Exception:
            # the table stays exact and complete: searches fall back to scanning it
            log.exception("index maintenance of collection %s failed", self._spec.name)
            return
        if rebuilt:
            self._table.release()

    def search(
        self,
        query: npt.ArrayLike,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        spec = self._spec
        q = check_query(query, spec.dim, spec.metric, spec.name)
        flt = parse_filter(filter)
        with self._lock.read():
            self._check_open()
            check_top_k(top_k, len(self._table), spec.name)
            return self._search(q, top_k, flt)

    def _search(
        self, q: npt.NDArray[np.float32], top_k: int, flt: MetadataFilter | None
    ) -> list[Hit]:
        table, n = self._table, len(self._table)
        if flt is None:
            hits = self._approximate(q, top_k, top_k, None) if self._index.ready else None
            return hits if hits is not None else table.exact(q, top_k)
        matching = table.matching(flt)
        want = min(top_k, len(matching))
        if want == 0:
            return []
        if self._index.ready and len(matching) >= max(FILTER_ANN_MIN, FILTER_ANN_SHARE * n):
            allowed = np.zeros(table.n_slots, bool)
            allowed[matching] = True
            fetch = min(n, MAX_TOP_K, math.ceil(2 * top_k * n / len(matching)))
            hits = self._approximate(q, want, fetch, allowed)
            if hits is not None:
                return hits
        return table.exact(q, want, matching)

    def _approximate(
        self,
        q: npt.NDArray[np.float32],
        top_k: int,
        fetch: int,
        allowed: npt.NDArray[np.bool_] | None,
    ) -> list[Hit] | None:
        """Re-ranked index candidates, or None when fewer than ``top_k`` usable came back."""
        cands = self._index.candidates(q, fetch)
        cands = np.unique(cands[cands >= 0])
        cands = cands[self._table.is_alive(cands)]
        if allowed is not None:
            cands = cands[allowed[cands]]
        if len(cands) < top_k:
            return None
        return self._table.rank(q, cands, top_k)

    def info(self) -> StoreInfo:
        with self._lock.read():
            self._check_open()
            spec, index = self._spec, self._index
            return StoreInfo(
                name=spec.name,
                size=len(self._table),
                dim=spec.dim,
                metric=spec.metric,
                index=spec.index,
                model=spec.model,
                trained=spec.index == "flat" or index.ready,
                memory_bytes=self._table.nbytes() + index.memory_bytes(),
                params=index.effective_params(),
            )

    def save(self) -> None:
        with self._save_lock:
            with self._lock.read():
                self._check_open()
                if self._version == self._saved_version:
                    return
                version, size = self._version, len(self._table)
                table = self._table.snapshot()
                state, files = self._index.dump()
            number = self._generation + 1

            def write(folder: Path) -> None:
                disk.write_table(folder, table)
                disk.write_files(folder, files)
                with (folder / disk.STATE).open("w", encoding="utf-8") as f:
                    json.dump({"retired": table.retired, "index": state}, f)

            try:
                disk.write_generation(self._directory, number, write)
                manifest = _manifest(self._spec, self._created_at, number, size)
                disk.write_json_atomic(self._directory / disk.MANIFEST, manifest)
            except OSError as exc:
                log.exception("saving collection %s failed", self._spec.name)
                raise IndexBackendError(
                    f"collection '{self._spec.name}' could not be saved: {exc.strerror or exc}"
                ) from exc
            self._generation, self._saved_version = number, version
            disk.remove_leftovers(self._directory, number)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _manifest(spec: CollectionSpec, created_at: str, generation: int, size: int) -> dict[str, Any]:
    return {
        "format": disk.FORMAT,
        "name": spec.name,
        "dim": spec.dim,
        "metric": spec.metric,
        "index": spec.index,
        "model": spec.model,
        "params": dict(spec.params),
        "created_at": created_at,
        "generation": generation,
        "size": size,
    }
