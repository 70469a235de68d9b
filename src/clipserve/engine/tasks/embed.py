"""Embeddings: L2-normalised vectors of texts and images, in input order.

:meth:`Embedding.run` answers all or nothing (the OpenAI shape has no per-item error): the first
failing input's error is raised, naming the input. :meth:`Embedding.encode` gives one outcome per
input, for tasks that answer per item (rank, classify).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipserve.engine.core import EngineCore
from clipserve.engine.encoder import (
    ImageOutcomes,
    ImageRef,
    Scope,
    TextOutcomes,
    image_ref,
    stack,
)
from clipserve.engine.registry import ModelHandle
from clipserve.errors import ClipServeError, InvalidInputError
from clipserve.media import ImageInput
from clipserve.models.base import Modality

Where = Callable[[int], str]


@dataclass(frozen=True, slots=True)
class Content:
    """One input to embed: a text, or an image (URL, data URI, path, bytes or PIL image)."""

    modality: Modality
    value: ImageInput

    @classmethod
    def text(cls, value: str) -> Content:
        return cls("text", value)

    @classmethod
    def image(cls, value: ImageInput) -> Content:
        return cls("image", value)


@dataclass(frozen=True, slots=True)
class Embeddings:
    model: str
    vectors: np.ndarray
    """(n, d) float32, L2-normalised, in input order."""
    token_counts: tuple[int, ...]
    """Tokens per text input (0 for images)."""
    truncated: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class Encoded:
    """One input's embedding."""

    vector: torch.Tensor
    token_count: int = 0
    truncated: bool = False


def indexed(error: ClipServeError, where: str) -> ClipServeError:
    """The same error (same class, so the same status) naming the input it belongs to."""
    named = copy.copy(error)
    named.message = f"{where}: {error.message}"
    named.args = (named.message,)
    return named


def modalities_of(inputs: Sequence[Content]) -> tuple[Modality, ...]:
    return tuple(dict.fromkeys(c.modality for c in inputs)) or ("text",)


def _input(i: int) -> str:
    return f"input[{i}]"


def image_refs(
    core: EngineCore, inputs: Sequence[Content], where: Where = _input
) -> list[ImageRef | None]:
    """Each image input's identity (None for texts), computed once. Refuses a text input that is
    not a string (named ``where(i)``) and a request with more distinct images than
    ``max_images_per_request``."""
    for i, content in enumerate(inputs):
        if content.modality == "text" and not isinstance(content.value, str):
            raise InvalidInputError(f"{where(i)}: a text input must be a string")
    refs = [image_ref(c.value) if c.modality == "image" else None for c in inputs]
    core.check_image_count(len({ref.key for ref in refs if ref is not None}))
    return refs


class Embedding:
    def __init__(self, core: EngineCore) -> None:
        self._core = core

    async def run(
        self,
        model: str | None,
        inputs: Sequence[Content],
        *,
        window: int | None = None,
        where: Where | None = None,
        dimensions: int | None = None,
        client: str | None = None,
        cache: bool = True,
    ) -> Embeddings:
        """Embeddings of ``inputs``, or the first failing input's error, named ``where(i)`` (by
        default ``input[i]``, and not for a lone input). ``cache=False``: neither read nor fill
        the embedding cache (every input is computed).

        ``dimensions`` truncates (and re-normalises) the embeddings, where the model's spec says
        it was trained for that (``matryoshka_dims``); otherwise it must equal ``embed_dim``."""
        core = self._core
        name_of = where or _input
        refs = image_refs(core, inputs, name_of)
        name = core.resolve_model(model)
        scope = core.scope(window, client, cache=cache)
        async with core.serving(name, modalities_of(inputs), scope) as handle:
            if dimensions is not None:
                self._check_dimensions(handle, dimensions)
            outcomes = await self.encode(handle, inputs, refs, scope)
        rows: list[Encoded] = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, ClipServeError):
                raise indexed(outcome, name_of(i)) if len(inputs) > 1 or where else outcome
            rows.append(outcome)
        embedded = Embeddings(
            handle.name,
            stack([row.vector for row in rows], handle.info.embed_dim),
            tuple(row.token_count for row in rows),
            tuple(row.truncated for row in rows),
        )
        if dimensions is None or dimensions == embedded.vectors.shape[1]:
            return embedded
        vectors = embedded.vectors[:, :dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return dataclasses.replace(embedded, vectors=vectors / np.maximum(norms, 1e-12))

    async def encode(
        self,
        handle: ModelHandle,
        inputs: Sequence[Content],
        refs: Sequence[ImageRef | None],
        scope: Scope,
    ) -> list[Encoded | ClipServeError]:
        """One outcome per input, in order, on a model already leased; ``refs`` from
        :func:`image_refs` (text inputs must be strings). The cache is used as ``scope.cache``
        says."""
        core = self._core
        texts = [c.value for c in inputs if c.modality == "text" and isinstance(c.value, str)]
        images = [r for r in refs if r is not None]
        text_out: TextOutcomes = {}
        image_out: ImageOutcomes = {}
        if texts and images:
            text_out, image_out = await asyncio.gather(
                core.encoder.texts(handle, texts, scope),
                core.encoder.images(handle, images, scope),
            )
        elif texts:  # one modality, as most requests: no tasks to spawn
            text_out = await core.encoder.texts(handle, texts, scope)
        elif images:
            image_out = await core.encoder.images(handle, images, scope)
        outcomes: list[Encoded | ClipServeError] = []
        for content, ref in zip(inputs, refs, strict=True):
            if ref is not None:
                image = image_out[ref.key]
                outcomes.append(image if isinstance(image, ClipServeError) else Encoded(image))
                continue
            assert isinstance(content.value, str)
            text = text_out[content.value]
            outcomes.append(
                text
                if isinstance(text, ClipServeError)
                else Encoded(text.embedding, text.token_count, text.truncated)
            )
        return outcomes

    @staticmethod
    def _check_dimensions(handle: ModelHandle, dimensions: int) -> None:
        dim = handle.info.embed_dim
        allowed = handle.spec.matryoshka_dims
        if dimensions == dim or dimensions in allowed:
            return
        supported = ", ".join(str(d) for d in sorted({dim, *allowed}))
        raise InvalidInputError(
            f"model '{handle.name}' cannot return {dimensions}-dimensional embeddings: its "
            f"embeddings have {dim} dimensions and it was not trained to be truncated "
            f"(supported dimensions: {supported})",
            detail={"dimensions": dimensions, "supported": sorted({dim, *allowed})},
        )
