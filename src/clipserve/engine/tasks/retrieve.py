"""Retrieval: ranking documents against a query, and zero-shot classification.

Both answer per item: a document (rank) or an image (classify) that cannot be encoded carries its
own error and the others are answered. What every item depends on fails the request: the query
(rank), the labels (classify), the model.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipserve.engine.core import EngineCore
from clipserve.engine.encoder import Scope, TextOutcome, stack
from clipserve.engine.registry import ModelHandle
from clipserve.engine.tasks.embed import (
    Content,
    Embedding,
    Encoded,
    image_refs,
    indexed,
    modalities_of,
)
from clipserve.errors import ClipServeError, InvalidInputError, quote
from clipserve.media import ImageInput
from clipserve.models.base import sigmoid_probabilities

MAX_LABELS = 1000
"""Labels per classification request."""
MAX_CLASSIFY_SCORES = 100_000
"""Images x labels of one classify request: its answer holds a score for each."""


@dataclass(frozen=True, slots=True)
class Ranked:
    index: int
    score: float | None
    """Cosine similarity of the document to the query; None when the document failed."""
    error: ClipServeError | None = None


@dataclass(frozen=True, slots=True)
class Ranking:
    model: str
    results: tuple[Ranked, ...]
    """Most similar first, then the documents that failed (in document order)."""
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class LabelScore:
    index: int
    label: str
    score: float
    """Cosine similarity of the image to the label's prompt."""
    probability: float


@dataclass(frozen=True, slots=True)
class Classification:
    labels: tuple[LabelScore, ...]
    """Most probable first; empty when the image failed."""
    error: ClipServeError | None = None


