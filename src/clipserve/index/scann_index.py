"""ScaNN approximate index (``scann``, Google's tree + anisotropic-hashing search).

``scann`` is an optional dependency: without it, creating or loading a ``scann`` collection
raises :class:`~clipserve.errors.IndexBackendError` ("scann is not installed").

A ScaNN searcher is built from a fixed data set, so this index keeps three parts:

- the **built** searcher: a k-means tree of ``num_leaves`` (``sqrt(n)``) leaves with asymmetric
  hashing (AH) codes; no float copy of the data (the store re-ranks from its table);
- a **delta** of items added since the build, searched exactly;
- **tombstones**: built items deleted (or replaced) since the build, filtered out of
  candidates.

The collection answers by exact scan until it holds ``exact_below`` items; then the searcher
is built, and rebuilt from the live items when the delta exceeds ``delta_ratio`` of the built
size or tombstones exceed ``rebuild_ratio`` of it (the ``add``/``delete`` that triggers a
rebuild takes as long as a build). ``leaves_to_search`` and the re-ranking pool are calibrated
(see :mod:`clipserve.index.ann`).
"""

from __future__ import annotations

import io
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from clipserve.errors import IndexBackendError
from clipserve.index.ann import calibrate, calibration_set, effort_ladder, parse_params, require
from clipserve.index.base import IndexKind, Metric, Vectors
from clipserve.index.table import Slots, VectorTable


def scann_module() -> Any:
    """The ``scann`` package, or IndexBackendError when it is missing."""
    try:
        import scann
    except ImportError as exc:
        raise IndexBackendError(
            "scann is not installed: install the 'scann' package to use index 'scann'"
        ) from exc
    return scann


@dataclass(frozen=True, slots=True)
class ScannParams:
    num_leaves: int | None = None
    leaves_to_search: int | None = None
    rerank: int | None = None
    """Candidates re-ranked exactly, as a multiple of max(top_k, 10); None calibrates it."""
    exact_below: int = 2_000
    delta_ratio: float = 0.5
    rebuild_ratio: float = 0.25
    target_recall: float = 0.97

    def check(self, dim: int) -> None:
        kind = "scann"
        require(self.num_leaves is None or self.num_leaves >= 2, kind, "num_leaves is >= 2")
        require(
            self.leaves_to_search is None or self.leaves_to_search >= 1,
            kind,
            "leaves_to_search is >= 1",
        )
        require(self.rerank is None or 1 <= self.rerank <= 100, kind, "rerank is 1..100")
        require(self.exact_below >= 0, kind, "exact_below is >= 0")
        require(0 < self.delta_ratio <= 10, kind, "delta_ratio is in (0, 10]")
        require(0 < self.rebuild_ratio <= 1, kind, "rebuild_ratio is in (0, 1]")
        require(0 < self.target_recall <= 1, kind, "target_recall is in (0, 1]")


MIN_BUILD = 64
"""Fewer live items than this never get a searcher, whatever exact_below says."""


