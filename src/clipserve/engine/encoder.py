"""Encoding a request's texts and images through its model's batcher queues.

A model's queues are built once, when it loads (:meth:`Encoder.build_queues` is the registry's
``on_load``). Each request deduplicates its inputs (an image or text that appears twice is fetched
and encoded once; an image's identity is computed once, in :func:`image_ref`) and keeps at most
``window`` of them in flight: images are fetched, then decoded and preprocessed in one job on the
CPU pool, while earlier ones wait in the queue or run, so a big request is pipelined and a small
one shares forward passes with whatever else is queued.

With a cache (:mod:`clipserve.engine.cache`, unless the request opts out: ``Scope.cache``), a text
is looked up by its UTF-8's sha256 before it is queued, and an image (not a PIL image) is read
first (a URL fetched, a data URI decoded, a file read) and looked up by its bytes' sha256: a hit
skips the decode and the forward pass, and concurrent identical inputs are computed once.

Contract: :meth:`Encoder.texts` and :meth:`Encoder.images` return one outcome per distinct input,
a result or that input's :class:`~clipserve.errors.ClipServeError` (its deadline passing
included); they raise only when cancelled.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from clipserve.config import Settings
from clipserve.engine.batcher import Batcher, BatchQueue, FailedItem, deadline_error
from clipserve.engine.cache import CachedEmbedding, EmbeddingCache, text_digest
from clipserve.engine.capacity import probe_batch_size
from clipserve.engine.registry import ModelHandle
from clipserve.errors import (
    ClipServeError,
    InferenceError,
    InvalidInputError,
)
from clipserve.media import EncodedImage, ImageInput, ImageLoader
from clipserve.media.budget import PixelWindow
from clipserve.models.base import (
    Backend,
    CaptionBackend,
    CaptionInput,
    FailedGeneration,
    GenerationOptions,
    GenerativeTask,
    Modality,
    TokenizedTexts,
)
from clipserve.observability.metrics import Metrics
from clipserve.observability.tracing import Tracing

logger = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

_PROBE_TEXT = "a photo of " + "a very long caption " * 40  # truncated to the full context
UNPAIRED_SURROGATE = re.compile("[\ud800-\udfff]")
"""A lone UTF-16 surrogate: legal in JSON strings, not valid Unicode (cannot be UTF-8 encoded)."""


@dataclass(frozen=True, slots=True)
class TextOutcome:
    embedding: torch.Tensor
    truncated: bool
    token_count: int


@dataclass(frozen=True, slots=True)
class Scope:
    """One request's bounds, for everything it sends through the encoder: its ``deadline`` (on the
    event loop's clock), its inputs in flight at once (``window``, never above the client's share
    of a queue), its ``client`` (whose share of each queue it counts against), its window of
    decoded pixels, and whether it may use the embedding cache (read it and fill it)."""

    deadline: float
    window: int
    client: str
    pixels: PixelWindow
    cache: bool = True


@dataclass(frozen=True, slots=True)
class ImageRef:
    """An image input with its identity within a request (computed once)."""

    key: str
    value: ImageInput


def image_ref(value: ImageInput) -> ImageRef:
    """Strings are their own key; bytes are keyed by their digest; PIL images by identity."""
    if isinstance(value, str):
        return ImageRef(value, value)
    if isinstance(value, bytes):
        return ImageRef("bytes:" + hashlib.sha1(value, usedforsecurity=False).hexdigest(), value)
    return ImageRef(f"pil:{id(value)}", value)


def stack(vectors: Sequence[torch.Tensor], dim: int = 0) -> np.ndarray:
    """``(n, dim)`` float32 rows of CPU vectors, copied with numpy: no torch operator runs off the
    device thread (see :mod:`clipserve.engine.executor`)."""
    if not vectors:
        return np.zeros((0, dim), np.float32)
    return np.stack([v.numpy() for v in vectors]).astype(np.float32, copy=False)


TextOutcomes = dict[str, TextOutcome | ClipServeError]
ImageOutcomes = dict[str, torch.Tensor | ClipServeError]


def text_problem(text: str, max_chars: int) -> InvalidInputError | None:
    """Why ``text`` cannot be encoded, or None."""
    if not text.strip():
        return InvalidInputError("the text is empty (or only whitespace)")
    if len(text) > max_chars:
        return InvalidInputError(
            f"text is {len(text)} characters long; the limit is {max_chars}",
            detail={"max_prompt_chars": max_chars},
        )
    if UNPAIRED_SURROGATE.search(text):
        return InvalidInputError(
            "text holds an unpaired UTF-16 surrogate (such as \\ud800), which is not "
            "valid Unicode; send the whole character or drop it"
        )
    return None


def dummy_forward(backend: Backend, modality: Modality) -> Callable[[int], object]:
    """``forward(n)``: one forward pass of ``n`` worst-case dummy inputs (blank images, texts
    filling the context; for a generative model, blank images decoded to the default length), on
    the device thread; the batch size probe and the warm-up run it. A remote model's is a no-op:
    nothing here to warm, and calls cost money."""
    if modality in ("caption", "answer"):
        if not isinstance(backend, CaptionBackend) or not backend.local:
            return lambda n: None
        size = backend.info.image_size or 224
        task: GenerativeTask = "answer" if modality == "answer" else "caption"
        question = "what is in the picture?" if task == "answer" else None

        def generate(n: int) -> object:
            pixels = backend.preprocess(Image.new("RGB", (size, size)))
            return backend.generate([CaptionInput(pixels, task, question)] * n)

        return generate
    if modality == "image":
        size = backend.info.image_size or 224

        def images(n: int) -> object:  # the backend's own input for a blank image (any layout)
            pixels = backend.preprocess(Image.new("RGB", (size, size)))
            return backend.encode_images(torch.stack([pixels] * n))

        return images

    def texts(n: int) -> object:
        return backend.encode_texts(backend.tokenize([_PROBE_TEXT] * n))

    return texts


class Encoder:
    def __init__(
        self,
        settings: Settings,
        *,
        batcher: Batcher,
        images: ImageLoader,
        metrics: Metrics,
        cache: EmbeddingCache | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._settings = settings
        self._batcher = batcher
        self._images = images
        self._metrics = metrics
        self._cache = cache
        self._tracing = tracing or Tracing()

    # --- queues --------------------------------------------------------------------------------

    def build_queues(self, handle: ModelHandle) -> None:
        """Create (and start) the model's queues, one per modality it encodes."""
        handle.queues = {m: self._queue(handle, m) for m in sorted(handle.info.modalities)}
        if self._cache is not None:
            self._cache.identity(handle)  # computed once, off the request path

    def _queue(self, handle: ModelHandle, modality: Modality) -> BatchQueue[Any, Any]:
        backend = handle.backend
        run: Callable[[Any], Any]
        prepare: Callable[[list[Any]], Any] | None
        if modality in ("caption", "answer"):
            run = _generator(backend)
            prepare = None
        elif modality == "image":

            def run(pixels: list[torch.Tensor]) -> torch.Tensor:
                # Stacked on the device thread: a torch op elsewhere would start an OpenMP team
                # that competes with the encoder's.
                return backend.encode_images(torch.stack(pixels))

            prepare = None

        else:

            def run(tokens: TokenizedTexts) -> list[TextOutcome]:
                vectors = backend.encode_texts(tokens)
                return [
                    TextOutcome(vectors[i], tokens.truncated[i], tokens.token_counts[i])
                    for i in range(len(tokens))
                ]

            prepare = backend.tokenize

        limit = self._settings.batching.max_batch_size
        # Probed on CUDA only: elsewhere batch sizes are what the settings say (see capacity).
        probe = (
            partial(probe_batch_size, handle.device, dummy_forward(backend, modality), limit)
            if handle.device.startswith("cuda")
            else None
        )
        return self._batcher.queue(
            handle,
            model=handle.name,
            modality=modality,
            device=handle.device,
            device_executor=handle.executor,
            run=run,
            prepare=prepare,
            probe=probe,
        )

    async def admit(
        self, handle: ModelHandle, modalities: Iterable[Modality], scope: Scope
    ) -> None:
        """Refuse (429) or hold a new request while a queue it needs is full."""
        overflow = self._settings.batching.queue_overflow_action
        for modality in dict.fromkeys(modalities):
            await handle.queues[modality].admit(overflow, scope.deadline, scope.client)

    # --- texts ---------------------------------------------------------------------------------

    async def texts(self, handle: ModelHandle, values: Sequence[str], scope: Scope) -> TextOutcomes:
        """Encode each distinct text: its outcome, or its error."""
        limit = self._settings.server.max_prompt_chars
        out: TextOutcomes = {}
        todo: dict[str, str] = {}
        for text in dict.fromkeys(values):
            problem = text_problem(text, limit)
            if problem is None:
                todo[text] = text
            else:
                out[text] = problem

        if not todo:
            return out
        queue: BatchQueue[str, TextOutcome] = handle.queues["text"]
        cache = self._cache if scope.cache else None
        if len(todo) > queue.max_batch_size:
            # Queued shortest first, so each batch holds texts of similar length: a batch runs
            # to its longest text (trimmed towers, padding="longest"), so mixing a long caption
            # into a batch of short ones would make them all pay its length.
            todo = dict(sorted(todo.items(), key=lambda item: len(item[0])))

        async def encode(text: str) -> TextOutcome:
            if cache is None:
                return await _submit(queue, text, scope)

            async def compute() -> CachedEmbedding:
                outcome = await _submit(queue, text, scope)
                return CachedEmbedding(
                    _owned(outcome.embedding), outcome.token_count, outcome.truncated
                )

            hit = await cache.get_or_compute(cache.key(handle, "text", text_digest(text)), compute)
            return TextOutcome(torch.from_numpy(hit.vector), hit.truncated, hit.token_count)

        out.update(await _through(queue, todo, encode, scope))
        return out

    # --- images --------------------------------------------------------------------------------

    async def images(
        self,
        handle: ModelHandle,
        refs: Sequence[ImageRef],
        scope: Scope,
        *,
        on_done: Callable[[str], None] | None = None,
    ) -> ImageOutcomes:
        """Fetch, decode, preprocess and encode each distinct image: its embedding or error."""
        unique = {ref.key: ref.value for ref in refs}
        if not unique:
            return {}
        queue: BatchQueue[torch.Tensor, torch.Tensor] = handle.queues["image"]
        cache = self._cache if scope.cache else None
        preprocess = handle.spec.preprocess  # the same for the key and the decode

        draft = handle.info.image_size if preprocess == "fast" else None
        prepare = partial(self._prepare, handle, scope=scope, draft=draft)

        async def encode(value: ImageInput) -> torch.Tensor:
            if cache is None or isinstance(value, Image.Image):  # PIL images have no bytes
                return await _submit(queue, await prepare(value), scope)
            encoded = await self._images.read(value)

            async def compute() -> CachedEmbedding:
                return CachedEmbedding(_owned(await _submit(queue, await prepare(encoded), scope)))

            key = cache.key(handle, f"image/{preprocess}", encoded.sha256)
            return torch.from_numpy((await cache.get_or_compute(key, compute)).vector)

        return await _through(queue, unique, encode, scope, on_done=on_done)

    # --- generation ----------------------------------------------------------------------------

    async def generate(
        self,
        handle: ModelHandle,
        task: GenerativeTask,
        refs: Sequence[ImageRef],
        scope: Scope,
        *,
        prompt: str | None = None,
        options: GenerationOptions = GenerationOptions(),
    ) -> dict[str, str | ClipServeError]:
        """Fetch, decode and preprocess each distinct image and generate its caption (or its
        answer to ``prompt``, the question) through the model's ``task`` queue: its text or
        error. Generated texts are not cached (decoding options vary per request)."""
        unique = {ref.key: ref.value for ref in refs}
        if not unique:
            return {}
        queue: BatchQueue[CaptionInput, str] = handle.queues[task]

        async def caption(value: ImageInput) -> str:
            pixels = await self._prepare(handle, value, scope=scope)
            return await _submit(queue, CaptionInput(pixels, task, prompt, options), scope)

        return await _through(queue, unique, caption, scope)

    async def _prepare(
        self,
        handle: ModelHandle,
        value: ImageInput | EncodedImage,
        *,
        scope: Scope,
        draft: int | None = None,
    ) -> torch.Tensor:
        """Fetch (unless read already), decode and preprocess one image for ``handle``, within
        the request's pixel window and deadline; the time is observed per source."""
        started = time.perf_counter()
        with self._tracing.span("fetch, decode, preprocess"):
            loaded = await self._images.load(
                value,
                handle.backend.preprocess,
                window=scope.pixels,
                timeout=scope.deadline - asyncio.get_running_loop().time(),
                draft=draft,
            )
        elapsed = time.perf_counter() - started
        if isinstance(value, EncodedImage):  # read before: count its read too
            elapsed += value.read_seconds
        self._metrics.image_processing_time_seconds.labels(loaded.source.value).observe(elapsed)
        return loaded.image


