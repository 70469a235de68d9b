"""The approximate-index contract the local store builds on, and what the kinds share.

An :class:`AnnIndex` knows items only by slot (see :mod:`clipserve.index.table`) and only
proposes *candidates*: the store re-scores them exactly from the table, so an index's own
scores (PQ codes, ScaNN's hashes) never reach a client, and recall is limited only by whether
the true neighbours are among the candidates.

Search effort (IVF ``nprobe``, HNSW ``efSearch``, ScaNN ``leaves_to_search``) is *calibrated*
from the data unless given: after a (re)build, and again whenever the collection has doubled,
the index searches ``CALIBRATION_QUERIES`` of its own items (each item's exact neighbours,
itself excluded, are the ground truth) with growing effort and keeps the first effort whose
recall@10 reaches ``target_recall``. Random high-dimensional data needs far more effort than
clustered embeddings; calibration finds out instead of guessing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Protocol, TypeVar, get_type_hints

import numpy as np

from clipserve.errors import InvalidInputError, quote
from clipserve.index.base import IndexKind, Metric, Vectors
from clipserve.index.table import Slots, VectorTable

CALIBRATION_QUERIES = 100
CALIBRATION_K = 10


class AnnIndex(Protocol):
    kind: ClassVar[IndexKind]

    @property
    def ready(self) -> bool:
        """True when ``candidates`` can answer; the store scans exactly until then."""
        ...

    @property
    def frees_on_remove(self) -> bool:
        """True when ``remove`` really forgets slots (they may be reused at once); False when it
        only tombstones them until the next rebuild."""
        ...

    def add(self, slots: Slots, vectors: Vectors) -> None: ...

    def remove(self, slots: Slots) -> None: ...

    def candidates(self, query: Vectors, top_k: int) -> Slots:
        """Slots likely to hold the ``top_k`` best for ``query`` (more than ``top_k``; may hold
        removed slots and -1)."""
        ...

    def maintain(self, table: VectorTable) -> bool:
        """Train, rebuild or re-calibrate when due (called after each change). Returns True when
        it rebuilt from the table, so no tombstoned slot is referenced any more."""
        ...

    def effective_params(self) -> dict[str, Any]: ...

    def memory_bytes(self) -> int: ...

    def dump(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        """JSON-able state and the files (name -> bytes) that ``load`` needs."""
        ...


class FlatIndex:
    """Exact search: the table *is* the index (a BLAS scan; nothing to train or build)."""

    kind: ClassVar[IndexKind] = "flat"
    ready = False
    frees_on_remove = True

    def __init__(
        self,
        dim: int,
        metric: Metric,
        params: Mapping[str, Any],
        state: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        parse_params(FlatParams, params, "flat")

    def add(self, slots: Slots, vectors: Vectors) -> None:
        return None

    def remove(self, slots: Slots) -> None:
        return None

    def candidates(self, query: Vectors, top_k: int) -> Slots:
        return np.zeros(0, np.int64)

    def maintain(self, table: VectorTable) -> bool:
        return False

    def effective_params(self) -> dict[str, Any]:
        return {}

    def memory_bytes(self) -> int:
        return 0

    def dump(self) -> tuple[dict[str, Any], dict[str, bytes]]:
        return {}, {}


@dataclass(frozen=True, slots=True)
class FlatParams:
    pass


# --- parameters ------------------------------------------------------------------------------

P = TypeVar("P")


def parse_params(cls: type[P], raw: Mapping[str, Any], kind: str) -> P:
    """Build a params dataclass from client input: unknown keys and wrong types are errors
    (ranges are checked by the dataclass' ``__post_init__``)."""
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        shown = ", ".join(quote(str(u), 40) for u in unknown[:5])
        raise InvalidInputError(
            f"unknown {kind} parameter(s) {shown}; known: {', '.join(known) or '(none)'}"
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        hint = hints[name]
        optional = value is None and type(None) in getattr(hint, "__args__", ())
        if optional:
            values[name] = None
        elif hint is str:
            if not isinstance(value, str) or not 0 < len(value) <= 64:
                raise InvalidInputError(f"{kind} parameter {name} must be a short string")
            values[name] = value
        elif int in (hint, *getattr(hint, "__args__", ())) and hint is not float:
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInputError(f"{kind} parameter {name} must be an integer")
            values[name] = value
        else:
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise InvalidInputError(f"{kind} parameter {name} must be a number")
            if not math.isfinite(value):
                raise InvalidInputError(f"{kind} parameter {name} must be finite")
            values[name] = float(value)
    return cls(**values)


def require(ok: bool, kind: str, message: str) -> None:
    if not ok:
        raise InvalidInputError(f"{kind} parameter {message}")


# --- calibration -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    """Items used as queries, and each one's exact neighbours (itself excluded)."""

    slots: Slots
    queries: Vectors
    truth: list[set[int]]


def calibration_set(table: VectorTable, seed: int = 0) -> CalibrationSet | None:
    """None when the table is too small to calibrate on."""
    alive = table.alive_slots()
    if len(alive) < 4 * CALIBRATION_K:
        return None
    rng = np.random.default_rng(seed)
    picked = rng.choice(alive, size=min(CALIBRATION_QUERIES, len(alive)), replace=False)
    queries = table.vectors_of(picked)
    top = table.exact_batch(queries, CALIBRATION_K + 1)
    truth = [
        {s for s in row.tolist() if s >= 0 and s != own}
        if own in row
        else {s for s in row.tolist()[:CALIBRATION_K] if s >= 0}
        for row, own in zip(top, picked.tolist(), strict=True)
    ]
    return CalibrationSet(picked.astype(np.int64), queries, truth)


def measure_recall(
    table: VectorTable, cal: CalibrationSet, propose: Callable[[Vectors], list[Slots]]
) -> float:
    """Recall@10 of ``propose`` (candidates per query) after exact re-ranking."""
    total = 0.0
    for own, query, truth, cands in zip(
        cal.slots, cal.queries, cal.truth, propose(cal.queries), strict=True
    ):
        cands = np.unique(cands[(cands >= 0) & (cands != own)])
        cands = cands[table.is_alive(cands)]
        best, _ = table.best(query, cands, CALIBRATION_K)
        found = set(best.tolist())
        total += len(found & truth) / max(1, len(truth))
    return total / len(cal.truth)


def calibrate(
    table: VectorTable,
    cal: CalibrationSet,
    efforts: list[int],
    pools: list[int],
    propose: Callable[[Vectors, int, int], list[Slots]],
    target: float,
) -> tuple[int, int, float]:
    """Pick ``(effort, pool, recall)``: first the smallest candidate pool (a multiple of k)
    that reaches ``target`` at the largest effort (what the codes can do at all), then the
    smallest effort that reaches it with that pool. Falls back to the largest of each."""
    pool = pools[-1]
    for candidate in pools:
        pool = candidate
        if measure_recall(table, cal, _fixed(propose, efforts[-1], pool)) >= target:
            break
    recall = 0.0
    for effort in efforts:
        recall = measure_recall(table, cal, _fixed(propose, effort, pool))
        if recall >= target:
            return effort, pool, recall
    return efforts[-1], pool, recall


def _fixed(
    propose: Callable[[Vectors, int, int], list[Slots]], effort: int, pool: int
) -> Callable[[Vectors], list[Slots]]:
    return lambda queries: propose(queries, effort, pool)


def effort_ladder(low: int, high: int, step: float = 1.4) -> list[int]:
    """Growing efforts from ``low`` to ``high`` (both included)."""
    out: list[int] = []
    value = float(max(1, low))
    while value < high:
        if not out or int(value) > out[-1]:
            out.append(int(value))
        value *= step
    out.append(high)
    return out
