"""The engine: everything between a parsed request and the model backends.

It owns the model registry, the image loader and the thread pools. Evaluations are grouped by model,
deduplicated (an image or text that appears twice is fetched and encoded once), and run as a
pipeline of
forward passes of up to ``batch_size`` items: while one chunk is on the device, the next chunk's
images
are fetched, decoded and preprocessed on the CPU pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from clipserve.config import Settings
from clipserve.engine.executor import Executors
from clipserve.engine.registry import BackendLoader, ModelHandle, ModelRegistry
from clipserve.errors import (
    ClipServeError,
    InferenceError,
    InvalidInputError,
    UnsupportedModalityError,
)
from clipserve.media import ImageInput, ImageLoader
from clipserve.models.base import Modality, TokenizedTexts, clip_scores
from clipserve.models.loader import load_backend
from clipserve.observability.metrics import Metrics

logger = logging.getLogger(__name__)

P = TypeVar("P")
ProgressCallback = Callable[[int, int], None]


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
class TextEmbeddings:
    vectors: np.ndarray
    """(n, d) float32, L2-normalised."""
    token_counts: tuple[int, ...]
    truncated: tuple[bool, ...]


@dataclass(frozen=True, slots=True)
class _TextOutcome:
    embedding: torch.Tensor
    truncated: bool
    token_count: int


def image_key(value: ImageInput) -> str:
    """Identity of an image input for deduplication within one request."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return "bytes:" + hashlib.sha1(value, usedforsecurity=False).hexdigest()
    return f"pil:{id(value)}"


def _chunks(n: int, size: int) -> list[range]:
    return [range(k, min(k + size, n)) for k in range(0, n, size)]


