"""What the approximate kinds share: parameters, effort ladders, calibration."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from clipserve.errors import InvalidInputError
from clipserve.index.ann import (
    FlatIndex,
    calibrate,
    calibration_set,
    effort_ladder,
    measure_recall,
    parse_params,
)
from clipserve.index.base import Vectors
from clipserve.index.table import Slots, VectorTable


@dataclass(frozen=True)
class Knobs:
    count: int = 1
    share: float = 0.5
    maybe: int | None = None
    label: str = "x"


def test_parse_params_checks_names_and_types() -> None:
    assert parse_params(Knobs, {}, "k") == Knobs()
    assert parse_params(Knobs, {"share": 1, "maybe": None, "label": "y"}, "k") == Knobs(
        share=1.0, label="y"
    )
    with pytest.raises(
        InvalidInputError, match=r"unknown k parameter\(s\) nope; known: count, share"
    ):
        parse_params(Knobs, {"nope": 1}, "k")
    with pytest.raises(InvalidInputError, match="count must be an integer"):
        parse_params(Knobs, {"count": True}, "k")
    with pytest.raises(InvalidInputError, match="share must be a number"):
        parse_params(Knobs, {"share": "high"}, "k")
    with pytest.raises(InvalidInputError, match="share must be finite"):
        parse_params(Knobs, {"share": float("inf")}, "k")
    with pytest.raises(InvalidInputError, match="label must be a short string"):
        parse_params(Knobs, {"label": 3}, "k")


def test_flat_takes_no_parameters() -> None:
    with pytest.raises(InvalidInputError, match="unknown flat parameter"):
        FlatIndex(4, "ip", {"nlist": 3})


def test_effort_ladder_grows_to_its_top() -> None:
    assert effort_ladder(1, 10) == [1, 2, 3, 5, 7, 10]
    assert effort_ladder(16, 16) == [16]
    ladder = effort_ladder(16, 1024)
    assert ladder[0] == 16
    assert ladder[-1] == 1024
    assert ladder == sorted(set(ladder))


def _table() -> VectorTable:
    rng = np.random.default_rng(0)
    table = VectorTable(8, "l2")
    n = 300
    table.insert(
        [str(i) for i in range(n)], rng.standard_normal((n, 8)).astype(np.float32), [{}] * n
    )
    return table


def test_calibration_set_excludes_each_query_itself() -> None:
    table = _table()
    cal = calibration_set(table)
    assert cal is not None
    assert len(cal.slots) == 100
    assert all(len(t) == 10 and int(s) not in t for s, t in zip(cal.slots, cal.truth, strict=True))
    assert calibration_set(VectorTable(8, "l2")) is None


def test_calibrate_picks_the_smallest_pool_then_effort_that_reach_the_target() -> None:
    table = _table()
    cal = calibration_set(table)
    assert cal is not None
    everything = table.alive_slots()

    def propose(queries: Vectors, effort: int, pool: int) -> list[Slots]:
        # a fake index: finds the true neighbours with probability effort/10, given pool >= 20
        out = []
        for truth in cal.truth:
            keep = sorted(truth)[: min(10, effort)] if pool >= 20 else []
            out.append(np.asarray(keep + everything[-5:].tolist(), dtype=np.int64))
        return out

    effort, pool, recall = calibrate(table, cal, [2, 5, 9, 10, 12], [10, 20, 40], propose, 0.95)
    assert (effort, pool) == (10, 20)
    assert recall == pytest.approx(1.0)
    assert measure_recall(table, cal, lambda q: propose(q, 5, 20)) == pytest.approx(0.5, abs=0.05)
    effort, pool, _ = calibrate(table, cal, [1, 2], [10], propose, 0.95)
    assert (effort, pool) == (2, 10), "unreachable target: the largest of each"
