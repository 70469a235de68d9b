"""``clipserve bench --optimizations`` on the tiny model with a tiny time budget: a row per method,
deviations that are numbers in sane ranges, the reference's exactly zero."""

from __future__ import annotations

import math

import pytest
import torch
from typer.testing import CliRunner

from clipserve import bench_optimizations
from clipserve.bench_optimizations import (
    METHODS,
    OptimizationResult,
    deviation,
    format_optimizations,
    run_optimizations,
)
from clipserve.cli import app


@pytest.fixture(scope="module")
def rows() -> list[OptimizationResult]:
    return run_optimizations(["tiny"], device="cpu", seconds=0.01, photos=4)


def test_a_row_per_method_with_sane_figures(rows: list[OptimizationResult]) -> None:
    assert [(r.model, r.method) for r in rows] == [("tiny", m.name) for m in METHODS]
    by_method = {r.method: r for r in rows}
    for name in ("fp32", "int8", "fast", "compile", "onnx"):  # bf16 may be refused by a CPU
        assert by_method[name].figures is not None, by_method[name].error
    for row in rows:
        if row.figures is None:
            assert row.error
            continue
        f = row.figures
        assert f.load_s > 0
        assert f.memory_mb > 0
        assert all(rate > 0 and math.isfinite(rate) for rate in (*f.images_per_s, *f.texts_per_s))
        d = f.deviation
        assert 0 <= d.max_score_delta < 20
        assert 0.9 < d.min_image_cosine <= 1 + 1e-5
        assert 0.9 < d.min_text_cosine <= 1 + 1e-5
        assert 0 <= d.top1_agreement <= 1
    reference = by_method["fp32"].figures
    assert reference is not None
    assert reference.dtype == "float32"
    d = reference.deviation
    assert d.max_score_delta == 0
    assert d.min_image_cosine == pytest.approx(1, abs=1e-6)
    assert d.min_text_cosine == pytest.approx(1, abs=1e-6)
    assert d.top1_agreement == 1
    int8 = by_method["int8"].figures
    assert int8 is not None
    assert int8.dtype == "int8"
    assert int8.memory_mb < reference.memory_mb
    fast = by_method["fast"].figures
    assert fast is not None
    assert fast.dtype == "float32"
    assert fast.deviation.min_text_cosine == pytest.approx(1, abs=1e-6)  # texts are untouched
    assert fast.deviation.min_image_cosine < 1 - 1e-6  # the draft decode changes the pixels
    assert {(f.runtime, f.runtime_fallback) for f in (reference, int8, fast)} == {("eager", None)}
    for name in ("compile", "onnx"):  # the runtime ran, and drifts by no more than float noise
        figures = by_method[name].figures
        assert figures is not None
        assert (figures.runtime, figures.runtime_fallback) == (name, None)
        assert figures.deviation.max_score_delta < 1e-3
        assert figures.deviation.min_image_cosine > 1 - 1e-5
        assert figures.deviation.min_text_cosine > 1 - 1e-5
        assert figures.deviation.top1_agreement == 1


def test_the_table_has_a_line_per_row(rows: list[OptimizationResult]) -> None:
    header, *lines = format_optimizations(rows)
    assert header.split()[:3] == ["model", "method", "dtype"]
    assert "max|dS|" in header
    assert "top-1" in header
    assert [line.split()[:2] for line in lines] == [["tiny", m.name] for m in METHODS]
    fp32 = lines[0].split()
    assert fp32[-4:] == ["0.000", "1.0000", "1.0000", "1.00"]


def test_a_failing_method_is_a_row_with_its_error() -> None:
    failed = OptimizationResult("tiny", "bf16", error="RuntimeError: no bf16 kernels")
    (_, line) = format_optimizations([failed])
    assert line.split()[:2] == ["tiny", "bf16"]
    assert "not run: RuntimeError: no bf16 kernels" in line


def test_a_runtime_that_fell_back_says_so_in_its_row() -> None:
    figures = bench_optimizations.Figures(
        dtype="float32",
        runtime="eager",
        runtime_fallback="text: RuntimeUnavailableError: onnxruntime is not installed",
        load_s=1.0,
        memory_mb=2.0,
        images_per_s=(1.0, 2.0),
        texts_per_s=(3.0, 4.0),
        deviation=bench_optimizations.Deviation(0.0, 1.0, 1.0, 1.0),
    )
    (_, line) = format_optimizations([OptimizationResult("tiny", "onnx", figures)])
    assert line.split()[:4] == ["tiny", "onnx", "float32", "eager"]
    assert line.endswith("(eager: text: RuntimeUnavailableError: onnxruntime is not installed)")


def test_deviation_of_known_embeddings() -> None:
    eye = torch.eye(3)
    reference = bench_optimizations._Outputs(images=eye[:2], texts=eye)  # noqa: SLF001
    moved = bench_optimizations._Outputs(  # noqa: SLF001
        images=torch.tensor([[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]]), texts=eye
    )
    d = deviation(reference, moved, captions=1)  # caption: text 0; labels: texts 1 and 2
    assert d.max_score_delta == pytest.approx(40)  # image 0 with the caption: 100 -> 60
    assert d.min_image_cosine == pytest.approx(0)  # image 1 turned by 90 degrees
    assert d.min_text_cosine == pytest.approx(1)
    assert d.top1_agreement == pytest.approx(0.5)  # image 1's label changed


def test_the_cli_flag_runs_the_optimizations_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[list[str], str, float]] = []

    def run(models: list[str], *, device: str, seconds: float) -> list[OptimizationResult]:
        calls.append((models, device, seconds))
        return [OptimizationResult("vit-b-32", "bf16", error="RuntimeError: skipped")]

    monkeypatch.setattr(bench_optimizations, "run_optimizations", run)
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--optimizations", "--seconds", "0.5"])
    assert result.exit_code == 0, result.output
    assert calls == [(["vit-b-32"], "auto", 0.5)]  # the default model of --optimizations
    assert "not run: RuntimeError: skipped" in result.output
    result = runner.invoke(app, ["bench", "--optimizations", "--models", "tiny,vit-b-16"])
    assert result.exit_code == 2
    assert "unknown bench models" in result.output
