"""`clipserve bench` end to end on the tiny model: real server processes on loopback, a table."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from clipserve.bench import BenchResult, Latency, LoadResult, format_results
from clipserve.cli import app as cli


def test_bench_runs_servers_and_prints_the_ratios() -> None:
    result = CliRunner().invoke(
        cli, ["bench", "--models", "tiny", "--pairs", "8", "--concurrency", "4", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "batched/unbatched" in line)
    header, row = lines[start : start + 2]
    latency = lines[start + 2 :]
    assert "model alone ms" in latency[0]
    assert [line.split()[:2] for line in latency[1:]] == [["tiny", "text"], ["tiny", "image"]]
    for line in latency[1:]:
        model_ms, server_ms = (float(x) for x in line.split()[2:4])
        assert model_ms > 0
        assert 0 < server_ms < 10_000
    assert "overhead" in header
    assert row.startswith("tiny")
    numbers = re.findall(r"[\d.]+", row)
    assert numbers[:4] == ["8", "4", "32", numbers[3]]
    assert float(numbers[3]) > 0  # raw pairs/s
    assert "requests failed" not in result.output


def test_ratios_are_computed_from_throughput() -> None:
    result = BenchResult(
        model="m",
        pairs=10,
        concurrency=2,
        max_batch_size=4,
        raw_pairs_per_s=10.0,
        batched=LoadResult(8.0, 100.0, 200.0, 0),
        unbatched=LoadResult(2.0, 400.0, 900.0, 1),
        batch_request_pairs_per_s=9.0,
    )
    assert result.batching_speedup == 4.0
    assert result.server_overhead == 0.25
    lines = format_results([result])
    assert "4.00x" in lines[1]
    assert "25.0%" in lines[1]
    assert lines[2] == "  m: 0 batched and 1 unbatched requests failed"


def test_latency_ratios_are_judged_against_the_target() -> None:
    fast, slow = Latency("text", 20.0, 21.0), Latency("image", 50.0, 60.0)
    result = BenchResult(
        "m", 10, 2, 4, 10.0, LoadResult(8, 1, 2, 0), LoadResult(2, 1, 2, 0), 9.0, (fast, slow)
    )
    *_, text_line, image_line = format_results([result])
    assert fast.ratio == pytest.approx(1.05)
    assert text_line.split()[-2:] == ["1.05x", "met"]
    assert image_line.split()[-3:] == ["1.20x", "NOT", "met"]
