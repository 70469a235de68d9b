"""Summary statistics of a scoring job: score distribution per model and agreement between models.

Pure numpy (no scipy): Pearson is the correlation of the scores, Spearman the Pearson correlation
of their ranks (ties get the average rank). ``std`` is the sample standard deviation (n - 1).
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class ScoreStats:
    model: str
    count: int
    succeeded: int
    failed: int
    mean: float | None = None
    median: float | None = None
    std: float | None = None
    """Sample standard deviation; None with fewer than two scores."""
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True, slots=True)
class Correlation:
    first: str
    second: str
    n: int
    """Rows where both models produced a score."""
    pearson: float | None
    spearman: float | None
    """None with fewer than two rows, or when either side is constant."""


@dataclass(frozen=True, slots=True)
class JobSummary:
    rows: int
    models: tuple[ScoreStats, ...]
    correlations: tuple[Correlation, ...] = ()
    elapsed_s: float = 0.0
    top_errors: tuple[tuple[str, int], ...] = ()
    """The most frequent per-row error messages with their counts."""

    @property
    def any_scored(self) -> bool:
        """True unless there were rows and not one of them got a score (from any model)."""
        return self.rows == 0 or any(s.succeeded for s in self.models)


def describe_scores(model: str, scores: Sequence[float | None] | np.ndarray) -> ScoreStats:
    """Count, successes and the distribution of one model's scores (None/NaN = failed row)."""
    values = np.asarray([np.nan if s is None else s for s in scores], dtype=np.float64)
    ok = values[~np.isnan(values)]
    if not len(ok):
        return ScoreStats(model, len(values), 0, len(values))
    return ScoreStats(
        model=model,
        count=len(values),
        succeeded=len(ok),
        failed=len(values) - len(ok),
        mean=float(ok.mean()),
        median=float(np.median(ok)),
        std=float(ok.std(ddof=1)) if len(ok) > 1 else None,
        min=float(ok.min()),
        max=float(ok.max()),
    )


def rank(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the average of their ranks."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"pearson: {len(a)} values against {len(b)}")
    if len(a) < 2:
        return None
    da, db = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(da @ da) * float(db @ db))
    if denominator == 0:
        return None
    return max(-1.0, min(1.0, float(da @ db) / denominator))


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    return pearson(rank(x), rank(y))


def correlate(first: str, second: str, x: np.ndarray, y: np.ndarray) -> Correlation:
    """Correlations over the rows where neither side is NaN (a failed row)."""
    both = ~(np.isnan(x) | np.isnan(y))
    a, b = x[both], y[both]
    return Correlation(first, second, int(both.sum()), pearson(a, b), spearman(a, b))


class SummaryBuilder:
    """Collects one score (or None) per row and model; memory is 8 bytes per row and model."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self._scores = {label: array("d") for label in self.labels}
        self.rows = 0

    def add_row(self, scores: Sequence[float | None]) -> None:
        if len(scores) != len(self.labels):
            raise ValueError(f"expected {len(self.labels)} scores, got {len(scores)}")
        self.rows += 1
        for label, score in zip(self.labels, scores, strict=True):
            self._scores[label].append(math.nan if score is None else score)

    def build(
        self, elapsed_s: float = 0.0, top_errors: Sequence[tuple[str, int]] = ()
    ) -> JobSummary:
        columns = {label: np.frombuffer(self._scores[label]) for label in self.labels}
        return JobSummary(
            rows=self.rows,
            models=tuple(describe_scores(label, columns[label]) for label in self.labels),
            correlations=tuple(
                correlate(a, b, columns[a], columns[b])
                for a, b in itertools.combinations(self.labels, 2)
            ),
            elapsed_s=elapsed_s,
            top_errors=tuple(top_errors),
        )
