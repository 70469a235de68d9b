"""Score matrices: every image against every text (CLIP score), and images against images or
texts against texts (cosine), in one call: CLIP-T and CLIP-I, as torchmetrics' CLIPScore computes
them for image-text, image-image and text-text pairs.

Inputs are deduplicated and encoded through the batcher and the cache like any other request. An
input that cannot be encoded carries its own error, and its row or column holds None; what every
cell depends on fails the request (the model, the sizes). Sizes are checked before any work: the
answer holds every cell, so ``MAX_SCORE_CELLS`` bounds images x texts plus the self-similarity
matrices asked for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from clipserve.engine.core import EngineCore
from clipserve.engine.tasks.embed import Content, Embedding, Encoded, image_refs, modalities_of
from clipserve.errors import ClipServeError, InvalidInputError
from clipserve.media import ImageInput

MAX_SCORE_CELLS = 100_000
FORMULA = "clip_score = max(100 * cos(image, text), 0)"
"""The seed's CLIP score, stated in every answer."""

Matrix = list[list[float | None]]


@dataclass(frozen=True, slots=True)
class Scored:
    """One input's outcome in a score matrix."""

    error: ClipServeError | None = None
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class ScoreMatrices:
    model: str
    images: tuple[Scored, ...]
    texts: tuple[Scored, ...]
    scores: Matrix | None
    """images x texts CLIP scores (None without images or without texts)."""
    image_similarity: Matrix | None
    """images x images cosine (without texts, or when asked)."""
    text_similarity: Matrix | None
    """texts x texts cosine (without images, or when asked)."""
    seconds: float


def _matrix(
    rows: Sequence[Encoded | ClipServeError],
    columns: Sequence[Encoded | ClipServeError],
    *,
    clip_score: bool,
) -> Matrix:
    """Cosines (or CLIP scores) of every row against every column; None where either failed.
    numpy's own loops (``einsum`` without BLAS): no thread pool competes with the encoders."""
    ok_rows = [i for i, o in enumerate(rows) if isinstance(o, Encoded)]
    ok_columns = [j for j, o in enumerate(columns) if isinstance(o, Encoded)]
    out: Matrix = [[None] * len(columns) for _ in rows]
    if not ok_rows or not ok_columns:
        return out
    a = np.stack([_vector(rows[i]) for i in ok_rows])
    b = np.stack([_vector(columns[j]) for j in ok_columns])
    cos = np.einsum("id,jd->ij", a, b)
    values = np.maximum(np.float32(100.0) * cos, np.float32(0.0)) if clip_score else cos
    for r, i in enumerate(ok_rows):
        row = values[r].tolist()
        for c, j in enumerate(ok_columns):
            out[i][j] = row[c]
    return out


def _vector(outcome: Encoded | ClipServeError) -> np.ndarray:
    assert isinstance(outcome, Encoded)
    vector: np.ndarray = outcome.vector.numpy().astype(np.float32, copy=False)
    return vector


class ScoreMatrix:
    def __init__(self, core: EngineCore, embedding: Embedding) -> None:
        self._core = core
        self._embedding = embedding

    async def run(
        self,
        model: str | None,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        *,
        self_similarity: bool = False,
        client: str | None = None,
    ) -> ScoreMatrices:
        if not images and not texts:
            raise InvalidInputError("send images, texts or both")
        want_images = bool(images) and (self_similarity or not texts)
        want_texts = bool(texts) and (self_similarity or not images)
        cells = len(images) * len(texts)
        cells += len(images) ** 2 if want_images else 0
        cells += len(texts) ** 2 if want_texts else 0
        if cells > MAX_SCORE_CELLS:
            raise InvalidInputError(
                f"{len(images)} images and {len(texts)} texts would answer {cells} scores; the "
                f"limit is {MAX_SCORE_CELLS} (send fewer inputs, or no self_similarity)",
                detail={"max_score_cells": MAX_SCORE_CELLS},
            )
        core = self._core
        started = time.perf_counter()
        inputs = [*(Content.image(i) for i in images), *(Content.text(t) for t in texts)]
        refs = image_refs(
            core,
            inputs,
            lambda i: f"images[{i}]" if i < len(images) else f"texts[{i - len(images)}]",
        )
        name = core.resolve_model(model)
        scope = core.scope(client=client)
        async with core.serving(name, modalities_of(inputs), scope) as handle:
            outcomes = await self._embedding.encode(handle, inputs, refs, scope)
        image_out, text_out = outcomes[: len(images)], outcomes[len(images) :]
        return ScoreMatrices(
            model=handle.name,
            images=tuple(_scored(o) for o in image_out),
            texts=tuple(_scored(o) for o in text_out),
            scores=_matrix(image_out, text_out, clip_score=True) if images and texts else None,
            image_similarity=_matrix(image_out, image_out, clip_score=False)
            if want_images
            else None,
            text_similarity=_matrix(text_out, text_out, clip_score=False) if want_texts else None,
            seconds=time.perf_counter() - started,
        )


def _scored(outcome: Encoded | ClipServeError) -> Scored:
    if isinstance(outcome, ClipServeError):
        return Scored(outcome)
    return Scored(truncated=outcome.truncated)
