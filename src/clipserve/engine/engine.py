"""The engine: everything between a parsed request and the model backends.

It owns the model registry, the image loader, the thread pools and the dynamic batcher. Every
public call (evaluate, embed, rank, classify) runs under a deadline (``request_timeout``), takes a
lease on its model, passes admission control (a full queue refuses the request up front, so an
admitted request is never half-dropped) and sends its deduplicated inputs through the batcher,
where they share forward passes with every other request for the same model.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from clipserve.config import Settings
from clipserve.engine.batcher import FAILING_AFTER, Batcher
from clipserve.engine.encoder import EmbeddingCache, Encoder, TextOutcome, image_key
from clipserve.engine.executor import Executors, cpu_workers
from clipserve.engine.registry import BackendLoader, ModelHandle, ModelRegistry, ModelState
from clipserve.errors import (
    ClipServeError,
    InferenceError,
    InferenceTimeoutError,
    InvalidInputError,
    ModelNotFoundError,
    UnsupportedModalityError,
)
from clipserve.media import ImageInput, ImageLoader
from clipserve.models.base import Modality, clip_scores, sigmoid_probabilities
from clipserve.models.loader import load_backend
from clipserve.observability.metrics import Metrics

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
Where = Callable[[int], str]


@dataclass(frozen=True, slots=True)
class EvalItem:
    image: ImageInput
    text: str
    model: str | None = None
    """Model config name; None means the default model."""


@dataclass(frozen=True, slots=True)
class EvalResult:
    model: str
    score: float | None
    error: ClipServeError | None = None
    text_truncated: bool = False
    processing_time_ms: float = 0.0


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
class Ranked:
    index: int
    score: float
    """Cosine similarity of the document to the query."""


@dataclass(frozen=True, slots=True)
class Ranking:
    model: str
    results: tuple[Ranked, ...]
    """Most similar first."""
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class LabelScore:
    index: int
    label: str
    score: float
    """Cosine similarity of the image to the label's prompt."""
    probability: float


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str | None = None
    retry_after_s: float | None = None


def _indexed(error: ClipServeError, where: str) -> ClipServeError:
    """The same error (same class, so the same status) naming the input it belongs to."""
    named = copy.copy(error)
    named.message = f"{where}: {error.message}"
    named.args = (named.message,)
    return named