class ScannIndex:
    kind: ClassVar[IndexKind] = "scann"

    def __init__(
        self,
        dim: int,
        metric: Metric,
        params: dict[str, Any],
        state: dict[str, Any] | None = None,
        files: dict[str, bytes] | None = None,
    ) -> None:
        self._scann = scann_module()
        self.dim, self.metric = dim, metric
        self.params = parse_params(ScannParams, params, self.kind)
        self.params.check(dim)
        self._state: dict[str, Any] = {"tombstones": 0, "built_n": 0, **(state or {})}
        self._searcher: Any = None
        self._pos_slots = np.zeros(0, np.int64)
        self._delta_slots = np.zeros(0, np.int64)
        self._delta = np.zeros((0, dim), np.float32)
        if files and "scann_pos_slots.npy" in files:
            self._pos_slots = _load_npy(files["scann_pos_slots.npy"])
            self._delta_slots = _load_npy(files["scann_delta_slots.npy"])
            self._delta = _load_npy(files["scann_delta.npy"]).astype(np.float32)
            self._searcher = self._load_searcher(files)

    @property
    def ready(self) -> bool:
        return self._searcher is not None

    @property
    def frees_on_remove(self) -> bool:
        return self._searcher is None

    def add(self, slots: Slots, vectors: Vectors) -> None:
        if self._searcher is not None and len(slots):
            self._delta_slots = np.concatenate([self._delta_slots, slots.astype(np.int64)])
            self._delta = np.concatenate([self._delta, vectors])

    def remove(self, slots: Slots) -> None:
        if self._searcher is None or not len(slots):
            return
        in_delta = np.isin(self._delta_slots, slots)
        self._delta_slots, self._delta = self._delta_slots[~in_delta], self._delta[~in_delta]
        built = len(slots) - int(in_delta.sum())
        self._state["tombstones"] = int(self._state["tombstones"]) + built

    def candidates(self, query: Vectors, top_k: int) -> Slots:
        pool = int(self._state["rerank"]) * max(top_k, 10)
        built = self._search(query.reshape(1, -1), int(self._state["leaves_to_search"]), pool)
        return np.concatenate([built[0], self._delta_top(query, pool)])

    def _search(self, queries: Vectors, leaves: int, pool: int) -> list[Slots]:
        pool = min(pool, len(self._pos_slots))
        leaves = min(leaves, int(self._state["num_leaves"]))
        pos, _ = self._searcher.search_batched(
            queries, final_num_neighbors=pool, leaves_to_search=leaves
        )
        return list(self._pos_slots[np.asarray(pos, dtype=np.int64)])

    def _delta_top(self, query: Vectors, pool: int) -> Slots:
        if len(self._delta_slots) <= pool:
            return self._delta_slots
        dots = self._delta @ query
        if self.metric == "l2":
            key = np.einsum("ij,ij->i", self._delta, self._delta) - 2 * dots
        else:
            key = -dots
        return self._delta_slots[np.argpartition(key, pool - 1)[:pool]]

    def maintain(self, table: VectorTable) -> bool:
        n = len(table)
        built_n = int(self._state["built_n"])
        if self._searcher is None:
            due = n >= max(MIN_BUILD, self.params.exact_below)
        else:
            due = (
                len(self._delta_slots) > self.params.delta_ratio * built_n
                or int(self._state["tombstones"]) > self.params.rebuild_ratio * built_n
            ) and n >= MIN_BUILD
        if not due:
            return False
        self._build(table)
        return True

    def _build(self, table: VectorTable) -> None:
        alive = table.alive_slots()
        data = table.vectors_of(alive)
        n = len(alive)
        leaves = min(self.params.num_leaves or max(8, int(math.sqrt(n))), max(2, n // 8))
        measure = "squared_l2" if self.metric == "l2" else "dot_product"
        threshold = float("nan") if self.metric == "l2" else 0.2
        searcher = (
            self._scann.scann_ops_pybind.builder(data, 10, measure)
            .tree(
                num_leaves=leaves,
                num_leaves_to_search=max(1, leaves // 4),
                training_sample_size=min(n, max(250 * leaves, 20_000)),
            )
            .score_ah(2 if self.dim % 2 == 0 else 1, anisotropic_quantization_threshold=threshold)
            .build()
        )
        self._searcher, self._pos_slots = searcher, alive
        self._delta_slots = np.zeros(0, np.int64)
        self._delta = np.zeros((0, self.dim), np.float32)
        rebuilds = int(self._state.get("rebuilds", -1)) + 1
        self._state.update(built_n=n, num_leaves=leaves, tombstones=0, rebuilds=rebuilds)
        self._calibrate(table)

    def _calibrate(self, table: VectorTable) -> None:
        leaves = int(self._state["num_leaves"])
        given = self.params.leaves_to_search
        efforts = [given] if given else effort_ladder(1, leaves)
        pools = [self.params.rerank] if self.params.rerank else [10, 20, 40, 80]
        cal = calibration_set(table)
        if cal is None:
            self._state.update(leaves_to_search=efforts[-1], rerank=pools[-1])
            return
        effort, pool, recall = calibrate(
            table,
            cal,
            efforts,
            pools,
            lambda q, e, p: self._search(q, e, p * 10),
            self.params.target_recall,
        )
        self._state.update(leaves_to_search=effort, rerank=pool, calibrated_recall=round(recall, 4))

    def effective_params(self) -> dict[str, Any]:
        return {"exact_below": self.params.exact_below, **self._state}

    def memory_bytes(self) -> int:
        """Estimated: 4-bit AH codes per 2 dims, tokens, tree centres, delta and slot maps."""
        if self._searcher is None:
            return 0
        built = len(self._pos_slots)
        codes = built * (math.ceil(self.dim / 2 / 2) + 4 + 8)
        centres = int(self._state["num_leaves"]) * self.dim * 4
        return codes + centres + self._delta.nbytes + self._delta_slots.nbytes

    def dump(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        if self._searcher is None:
            return dict(self._state), {}
        files = {
            "scann_pos_slots.npy": _npy(self._pos_slots),
            "scann_delta_slots.npy": _npy(self._delta_slots),
            "scann_delta.npy": _npy(self._delta),
        }
        with tempfile.TemporaryDirectory(prefix="clipserve-scann-") as tmp:
            self._searcher.serialize(tmp, relative_path=True)
            for path in sorted(Path(tmp).iterdir()):
                files[f"scann.{path.name}"] = path.read_bytes()
        return dict(self._state), files

    def _load_searcher(self, files: dict[str, bytes]) -> Any:
        tmp = Path(tempfile.mkdtemp(prefix="clipserve-scann-"))
        try:
            for name, blob in files.items():
                if name.startswith("scann."):
                    (tmp / name.removeprefix("scann.")).write_bytes(blob)
            return self._scann.scann_ops_pybind.load_searcher(str(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _load_npy(blob: bytes) -> np.ndarray[Any, Any]:
    return np.asarray(np.load(io.BytesIO(blob), allow_pickle=False))