def _as_error(exc: BaseException, what: str) -> ClipServeError:
    if isinstance(exc, ClipServeError):
        return exc
    logger.error("unexpected error while %s", what, exc_info=exc)
    return InferenceError(f"internal error while {what}")


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
        self.executors = Executors(settings.media.decode_workers)
        self.registry = ModelRegistry(
            settings,
            loader=loader or load_backend,
            executors=self.executors,
            metrics=self.metrics,
        )
        self.images = ImageLoader(settings.media, executor=self.executors.cpu)
        self.started_at = time.time()
        self._watcher: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        interval = self.settings.config_reload_interval_s
        if self.settings.config_path is not None and interval > 0:
            self._watcher = asyncio.create_task(self.registry.watch(interval), name="config-watch")
        if self.settings.preload:
            await self.registry.preload()

    async def close(self) -> None:
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
        """Score pairs; results in input order, a failing item carries its error."""
        size = batch_size or self.settings.eval_batch_size
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(self.resolve_model(item.model), []).append(index)
        results: list[EvalResult | None] = [None] * len(items)
        counter = _Progress(len(items), progress)
        await asyncio.gather(
            *(
                self._evaluate_group(
                    name, [items[i] for i in indices], indices, results, size, counter
                )
                for name, indices in groups.items()
            )
        )
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    async def _evaluate_group(
        self,
        name: str,
        items: list[EvalItem],
        indices: list[int],
        results: list[EvalResult | None],
        batch_size: int,
        progress: _Progress,
    ) -> None:
        started = time.perf_counter()
        errors = self.metrics.evaluation_errors_total
        per_key = Counter(image_key(it.image) for it in items)

        def fail(index: int, error: ClipServeError) -> None:
            errors.labels(name, type(error).__name__).inc()
            results[index] = EvalResult(
                name, None, error, processing_time_ms=(time.perf_counter() - started) * 1000
            )

        try:
            async with self.registry.use(name) as handle:
                self._require(handle, "image", "text")
                images, texts = await asyncio.gather(
                    self._embed_unique_images(
                        handle,
                        [it.image for it in items],
                        batch_size,
                        on_chunk=lambda keys: progress.advance(sum(per_key[k] for k in keys)),
                    ),
                    self._embed_unique_texts(handle, [it.text for it in items], batch_size),
                )
        except ClipServeError as exc:
            for index in indices:
                fail(index, exc)
            progress.advance(len(indices))
            return
        elapsed = (time.perf_counter() - started) * 1000
        scored = 0
        for index, item in zip(indices, items, strict=True):
            image = images[image_key(item.image)]
            text = texts[item.text]
            if isinstance(image, ClipServeError):
                fail(index, image)
            elif isinstance(text, ClipServeError):
                fail(index, text)
            else:
                score = float(clip_scores(image[None], text.embedding[None])[0])
                self.metrics.clip_score_distribution.labels(name).observe(score)
                results[index] = EvalResult(name, score, None, text.truncated, elapsed)
                scored += 1
        self.metrics.evaluations_total.labels(name).inc(scored)

    @staticmethod
    def _require(handle: ModelHandle, *modalities: Modality) -> None:
        missing = [m for m in modalities if m not in handle.info.modalities]
        if missing:
            raise UnsupportedModalityError(
                f"model '{handle.name}' cannot encode {' or '.join(missing)} inputs "
                f"(it supports: {', '.join(sorted(handle.info.modalities))})",
                detail={"model": handle.name, "modalities": sorted(handle.info.modalities)},
            )

    # --- embeddings ----------------------------------------------------------------------------

    async def embed_texts(
        self, model: str | None, texts: Sequence[str], *, batch_size: int | None = None
    ) -> TextEmbeddings:
        """L2-normalised text embeddings; raises on failure."""
        async with self.registry.use(self.resolve_model(model)) as handle:
            self._require(handle, "text")
            outcomes = await self._embed_unique_texts(
                handle, list(texts), batch_size or self.settings.eval_batch_size
            )
        rows = []
        for text in texts:
            outcome = outcomes[text]
            if isinstance(outcome, ClipServeError):
                raise outcome
            rows.append(outcome)
        vectors = torch.stack([r.embedding for r in rows]).numpy() if rows else np.zeros((0, 0))
        return TextEmbeddings(
            vectors=vectors.astype(np.float32, copy=False),
            token_counts=tuple(r.token_count for r in rows),
            truncated=tuple(r.truncated for r in rows),
        )

    async def embed_images(
        self, model: str | None, images: Sequence[ImageInput], *, batch_size: int | None = None
    ) -> np.ndarray:
        """(n, d) L2-normalised image embeddings; raises the first item's error, if any."""
        async with self.registry.use(self.resolve_model(model)) as handle:
            self._require(handle, "image")
            outcomes = await self._embed_unique_images(
                handle, list(images), batch_size or self.settings.eval_batch_size
            )
        rows = []
        for value in images:
            outcome = outcomes[image_key(value)]
            if isinstance(outcome, ClipServeError):
                raise outcome
            rows.append(outcome)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return torch.stack(rows).numpy().astype(np.float32, copy=False)

    # --- the pipeline --------------------------------------------------------------------------

    async def _embed_unique_images(
        self,
        handle: ModelHandle,
        values: list[ImageInput],
        batch_size: int,
        on_chunk: Callable[[list[str]], None] | None = None,
    ) -> dict[str, torch.Tensor | ClipServeError]:
        unique: dict[str, ImageInput] = {}
        for value in values:
            unique.setdefault(image_key(value), value)
        keys = list(unique)
        out: dict[str, torch.Tensor | ClipServeError] = {}

        def stack_and_encode(tensors: list[torch.Tensor]) -> torch.Tensor:
            # On the device thread: a torch op on the event loop thread would start an OpenMP
            # team there that competes with the encoder's.
            return handle.backend.encode_images(torch.stack(tensors))

        async def prepare(chunk: range) -> list[torch.Tensor | BaseException]:
            return await asyncio.gather(
                *(self._prepare_image(handle, unique[keys[i]]) for i in chunk),
                return_exceptions=True,
            )

        async def run(chunk: range, prepared: list[torch.Tensor | BaseException]) -> None:
            await encode(chunk, prepared)
            if on_chunk is not None:
                on_chunk([keys[i] for i in chunk])

        async def encode(chunk: range, prepared: list[torch.Tensor | BaseException]) -> None:
            ready: list[tuple[str, torch.Tensor]] = []
            for i, pixels in zip(chunk, prepared, strict=True):
                if isinstance(pixels, BaseException):
                    out[keys[i]] = _as_error(pixels, "preparing an image")
                else:
                    ready.append((keys[i], pixels))
            if not ready:
                return
            try:
                embeddings = await self._forward(
                    handle, "image", stack_and_encode, [pixels for _, pixels in ready]
                )
            except ClipServeError as exc:
                out.update((key, exc) for key, _ in ready)
                return
            out.update((key, row) for (key, _), row in zip(ready, embeddings, strict=True))

        await self._pipelined(len(keys), batch_size, prepare, run)
        return out

    async def _prepare_image(self, handle: ModelHandle, value: ImageInput) -> torch.Tensor:
        started = time.perf_counter()
        loaded = await self.images.load(value)
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(
            self.executors.cpu, handle.backend.preprocess, loaded.image
        )
        self.metrics.image_processing_time_seconds.labels(loaded.source.value).observe(
            time.perf_counter() - started
        )
        return pixels

    async def _embed_unique_texts(
        self, handle: ModelHandle, values: list[str], batch_size: int
    ) -> dict[str, _TextOutcome | ClipServeError]:
        limit = self.settings.server.max_prompt_chars
        out: dict[str, _TextOutcome | ClipServeError] = {}
        keys: list[str] = []
        for text in dict.fromkeys(values):
            if len(text) > limit:
                out[text] = InvalidInputError(
                    f"text is {len(text)} characters long; the limit is {limit}",
                    detail={"max_prompt_chars": limit},
                )
            else:
                keys.append(text)
        loop = asyncio.get_running_loop()

        async def prepare(chunk: range) -> TokenizedTexts:
            texts = [keys[i] for i in chunk]
            return await loop.run_in_executor(self.executors.cpu, handle.backend.tokenize, texts)

        async def run(chunk: range, tokens: TokenizedTexts) -> None:
            try:
                embeddings = await self._forward(
                    handle, "text", handle.backend.encode_texts, tokens
                )
            except ClipServeError as exc:
                out.update((keys[i], exc) for i in chunk)
                return
            for j, i in enumerate(chunk):
                out[keys[i]] = _TextOutcome(
                    embeddings[j], tokens.truncated[j], tokens.token_counts[j]
                )

        await self._pipelined(len(keys), batch_size, prepare, run)
        return out

    @staticmethod
    async def _pipelined(
        n: int,
        batch_size: int,
        prepare: Callable[[range], Awaitable[P]],
        run: Callable[[range, P], Awaitable[None]],
    ) -> None:
        """Run ``run`` over chunks in order while the next chunk is being prepared."""
        chunks = _chunks(n, batch_size)
        if not chunks:
            return
        pending: asyncio.Future[P] = asyncio.ensure_future(prepare(chunks[0]))
        try:
            for k, chunk in enumerate(chunks):
                prepared = await pending
                if k + 1 < len(chunks):
                    pending = asyncio.ensure_future(prepare(chunks[k + 1]))
                await run(chunk, prepared)
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending

    async def _forward(
        self,
        handle: ModelHandle,
        modality: Modality,
        encode: Callable[[P], torch.Tensor],
        batch: P,
    ) -> torch.Tensor:
        """One forward pass on the model's device thread, timed; failures become InferenceError."""
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            embeddings = await loop.run_in_executor(handle.executor, encode, batch)
        except ClipServeError:
            raise
        except Exception as exc:
            logger.exception("forward pass failed (model '%s', %s)", handle.name, modality)
            raise InferenceError(
                f"inference failed for model '{handle.name}' ({modality}): {type(exc).__name__}"
            ) from exc
        self.metrics.inference_time_seconds.labels(handle.name, modality).observe(
            time.perf_counter() - started
        )
        self.metrics.forward_batch_size.labels(handle.name, modality).observe(len(embeddings))
        return embeddings


class _Progress:
    """Counts items whose image has been encoded (or failed) and reports to an optional callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total, self.done, self._callback = total, 0, callback

    def advance(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if self._callback is not None:
            self._callback(self.done, self.total)
