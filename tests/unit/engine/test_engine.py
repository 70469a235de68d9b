from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clipserve.config import Settings
from clipserve.engine.engine import Engine, EvalItem
from clipserve.errors import (
    InferenceError,
    InvalidImageError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    UnsupportedModalityError,
)
from clipserve.models.base import clip_scores
from clipserve.testing import FakeBackend, FakeLoader


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
async def engine_for() -> AsyncIterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(settings: Settings, loader: FakeLoader | None = None) -> Engine:
        engine = Engine(settings, loader=loader or FakeLoader())
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


@pytest.fixture
def images(photo_bytes: Callable[..., bytes], tmp_path: Path) -> dict[str, str]:
    """Image inputs of every string kind: data URIs and paths under the media root."""
    (tmp_path / "chelsea.png").write_bytes(photo_bytes("chelsea", "PNG"))
    return {
        "astronaut": data_uri(photo_bytes("astronaut", "PNG"), "image/png"),
        "coffee": data_uri(photo_bytes("coffee")),
        "chelsea": str(tmp_path / "chelsea.png"),
        "rocket": "rocket.png",  # relative to the media root, written below
    }


async def test_scores_are_max_100_cos_in_request_order(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
    photos: dict[str, Any],
    tmp_path: Path,
) -> None:
    photos["rocket"].save(tmp_path / "rocket.png")
    loader = FakeLoader()
    engine = engine_for(make_settings(), loader)
    items = [EvalItem(images[n], f"a photo of {n}") for n in ("astronaut", "chelsea", "rocket")]
    results = await engine.evaluate(items)

    backend = loader.loaded["fake-fast"]
    for item, result, name in zip(items, results, ("astronaut", "chelsea", "rocket"), strict=True):
        assert result.error is None
        assert result.model == "fast"
        pixels = backend.preprocess(photos[name].convert("RGB"))
        image = backend.encode_images(pixels[None])
        text = backend.encode_texts(backend.tokenize([item.text]))
        expected = float(clip_scores(image, text)[0])
        assert result.score == pytest.approx(expected, abs=1e-4)  # lossless inputs
        assert 0.0 <= result.score <= 100.0


async def test_duplicates_are_encoded_once_and_chunks_follow_batch_size(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    photos: dict[str, Any],
) -> None:
    loader = FakeLoader()
    engine = engine_for(make_settings(), loader)
    distinct = [photos["astronaut"].rotate(angle) for angle in range(0, 100, 10)]  # 10 images
    items = [EvalItem(img, "same caption") for img in distinct]
    items += [EvalItem(distinct[0], "same caption"), EvalItem(distinct[1], "other caption")]
    results = await engine.evaluate(items, batch_size=4)

    backend = loader.loaded["fake-fast"]
    assert backend.forwards("image") == [4, 4, 2]
    assert sum(backend.forwards("text")) == 2
    assert results[10].score == results[0].score
    assert all(r.error is None for r in results)


async def test_failing_items_carry_errors_and_the_rest_succeed(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings())
    items = [
        EvalItem(images["astronaut"], "ok"),
        EvalItem(data_uri(b"not an image at all"), "bad image"),
        EvalItem(images["astronaut"], "x" * 20_000),
        EvalItem(images["astronaut"], "unknown model", model="nope"),
        EvalItem(images["astronaut"], "text-only model", model="minilm"),
        EvalItem(images["astronaut"], "broken model", model="broken"),
        EvalItem(images["chelsea"], "also ok", model="accurate"),
    ]
    results = await engine.evaluate(items)
    assert results[0].error is None
    assert results[6].error is None
    assert results[6].model == "accurate"
    assert isinstance(results[1].error, InvalidImageError)
    assert results[1].error.message.startswith("image could not be decoded")
    assert isinstance(results[2].error, InvalidInputError)
    assert "limit is 10000" in results[2].error.message
    assert isinstance(results[3].error, ModelNotFoundError)
    assert isinstance(results[4].error, UnsupportedModalityError)
    assert "cannot encode image" in results[4].error.message
    assert isinstance(results[5].error, ModelUnavailableError)
    assert all(r.score is None for r in results[1:6])
    errors = engine.metrics.evaluation_errors_total
    assert errors.labels("fast", "InvalidImageError")._value.get() == 1


async def test_model_failure_fails_its_items_only(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings(), FakeLoader(fail_texts=frozenset({"boom"})))
    results = await engine.evaluate(
        [EvalItem(images["astronaut"], "boom"), EvalItem(images["astronaut"], "fine")],
        batch_size=1,
    )
    assert isinstance(results[0].error, InferenceError)
    assert "inference failed for model 'fast' (text)" in results[0].error.message
    assert results[1].error is None


async def test_truncation_is_reported(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings())
    long, short = await engine.evaluate(
        [EvalItem(images["astronaut"], "word " * 50), EvalItem(images["astronaut"], "short")]
    )
    assert long.text_truncated is True
    assert long.score is not None
    assert short.text_truncated is False


async def test_evaluate_one_raises_the_items_error(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for(make_settings())
    with pytest.raises(InvalidImageError):
        await engine.evaluate_one(EvalItem(data_uri(b"junk"), "x"))


async def test_progress_reaches_the_total(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings())
    seen: list[tuple[int, int]] = []
    items = [EvalItem(images["astronaut"], str(i)) for i in range(5)]
    items.append(EvalItem(images["astronaut"], "x", model="nope"))
    await engine.evaluate(items, batch_size=2, progress=lambda d, t: seen.append((d, t)))
    assert (6, 6) in seen
    assert all(t == 6 for _, t in seen)


async def test_embeddings_are_normalised_and_shaped(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    photos: dict[str, Any],
) -> None:
    engine = engine_for(make_settings())
    texts = await engine.embed_texts(None, ["a", "b", "a"])
    assert texts.vectors.shape == (3, 16)
    assert texts.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(texts.vectors[0], texts.vectors[2])
    vectors = await engine.embed_images("fast", [photos["astronaut"], photos["coffee"]])
    assert vectors.shape == (2, 16)
    with pytest.raises(UnsupportedModalityError):
        await engine.embed_images("minilm", [photos["astronaut"]])
    text_only = await engine.embed_texts("minilm", ["hello"])
    assert text_only.vectors.shape == (1, 16)


def test_clip_scores_clamp_at_zero() -> None:
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    b = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), dim=-1)
    scores = clip_scores(a, b)
    assert scores[0].item() == pytest.approx(100 / 2**0.5, abs=1e-4)
    assert scores[1].item() == 0.0


def test_fake_backend_is_a_backend() -> None:
    from clipserve.models.base import Backend

    assert isinstance(FakeBackend(), Backend)
