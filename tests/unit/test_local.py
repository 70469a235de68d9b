from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import clipserve
from clipserve.errors import (
    InvalidImageError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from clipserve.testing import FakeLoader


def test_public_api_is_exported_lazily() -> None:
    assert clipserve.__version__ == "0.1.0"
    assert clipserve.load_model is clipserve.local.load_model
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = clipserve.nope  # type: ignore[attr-defined]


def test_score_and_embed_with_every_input_kind(
    make_settings: Callable[..., Any],
    photos: dict[str, Any],
    photo_bytes: Callable[..., bytes],
    tmp_path: Path,
    assert_scores_close: Callable[[Any, Any], None],
) -> None:
    photos["coffee"].save(tmp_path / "coffee.png")
    with clipserve.load_model("fast", settings=make_settings(), loader=FakeLoader()) as model:
        assert model.status.loaded
        scores = model.score(
            [photos["astronaut"], photo_bytes("chelsea", "PNG"), str(tmp_path / "coffee.png")],
            ["an astronaut", "a cat", "coffee"],
        )
        assert len(scores) == 3
        assert all(0 <= s <= 100 for s in scores)
        assert_scores_close(model.score([photos["astronaut"]], ["an astronaut"]), [scores[0]])
        texts = model.embed_texts(["a", "b"])
        assert texts.shape == (2, 16)
        images = model.embed_images([photos["rocket"]])
        np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
        detailed = model.embed_texts_detailed(["word " * 40])
        assert detailed.truncated == (True,)


def test_errors_are_raised_clearly(
    make_settings: Callable[..., Any], photos: dict[str, Any]
) -> None:
    settings = make_settings()
    with pytest.raises(ModelNotFoundError, match="'nope' is unknown"):
        clipserve.load_model("nope", settings=settings, loader=FakeLoader())
    with pytest.raises(ModelUnavailableError, match="simulated load failure"):
        clipserve.load_model("broken", settings=settings, loader=FakeLoader())
    with clipserve.load_model(settings=settings, loader=FakeLoader()) as model:
        assert model.name == "fast"
        with pytest.raises(InvalidImageError):
            model.score([b"not an image"], ["x"])
        with pytest.raises(InvalidInputError, match="got 1 images but 2 texts"):
            model.score([photos["astronaut"]], ["a", "b"])
        results = model.evaluate([b"junk", photos["astronaut"]], ["x", "y"])
        assert results[0].error is not None
        assert results[1].score is not None


async def test_works_inside_a_running_event_loop(
    make_settings: Callable[..., Any], photos: dict[str, Any]
) -> None:
    # The model runs on its own loop thread, so a notebook's running loop is no obstacle.
    asyncio.get_running_loop()
    model = clipserve.load_model("fast", settings=make_settings(), loader=FakeLoader())
    try:
        assert len(model.score([photos["astronaut"]], ["x"])) == 1
    finally:
        model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.embed_texts(["x"])


def test_real_tiny_model_end_to_end(
    make_settings: Callable[..., Any], tiny_registry: dict[str, Any], photos: dict[str, Any]
) -> None:
    with clipserve.load_model("tiny", settings=make_settings(tiny_registry)) as model:
        assert model.status.info is not None
        assert model.status.info.embed_dim == 32
        vectors = model.embed_images([photos["chelsea"], photos["coffee"]])
        assert vectors.shape == (2, 32)
        (score,) = model.score([photos["chelsea"]], ["a cat"])
        expected = max(100.0 * float(vectors[0] @ model.embed_texts(["a cat"])[0]), 0.0)
        assert score == pytest.approx(expected, abs=1e-4)
