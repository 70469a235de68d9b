"""`clipserve bench` end to end on the tiny model: real server processes on loopback, a table."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from clipserve.bench import BenchResult, LoadResult, format_results
from clipserve.cli import app as cli


def test_bench_runs_servers_and_prints_the_ratios() -> None:
    result = CliRunner().invoke(
        cli, ["bench", "--models", "tiny", "--pairs", "8", "--concurrency", "4", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    header, row = [line for line in result.output.splitlines() if line.strip()][-2:]
    assert "batched/unbatched" in header
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