class LabelCache:
    """A small LRU of label-prompt embeddings per loaded model; entries die with the model."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._per_model: weakref.WeakKeyDictionary[ModelHandle, OrderedDict[str, TextOutcome]] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, handle: ModelHandle, key: str) -> TextOutcome | None:
        entries = self._per_model.get(handle)
        if entries is None or key not in entries:
            return None
        entries.move_to_end(key)
        return entries[key]

    def put(self, handle: ModelHandle, key: str, value: TextOutcome) -> None:
        entries = self._per_model.setdefault(handle, OrderedDict())
        entries[key] = value
        entries.move_to_end(key)
        while len(entries) > self._max:
            entries.popitem(last=False)


class Retrieval:
    def __init__(self, core: EngineCore, embedding: Embedding) -> None:
        self._core = core
        self._embedding = embedding
        self.label_cache = LabelCache()

    async def rank(
        self,
        model: str | None,
        query: Content,
        documents: Sequence[Content],
        *,
        client: str | None = None,
    ) -> Ranking:
        """Documents sorted by cosine similarity to the query (ties keep document order)."""
        core = self._core
        inputs = [query, *documents]
        refs = image_refs(core, inputs, lambda i: "query" if i == 0 else f"documents[{i - 1}]")
        name = core.resolve_model(model)
        scope = core.scope(client=client)
        async with core.serving(name, modalities_of(inputs), scope) as handle:
            outcomes = await self._embedding.encode(handle, inputs, refs, scope)
        head, *rest = outcomes
        if isinstance(head, ClipServeError):
            raise indexed(head, "query")
        ok = [(i, o) for i, o in enumerate(rest) if isinstance(o, Encoded)]
        vectors = stack([o.vector for _, o in ok], head.vector.shape[0])
        scores = np.einsum("ij,j->i", vectors, head.vector.numpy()).tolist()  # no BLAS threads
        ranked = sorted(
            (Ranked(i, score) for (i, _), score in zip(ok, scores, strict=True)),
            key=lambda r: -(r.score or 0.0),
        )
        failed = [Ranked(i, None, o) for i, o in enumerate(rest) if isinstance(o, ClipServeError)]
        tokens = head.token_count + sum(o.token_count for _, o in ok)
        return Ranking(handle.name, (*ranked, *failed), tokens)

    async def classify(
        self,
        model: str | None,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        template: str = "a photo of a {}",
        *,
        client: str | None = None,
    ) -> list[Classification]:
        """Zero-shot classification: per image, labels sorted by probability (softmax over
        ``logit_scale * cos`` for CLIP, an independent sigmoid per label for SigLIP)."""
        if "{}" not in template:
            raise InvalidInputError(
                "template must contain '{}' where the label goes, e.g. 'a photo of a {}'",
                detail={"template": template},
            )
        if not labels or len(labels) > MAX_LABELS:
            raise InvalidInputError(f"send between 1 and {MAX_LABELS} labels")
        if len(images) * len(labels) > MAX_CLASSIFY_SCORES:  # the answer lists them all
            raise InvalidInputError(
                f"{len(images)} images x {len(labels)} labels would answer "
                f"{len(images) * len(labels)} scores; the limit is {MAX_CLASSIFY_SCORES} (send "
                "fewer images per request)",
                detail={"max_scores": MAX_CLASSIFY_SCORES},
            )
        if any(not label.strip() for label in labels):
            raise InvalidInputError("labels must not be empty strings")
        core = self._core
        # Checked on what will be built, before building it: a 2 MB label in a template of a
        # hundred '{}' would otherwise make a 200 MB prompt.
        limit, slots = core.settings.server.max_prompt_chars, template.count("{}")
        for i, label in enumerate(labels):
            built = len(template) + slots * (len(label) - 2)
            if built > limit:
                raise InvalidInputError(
                    f"labels[{i}]: its prompt would be {built} characters long (the template "
                    f"holds '{{}}' {slots} times); the limit is {limit}",
                    detail={"max_prompt_chars": limit},
                )
        contents = [Content.image(image) for image in images]
        refs = image_refs(core, contents)
        name = core.resolve_model(model)
        scope = core.scope(client=client)
        prompts = [template.replace("{}", label) for label in labels]
        async with core.serving(name, ("image", "text"), scope) as handle:
            text_vectors = await self._label_vectors(handle, prompts, scope)
            outcomes = await self._embedding.encode(handle, contents, refs, scope)
            ok = [(i, o) for i, o in enumerate(outcomes) if isinstance(o, Encoded)]
            if ok:  # images x labels: a matrix product, on the device thread like all torch work
                backend = handle.backend
                cos, probabilities = await asyncio.get_running_loop().run_in_executor(
                    handle.executor,
                    _label_probabilities,
                    [o.vector for _, o in ok],
                    text_vectors,
                    backend.logit_scale,
                    backend.logit_bias,
                )
        out = [Classification((), o if isinstance(o, ClipServeError) else None) for o in outcomes]
        if not ok:
            return out
        for (i, _), row_cos, row_p in zip(ok, cos, probabilities, strict=True):
            scores = [LabelScore(j, labels[j], row_cos[j], row_p[j]) for j in range(len(labels))]
            out[i] = Classification(tuple(sorted(scores, key=lambda s: -s.probability)))
        return out

    async def _label_vectors(
        self, handle: ModelHandle, prompts: Sequence[str], scope: Scope
    ) -> list[torch.Tensor]:
        """Prompt embeddings, from the per-model cache where possible."""
        cache = self.label_cache
        resolved: dict[str, TextOutcome] = {}
        todo: list[str] = []
        for prompt in dict.fromkeys(prompts):
            hit = cache.get(handle, prompt)
            if hit is None:
                todo.append(prompt)
            else:
                resolved[prompt] = hit
        if todo:
            encoded = await self._core.encoder.texts(handle, todo, scope)
            for prompt in todo:
                outcome = encoded[prompt]
                if isinstance(outcome, ClipServeError):
                    raise indexed(outcome, f"label prompt {quote(prompt)!r}")
                cache.put(handle, prompt, outcome)
                resolved[prompt] = outcome
        return [resolved[p].embedding for p in prompts]


def _label_probabilities(
    images: list[torch.Tensor], labels: list[torch.Tensor], scale: float, bias: float | None
) -> tuple[list[list[float]], list[list[float]]]:
    """Cosines of images x label prompts, and each image's label probabilities: a softmax over
    ``scale * cos`` (CLIP), or an independent sigmoid with ``bias`` (SigLIP)."""
    cos = torch.stack(images).float() @ torch.stack(labels).float().T
    if bias is None:
        probabilities = torch.softmax(cos * scale, dim=-1)
    else:
        probabilities = sigmoid_probabilities(cos, scale, bias)
    return cos.tolist(), probabilities.tolist()