class Engine:
    def __init__(
        self,
        settings: Settings,
        *,
        loader: BackendLoader | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics if metrics is not None else Metrics()
        self.executors = Executors(cpu_workers(settings))
        self.batcher = Batcher(settings.batching, self.metrics, self.executors.cpu)
        self.registry = ModelRegistry(
            settings,
            loader=loader or load_backend,
            executors=self.executors,
            metrics=self.metrics,
            on_unload=self.batcher.discard,
        )
        self.images = ImageLoader(settings.media, executor=self.executors.cpu)
        self.encoder = Encoder(
            settings,
            batcher=self.batcher,
            images=self.images,
            cpu_executor=self.executors.cpu,
            metrics=self.metrics,
        )
        self.label_cache = EmbeddingCache()
        self.started_at = time.time()
        self._watcher: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        interval = self.settings.config_reload_interval_s
        if self.settings.config_path is not None and interval > 0:
            self._watcher = asyncio.create_task(self.registry.watch(interval), name="config-watch")
        if self.settings.preload:
            await self.registry.preload()
            for status in self.registry.statuses():
                if status.loaded:  # create the queues now: on CUDA they probe the batch size
                    handle = await self.registry.get(status.name)
                    for modality in sorted(handle.info.modalities):
                        self.encoder.queue(handle, modality)

    async def close(self) -> None:
        """Graceful: refuse new work, drain the batcher, then unload models and stop threads."""
        await self.batcher.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.registry.close()
        await self.images.aclose()
        self.executors.shutdown()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def resolve_model(self, name: str | None) -> str:
        return name or self.settings.default_model

    def readiness(self) -> Readiness:
        """Ready when the batcher accepts work and the default model can serve (loaded, or
        loadable on first use)."""
        if not self.batcher.accepting:
            return Readiness(False, "the server is shutting down")
        name = self.settings.default_model
        try:
            status = self.registry.status(name, include_disabled=False)
        except ModelNotFoundError as exc:
            return Readiness(False, exc.message)
        if status.state is ModelState.ERROR:
            retry = self.settings.model_retry_interval_s
            return Readiness(False, f"default model '{name}' failed to load: {status.error}", retry)
        if status.state is ModelState.LOADING:
            return Readiness(False, f"default model '{name}' is loading", 1.0)
        for problem in self.queue_problems().get(name, []):
            return Readiness(False, f"default model '{name}' {problem}", 1.0)
        return Readiness(True)

    def queue_problems(self) -> dict[str, list[str]]:
        """What is wrong with each model's batcher queues, in words (models without problems are
        left out).

        A queue is failing after ``FAILING_AFTER`` inputs in a row failed, until the retry
        interval has passed since the last failure (then traffic may probe it again); it is stuck
        when a batch has run longer than ``request_timeout``."""
        now = asyncio.get_running_loop().time()
        retry = self.settings.model_retry_interval_s
        stuck_after = self.settings.batching.request_timeout
        problems: dict[str, list[str]] = {}
        for q in self.batcher.stats().queues:
            recent = q.last_failure_at is not None and now - q.last_failure_at < retry
            if q.consecutive_failures >= FAILING_AFTER and recent:
                problems.setdefault(q.model, []).append(
                    f"is failing: {q.last_error} ({q.consecutive_failures} {q.modality} inputs "
                    "in a row)"
                )
            if q.running_for_s > stuck_after:
                problems.setdefault(q.model, []).append(
                    f"has had a {q.modality} batch running for {q.running_for_s:.0f} s "
                    f"(over request_timeout {stuck_after:g} s)"
                )
        return problems

    # --- deadlines and leases ------------------------------------------------------------------

    def deadline(self) -> float:
        """A new request's deadline on the event loop's clock."""
        return asyncio.get_running_loop().time() + self.settings.batching.request_timeout

    @contextlib.asynccontextmanager
    async def _serving(
        self, name: str, modalities: Sequence[Modality], deadline: float
    ) -> AsyncIterator[ModelHandle]:
        """Deadline, lease, modality check and admission for one request on one model."""
        try:
            async with asyncio.timeout_at(deadline), self.registry.use(name) as handle:
                self._require(handle, *modalities)
                await self.encoder.admit(handle, modalities, deadline)
                yield handle
        except TimeoutError:
            raise self._timeout() from None

    def _timeout(self) -> InferenceTimeoutError:
        limit = self.settings.batching.request_timeout
        return InferenceTimeoutError(
            f"the request did not finish within its {limit:g} s deadline (request_timeout)",
            detail={"request_timeout_s": limit},
        )

    @staticmethod
    def _require(handle: ModelHandle, *modalities: Modality) -> None:
        missing = [m for m in dict.fromkeys(modalities) if m not in handle.info.modalities]
        if missing:
            raise UnsupportedModalityError(
                f"model '{handle.name}' cannot encode {' or '.join(missing)} inputs "
                f"(it supports: {', '.join(sorted(handle.info.modalities))})",
                detail={"model": handle.name, "modalities": sorted(handle.info.modalities)},
            )

    def _check_image_count(self, keys: Sequence[str]) -> None:
        limit = self.settings.server.max_images_per_request
        distinct = len(set(keys))
        if distinct > limit:
            raise InvalidInputError(
                f"the request has {distinct} distinct images; the limit is {limit}",
                detail={"max_images_per_request": limit},
            )

    def _window(self, batch_size: int | None) -> int:
        """How many of one request's inputs are in flight at once: two batches, so the next one
        is prepared while the current one runs."""
        return 2 * (batch_size or self.settings.batching.max_batch_size)

    # --- evaluation ----------------------------------------------------------------------------

    async def evaluate_one(self, item: EvalItem) -> EvalResult:
        """Score one pair; raises its error instead of returning it."""
        (result,) = await self.evaluate([item])
        if result.error is not None:
            raise result.error
        return result

    async def evaluate(
        self,
        items: Sequence[EvalItem],
        *,
        batch_size: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> list[EvalResult]:
        """Score pairs; results in input order, a failing item carries its error.

        ``batch_size`` bounds how many of this request's pairs are prepared ahead; forward passes
        hold up to ``batching.max_batch_size`` items, shared with concurrent requests."""
        self._check_image_count([image_key(it.image) for it in items])
        deadline = self.deadline()
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(self.resolve_model(item.model), []).append(index)
        results: list[EvalResult | None] = [None] * len(items)
        counter = _Progress(len(items), progress)
        window = self._window(batch_size or self.settings.eval_batch_size)
        await asyncio.gather(
            *(
                self._evaluate_group(name, items, indices, results, window, deadline, counter)
                for name, indices in groups.items()
            )
        )
        return [r for r in results if r is not None]

    async def _evaluate_group(
        self,
        name: str,
        all_items: Sequence[EvalItem],
        indices: list[int],
        results: list[EvalResult | None],
        window: int,
        deadline: float,
        progress: _Progress,
    ) -> None:
        started = time.perf_counter()
        items = [all_items[i] for i in indices]
        per_key = Counter(image_key(it.image) for it in items)
        images: dict[str, torch.Tensor | ClipServeError] = {}
        texts: dict[str, TextOutcome | ClipServeError] = {}
        reported = 0

        def image_done(key: str) -> None:
            nonlocal reported
            reported += per_key[key]
            progress.advance(per_key[key])

        failure: ClipServeError = InferenceError("no result was produced for this item")
        try:
            async with self._serving(name, ("image", "text"), deadline) as handle:
                await asyncio.gather(
                    self.encoder.images(
                        handle,
                        [it.image for it in items],
                        deadline=deadline,
                        window=window,
                        out=images,
                        on_done=image_done,
                    ),
                    self.encoder.texts(
                        handle,
                        [it.text for it in items],
                        deadline=deadline,
                        window=window,
                        out=texts,
                    ),
                )
        except ClipServeError as exc:  # the model or the deadline: whatever is not done fails
            failure = exc
            progress.advance(len(items) - reported)
        elapsed = (time.perf_counter() - started) * 1000
        scored = 0
        for index, item in zip(indices, items, strict=True):
            image = images.get(image_key(item.image), failure)
            text = texts.get(item.text, failure)
            if isinstance(image, torch.Tensor) and isinstance(text, TextOutcome):
                score = float(clip_scores(image[None], text.embedding[None])[0])
                self.metrics.clip_score_distribution.labels(name).observe(score)
                results[index] = EvalResult(name, score, None, text.truncated, elapsed)
                scored += 1
                continue
            error = image if isinstance(image, ClipServeError) else text
            assert isinstance(error, ClipServeError)
            self.metrics.evaluation_errors_total.labels(name, type(error).__name__).inc()
            results[index] = EvalResult(name, None, error, processing_time_ms=elapsed)
        self.metrics.evaluations_total.labels(name).inc(scored)

    # --- embeddings ----------------------------------------------------------------------------

    async def embed(
        self,
        model: str | None,
        inputs: Sequence[Content],
        *,
        batch_size: int | None = None,
        where: Where | None = None,
        dimensions: int | None = None,
    ) -> Embeddings:
        """L2-normalised embeddings of texts and images, in input order. The first failing
        input's error is raised, naming the input (``where(i)``, default ``input[i]``).

        ``dimensions`` truncates (and re-normalises) the embeddings, where the model's spec says
        it was trained for that (``matryoshka_dims``); otherwise it must equal ``embed_dim``."""
        self._check_image_count([image_key(c.value) for c in inputs if c.modality == "image"])
        name = self.resolve_model(model)
        deadline = self.deadline()
        modalities = tuple(dict.fromkeys(c.modality for c in inputs)) or ("text",)
        async with self._serving(name, modalities, deadline) as handle:
            if dimensions is not None:
                self._check_dimensions(handle, dimensions)
            embedded = await self._embed_leased(handle, inputs, deadline, batch_size, where)
        if dimensions is None or dimensions == embedded.vectors.shape[1]:
            return embedded
        vectors = embedded.vectors[:, :dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return dataclasses.replace(embedded, vectors=vectors / np.maximum(norms, 1e-12))

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

    async def _embed_leased(
        self,
        handle: ModelHandle,
        inputs: Sequence[Content],
        deadline: float,
        batch_size: int | None,
        where: Where | None,
    ) -> Embeddings:
        name_of = where or _input
        texts: list[str] = []
        for i, content in enumerate(inputs):
            if content.modality == "text":
                if not isinstance(content.value, str):
                    raise InvalidInputError(f"{name_of(i)}: a text input must be a string")
                texts.append(content.value)
        images = [c.value for c in inputs if c.modality == "image"]
        window = self._window(batch_size)
        text_out: dict[str, TextOutcome | ClipServeError] = {}
        image_out: dict[str, torch.Tensor | ClipServeError] = {}
        await asyncio.gather(
            self.encoder.texts(handle, texts, deadline=deadline, window=window, out=text_out),
            self.encoder.images(handle, images, deadline=deadline, window=window, out=image_out),
        )
        rows: list[torch.Tensor] = []
        counts: list[int] = []
        truncated: list[bool] = []
        for i, content in enumerate(inputs):
            value = content.value
            outcome = (
                text_out[value]
                if content.modality == "text" and isinstance(value, str)
                else image_out[image_key(value)]
            )
            if isinstance(outcome, ClipServeError):
                raise _indexed(outcome, name_of(i)) if len(inputs) > 1 else outcome
            if isinstance(outcome, TextOutcome):
                rows.append(outcome.embedding)
                counts.append(outcome.token_count)
                truncated.append(outcome.truncated)
            else:
                rows.append(outcome)
                counts.append(0)
                truncated.append(False)
        dim = handle.info.embed_dim
        vectors = torch.stack(rows).float().numpy() if rows else np.zeros((0, dim), np.float32)
        return Embeddings(handle.name, vectors, tuple(counts), tuple(truncated))

    async def embed_texts(
        self, model: str | None, texts: Sequence[str], *, batch_size: int | None = None
    ) -> Embeddings:
        return await self.embed(model, [Content.text(t) for t in texts], batch_size=batch_size)

    async def embed_images(
        self, model: str | None, images: Sequence[ImageInput], *, batch_size: int | None = None
    ) -> np.ndarray:
        """(n, d) L2-normalised image embeddings; raises the first failing item's error."""
        embedded = await self.embed(
            model, [Content.image(i) for i in images], batch_size=batch_size
        )
        return embedded.vectors

    # --- retrieval -----------------------------------------------------------------------------

    async def rank(
        self, model: str | None, query: Content, documents: Sequence[Content]
    ) -> Ranking:
        """Documents sorted by cosine similarity to the query (ties keep document order)."""
        embedded = await self.embed(
            model,
            [query, *documents],
            where=lambda i: "query" if i == 0 else f"documents[{i - 1}]",
        )
        scores = embedded.vectors[1:] @ embedded.vectors[0]
        order = sorted(range(len(documents)), key=lambda i: -float(scores[i]))
        return Ranking(
            embedded.model,
            tuple(Ranked(i, float(scores[i])) for i in order),
            sum(embedded.token_counts),
        )

    async def classify(
        self,
        model: str | None,
        images: Sequence[ImageInput],
        labels: Sequence[str],
        template: str = "a photo of a {}",
    ) -> list[list[LabelScore]]:
        """Zero-shot classification: per image, labels sorted by probability (softmax over
        ``logit_scale * cos`` for CLIP, an independent sigmoid per label for SigLIP)."""
        if "{}" not in template:
            raise InvalidInputError(
                "template must contain '{}' where the label goes, e.g. 'a photo of a {}'",
                detail={"template": template},
            )
        self._check_image_count([image_key(i) for i in images])
        name = self.resolve_model(model)
        deadline = self.deadline()
        prompts = [template.replace("{}", label) for label in labels]
        async with self._serving(name, ("image", "text"), deadline) as handle:
            text_vectors = await self._label_vectors(handle, prompts, deadline)
            embedded = await self._embed_leased(
                handle,
                [Content.image(i) for i in images],
                deadline,
                None,
                None,
            )
            scale, bias = handle.backend.logit_scale, handle.backend.logit_bias
        cos = torch.from_numpy(embedded.vectors) @ text_vectors.T
        if bias is None:
            probabilities = torch.softmax(cos * scale, dim=-1)
        else:
            probabilities = sigmoid_probabilities(cos, scale, bias)
        out = []
        for row_cos, row_p in zip(cos.tolist(), probabilities.tolist(), strict=True):
            scores = [LabelScore(j, labels[j], row_cos[j], row_p[j]) for j in range(len(labels))]
            out.append(sorted(scores, key=lambda s: -s.probability))
        return out

    async def _label_vectors(
        self, handle: ModelHandle, prompts: Sequence[str], deadline: float
    ) -> torch.Tensor:
        """Prompt embeddings, from the per-model cache where possible."""
        found = {p: self.label_cache.get(handle, p) for p in dict.fromkeys(prompts)}
        todo = [p for p, hit in found.items() if hit is None]
        if todo:
            out: dict[str, TextOutcome | ClipServeError] = {}
            await self.encoder.texts(
                handle, todo, deadline=deadline, window=self._window(None), out=out
            )
            for prompt in todo:
                outcome = out[prompt]
                if isinstance(outcome, ClipServeError):
                    raise _indexed(outcome, f"label prompt {prompt!r}")
                self.label_cache.put(handle, prompt, outcome)
                found[prompt] = outcome
        return torch.stack([found[p].embedding for p in prompts]).float()  # type: ignore[union-attr]


def _input(i: int) -> str:
    return f"input[{i}]"


class _Progress:
    """Counts items whose image has been encoded (or failed) and reports to an optional callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total, self.done, self._callback = total, 0, callback

    def advance(self, n: int) -> None:
        if n <= 0:
            return
        self.done = min(self.total, self.done + n)
        if self._callback is not None:
            self._callback(self.done, self.total)
