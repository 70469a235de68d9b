"""The engine: the core (:mod:`clipserve.engine.core`) with its tasks
(:mod:`clipserve.engine.tasks`): evaluate, embed, rank and classify, and jobs of them, captions
and answers
(:mod:`clipserve.engine.jobs`). This is what the service, the CLI and the Python API call."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import numpy as np

from clipserve.config import Settings
from clipserve.engine.core import EngineCore
from clipserve.engine.jobs import Jobs
from clipserve.engine.profiler import ProfileReport, profile_model, trace_folder
from clipserve.engine.registry import BackendLoader
from clipserve.engine.tasks.caption import Answer, Captioning, Captions
from clipserve.engine.tasks.embed import Content, Embedding, Embeddings, Where
from clipserve.engine.tasks.evaluate import EvalItem, EvalResult, Evaluation, ProgressCallback
from clipserve.engine.tasks.job_chunks import JobChunks
from clipserve.engine.tasks.retrieve import Classification, Ranking, Retrieval
from clipserve.engine.tasks.score import ScoreMatrices, ScoreMatrix
from clipserve.engine.tasks.search import Collections
from clipserve.errors import InvalidInputError
from clipserve.media import ImageInput
from clipserve.models.base import Modality
from clipserve.observability.metrics import Metrics
from clipserve.observability.tracing import Tracing


class Engine(EngineCore):
    def __init__(
        self,
        settings: Settings,
        *,
        loader: BackendLoader | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        super().__init__(settings, loader=loader, metrics=metrics, tracing=tracing)
        self._evaluation = Evaluation(self)
        self._embedding = Embedding(self)
        self.retrieval = Retrieval(self, self._embedding)
        self.jobs = Jobs(settings.jobs, JobChunks(self, self._embedding, self._evaluation))
        self.collections = Collections(self, self._embedding, settings.collections)
        self.captioning = Captioning(self)
        self._score_matrix = ScoreMatrix(self, self._embedding)

    async def profile(
        self, model: str | None, modality: Modality, *, batch_size: int, passes: int
    ) -> ProfileReport:
        """torch.profiler over ``passes`` dummy batches of ``model`` (:mod:`.profiler`); the
        Chrome trace goes under ``server.profile_dir``."""
        name = self.resolve_model(model)
        limit = self.settings.batching.max_batch_size
        if batch_size > limit:
            raise InvalidInputError(
                f"batch_size {batch_size} is above the service's max_batch_size ({limit}): "
                "profile the batches it runs"
            )
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        trace = trace_folder(self.settings.server.profile_dir) / f"{name}-{modality}-{stamp}.json"
        async with self.registry.use(name) as handle:
            return await profile_model(
                handle, modality, batch_size=batch_size, passes=passes, trace=trace
            )

    async def start(self) -> None:
        await super().start()
        await self.collections.start()
        await self.jobs.start()

    async def close(self) -> None:
        """Jobs stop first (in Redis, their interrupted chunks go back on the queue), then the
        core drains and unloads, then collections are saved and closed."""
        await self.jobs.close()
        try:
            await super().close()
        finally:
            await self.collections.close()

    async def evaluate(
        self,
        items: Sequence[EvalItem],
        *,
        window: int | None = None,
        progress: ProgressCallback | None = None,
        client: str | None = None,
    ) -> list[EvalResult]:
        """Score pairs; results in input order, a failing pair carries its error.

        ``client`` (on every method): who asked, an API key or an address, whose share of each
        queue the request counts against (default: the in-process client)."""
        return await self._evaluation.run(items, window=window, progress=progress, client=client)

    async def evaluate_one(self, item: EvalItem, *, client: str | None = None) -> EvalResult:
        """Score one pair; raises its error instead of returning it."""
        return await self._evaluation.one(item, client=client)

    async def embed(
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
        """L2-normalised embeddings in input order; raises the first failing input's error.
        ``cache=False``: the embedding cache is neither read nor filled."""
        return await self._embedding.run(
            model,
            inputs,
            window=window,
            where=where,
            dimensions=dimensions,
            client=client,
            cache=cache,
        )

    async def embed_texts(
        self, model: str | None, texts: Sequence[str], *, window: int | None = None
    ) -> Embeddings:
        return await self.embed(model, [Content.text(t) for t in texts], window=window)

    async def embed_images(
        self, model: str | None, images: Sequence[ImageInput], *, window: int | None = None
    ) -> np.ndarray:
        """(n, d) L2-normalised image embeddings; raises the first failing item's error."""
        embedded = await self.embed(model, [Content.image(i) for i in images], window=window)
        return embedded.vectors

    async def rank(
        self,
        model: str | None,
        query: Content,
        documents: Sequence[Content],
        *,
        client: str | None = None,
    ) -> Ranking:
        """Documents by cosine similarity to the query; failed documents last, with errors."""
        return await self.retrieval.rank(model, query, documents, client=client)

    async def classify(
        self,
        model: str | None,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        template: str = "a photo of a {}",
        *,
        client: str | None = None,
    ) -> list[Classification]:
        """Per image, labels by probability (softmax for CLIP, sigmoid for SigLIP), or its
        error."""
        return await self.retrieval.classify(model, images, labels, template, client=client)

    async def score(
        self,
        model: str | None,
        images: Sequence[ImageInput],
        texts: Sequence[str],
        *,
        self_similarity: bool = False,
        client: str | None = None,
    ) -> ScoreMatrices:
        """Every image against every text (CLIP scores), and images x images or texts x texts
        cosines (without the other side, or with ``self_similarity``); failed inputs carry their
        error and their cells are None."""
        return await self._score_matrix.run(
            model, images, texts, self_similarity=self_similarity, client=client
        )

    async def caption(
        self,
        model: str | None,
        images: Sequence[ImageInput],
        *,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        client: str | None = None,
    ) -> Captions:
        """A caption per image (greedy decoding unless ``num_beams`` > 1), in input order; an
        image that failed carries its error. ``model``: a caption model (default
        ``captions.default_model``)."""
        return await self.captioning.caption(
            model,
            images,
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            client=client,
        )

    async def answer(
        self,
        model: str | None,
        image: ImageInput,
        question: str,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        client: str | None = None,
    ) -> Answer:
        """A visual question answering model's answer to ``question`` about ``image``."""
        return await self.captioning.answer(
            model,
            image,
            question,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            client=client,
        )
