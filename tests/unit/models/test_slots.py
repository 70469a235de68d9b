"""TowerSlots and ModelSlot (clipserve.models.slots), what the open_clip and transformers backends
share: the towers and their warm-up examples, a forward swapped in, runtime notes, and close."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from clipserve.model_specs import ModelSpec
from clipserve.models.loader import load_backend

CASES = [("open_clip", "open_clip"), ("hf", "hf_clip"), ("hf", "hf_siglip")]


def _load(kind: str, folder: Path) -> Any:
    name = str(folder) if kind == "hf" else f"local-dir:{folder}"
    spec = ModelSpec(backend=kind, model_name=name)  # type: ignore[arg-type]
    return load_backend(spec, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize(("kind", "folder"), CASES)
def test_towers_run_their_examples_as_the_encoders_do(
    kind: str, folder: str, tiny_dirs: dict[str, Path]
) -> None:
    backend = _load(kind, tiny_dirs[folder])
    towers = backend.towers()
    assert set(towers) == {"image", "text"}
    image = towers["image"]
    assert [example[0].shape[0] for example in image.examples] == [1, 3]
    side = backend.info.image_size
    assert image.examples[0][0].shape[-2:] == (side, side)
    text = towers["text"]
    assert len(text.examples) == 3
    assert text.max_length == backend.info.context_length
    assert all(len(example) == len(text.input_names) for example in text.examples)
    with torch.inference_mode():
        features = text.module(*text.examples[2])
    assert features.shape == (3, backend.info.embed_dim)


@pytest.mark.parametrize(("kind", "folder"), CASES)
def test_a_swapped_forward_serves_and_notes_merge(
    kind: str, folder: str, tiny_dirs: dict[str, Path]
) -> None:
    backend = _load(kind, tiny_dirs[folder])
    dim = backend.info.embed_dim
    calls: list[int] = []

    def constant(*inputs: torch.Tensor) -> torch.Tensor:
        calls.append(inputs[0].shape[0])
        return torch.ones(inputs[0].shape[0], dim)

    backend.use_tower("text", constant)
    got = backend.encode_texts(backend.tokenize(["a cat", "two dogs"]))
    assert calls == [2]
    torch.testing.assert_close(got, torch.full((2, dim), dim**-0.5))  # normalised by the backend

    backend.note_runtime({"runtime": "onnx"})
    backend.note_runtime({"runtime_load_s": "1.5"})
    assert backend.info.extra["runtime"] == "onnx"
    assert backend.info.extra["runtime_load_s"] == "1.5"
    assert backend.info.extra["model_name"]  # what the backend put there stays


@pytest.mark.parametrize(("kind", "folder"), CASES[:2])
def test_a_closed_backend_refuses_with_its_name(
    kind: str, folder: str, tiny_dirs: dict[str, Path]
) -> None:
    backend = _load(kind, tiny_dirs[folder])
    tokens = backend.tokenize(["a cat"])
    backend.close()
    with pytest.raises(RuntimeError, match="was closed"):
        backend.encode_texts(tokens)
    with pytest.raises(RuntimeError, match="was closed"):
        backend.use_tower("image", lambda pixels: pixels)