def _generator(backend: Backend) -> Callable[[list[CaptionInput]], list[str | FailedItem]]:
    """A generative model's batch: its texts; an input that failed alone is answered its
    error."""
    if not isinstance(backend, CaptionBackend):
        raise TypeError(f"{type(backend).__name__} is not a generative model")

    def run(inputs: list[CaptionInput]) -> list[str | FailedItem]:
        return [
            FailedItem(as_error(r.error, "generating text"))
            if isinstance(r, FailedGeneration)
            else r
            for r in backend.generate(inputs)
        ]

    return run


def as_error(exc: BaseException, what: str) -> ClipServeError:
    if isinstance(exc, ClipServeError):
        return exc
    logger.error("unexpected error while %s", what, exc_info=exc)
    return InferenceError(f"internal error while {what}")


def _owned(vector: torch.Tensor) -> np.ndarray:
    """A float32 copy of one row (a view would keep its whole batch alive in the cache)."""
    return np.array(vector.numpy(), dtype=np.float32)


async def _submit(queue: BatchQueue[Any, V], payload: Any, scope: Scope) -> V:
    (future,) = await queue.submit([payload], deadline=scope.deadline, client=scope.client)
    return await future


async def _through(
    queue: BatchQueue[Any, Any],
    inputs: Mapping[str, K],
    encode: Callable[[K], Awaitable[V]],
    scope: Scope,
    *,
    on_done: Callable[[str], None] | None = None,
) -> dict[str, V | ClipServeError]:
    """Encode each input (prepare it and put it through ``queue``, or find it in the cache), at
    most ``scope.window`` at a time, each under the request's deadline; returns each key's result
    or error."""
    deadline = scope.deadline
    slots = asyncio.Semaphore(max(1, scope.window))
    out: dict[str, V | ClipServeError] = {}

    async def one(key: str, value: K) -> None:
        try:
            async with asyncio.timeout_at(deadline), slots:
                out[key] = await encode(value)
        except TimeoutError:
            out[key] = deadline_error(queue.settings)
        except ClipServeError as exc:
            out[key] = exc
        except Exception as exc:
            out[key] = as_error(exc, f"preparing a {queue.modality} input")
        if on_done is not None:
            on_done(key)

    if len(inputs) == 1:  # the common single-input request: no task to spawn
        ((key, value),) = inputs.items()
        await one(key, value)
    else:
        await asyncio.gather(*(one(key, value) for key, value in inputs.items()))
    return out
