"""runtime: compile | onnx (clipserve.models.runtimes) on tiny models: same scores as eager, the
ONNX export cached on disk, and a fallback to eager that says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from clipserve.model_specs import ModelSpec
from clipserve.models import runtimes
from clipserve.models.base import clip_scores
from clipserve.models.loader import load_backend

TEXTS = ["a cat", "a photo of two dogs in the snow", "x " * 100, "b", "c d e f"]


def _spec(kind: str, folder: Path, **fields: Any) -> ModelSpec:
    if kind == "hf":
        return ModelSpec(backend="hf", model_name=str(folder), **fields)
    return ModelSpec(backend="open_clip", model_name=f"local-dir:{folder}", **fields)


def _load(spec: ModelSpec, cache: Path) -> Any:
    return load_backend(spec, device="cpu", dtype=torch.float32, runtime_cache_dir=cache)


def _images(backend: Any, count: int = 5) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.stack(
        [
            backend.preprocess(Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)))
            for _ in range(count)
        ]
    )


def _assert_same(eager: Any, other: Any) -> None:
    images = _images(eager)
    for n in (1, 2, 5):  # batch 1, a small batch, a batch with a text past the context
        tokens = eager.tokenize(TEXTS[:n])
        reference = clip_scores(eager.encode_images(images[:n]), eager.encode_texts(tokens))
        got = clip_scores(other.encode_images(images[:n]), other.encode_texts(tokens))
        np.testing.assert_allclose(got, reference, atol=1e-4)
        cos = (eager.encode_texts(tokens) * other.encode_texts(tokens)).sum(-1)
        assert float(cos.min()) >= 1 - 1e-5


@pytest.mark.parametrize(
    ("kind", "folder"), [("open_clip", "open_clip"), ("hf", "hf_clip"), ("hf", "hf_siglip")]
)
def test_onnx_scores_as_eager_and_is_cached(
    kind: str,
    folder: str,
    tiny_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    eager = _load(_spec(kind, tiny_dirs[folder]), tmp_path)
    spec = _spec(kind, tiny_dirs[folder], runtime="onnx")
    onnx = _load(spec, tmp_path)
    assert onnx.info.extra["runtime"] == "onnx"
    assert onnx.info.extra["runtime_towers"] == "image,text"
    assert "runtime_fallback" not in onnx.info.extra
    _assert_same(eager, onnx)
    exports = sorted((tmp_path / "onnx").iterdir())
    assert len(exports) == 2
    assert all((d / runtimes.ONNX_FILE).is_file() for d in exports)

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("exported again")

    monkeypatch.setattr(runtimes, "_export", no_export)
    again = _load(spec, tmp_path)  # the same weights: both towers come from the cache
    assert again.info.extra["runtime"] == "onnx"
    _assert_same(eager, again)


def test_a_failed_export_stays_eager_and_says_why(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("exporter exploded\nsecond line")

    monkeypatch.setattr(runtimes, "_export", broken)
    backend = _load(_spec("open_clip", tiny_dirs["open_clip"], runtime="onnx"), tmp_path)
    extra = backend.info.extra
    assert extra["runtime"] == "eager"
    assert extra["runtime_fallback"] == (
        "image: RuntimeError: exporter exploded; text: RuntimeError: exporter exploded"
    )
    assert not any((tmp_path / "onnx").iterdir())  # nothing half-written is left
    _assert_same(_load(_spec("open_clip", tiny_dirs["open_clip"]), tmp_path), backend)


def test_a_diverging_runtime_is_refused(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = runtimes._onnx

    def wrong(tower: Any, cache_dir: Path) -> Any:
        forward = real(tower, cache_dir)
        return lambda *inputs: -forward(*inputs)

    monkeypatch.setattr(runtimes, "_onnx", wrong)
    backend = _load(_spec("hf", tiny_dirs["hf_clip"], runtime="onnx"), tmp_path)
    assert backend.info.extra["runtime"] == "eager"
    assert "output differs from eager's (cosine -1.0" in backend.info.extra["runtime_fallback"]


def test_compile_scores_as_eager_and_never_compiles_on_a_request(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    from torch._dynamo.utils import counters

    eager = _load(_spec("open_clip", tiny_dirs["open_clip"]), tmp_path)
    compiled = _load(_spec("open_clip", tiny_dirs["open_clip"], runtime="compile"), tmp_path)
    assert compiled.info.extra["runtime"] == "compile"
    assert compiled.info.extra["runtime_towers"] == "image,text"
    graphs = counters["stats"]["unique_graphs"]
    _assert_same(eager, compiled)  # shapes the warm-up did not use
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"backend": "sentence-transformers", "model_name": "m", "runtime": "onnx"},
            "open_clip and hf embedding models only",
        ),
        (
            {"model_name": "ViT-B-32", "runtime": "compile", "precision": "int8"},
            "cannot run precision 'int8'",
        ),
    ],
)
def test_runtime_spec_is_checked(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec(**fields)
