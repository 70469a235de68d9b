"""Encoding a request's texts and images through the batcher.

Each request deduplicates its inputs (an image or text that appears twice is fetched and encoded
once) and keeps at most ``window`` of them in flight: images are fetched, decoded and preprocessed
on the CPU pool while earlier ones wait in the queue or run, so a big request is pipelined and a
small one shares forward passes with whatever else is queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from clipserve.config import Settings
from clipserve.engine.batcher import Batcher, BatchQueue, contained
from clipserve.engine.capacity import probe_batch_size
from clipserve.engine.registry import ModelHandle
from clipserve.errors import ClipServeError, InferenceError, InvalidInputError
from clipserve.media import ImageInput, ImageLoader
from clipserve.models.base import Modality, TokenizedTexts
from clipserve.observability.metrics import Metrics

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


def image_key(value: ImageInput) -> str:
    """Identity of an image input for deduplication within one request."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return "bytes:" + hashlib.sha1(value, usedforsecurity=False).hexdigest()
    return f"pil:{id(value)}"


def as_error(exc: BaseException, what: str) -> ClipServeError:
    if isinstance(exc, ClipServeError):
        return exc
    logger.error("unexpected error while %s", what, exc_info=exc)
    return InferenceError(f"internal error while {what}")


class EmbeddingCache:
    """A small LRU of text embeddings per loaded model (classification labels); entries die with
    the model."""

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


class Encoder:
    def __init__(
        self,
        settings: Settings,
        *,
        batcher: Batcher,
        images: ImageLoader,
        cpu_executor: Executor,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._batcher = batcher
        self._images = images
        self._cpu = cpu_executor
        self._metrics = metrics

    # --- queues --------------------------------------------------------------------------------

    def queue(self, handle: ModelHandle, modality: Modality) -> BatchQueue[Any, Any]:
        """The model's queue for one modality (created, and on CUDA probed, on first use)."""
        backend = handle.backend
        run: Callable[[Any], Any]
        prepare: Callable[[list[Any]], Any] | None
        dummy: Callable[[int], object]
        if modality == "image":
            size = backend.info.image_size or 224

            def run(pixels: list[torch.Tensor]) -> torch.Tensor:
                # Stacked on the device thread: a torch op elsewhere would start an OpenMP team
                # that competes with the encoder's.
                return backend.encode_images(torch.stack(pixels))

            prepare = None

            def dummy(n: int) -> object:
                return backend.encode_images(torch.zeros(n, 3, size, size))

        else:

            def run(tokens: TokenizedTexts) -> list[TextOutcome]:
                vectors = backend.encode_texts(tokens)
                return [
                    TextOutcome(vectors[i], tokens.truncated[i], tokens.token_counts[i])
                    for i in range(len(tokens))
                ]

            prepare = backend.tokenize

            def dummy(n: int) -> object:
                return backend.encode_texts(backend.tokenize([_PROBE_TEXT] * n))

        limit = self._settings.batching.max_batch_size
        return self._batcher.queue(
            handle,
            model=handle.name,
            modality=modality,
            device=handle.device,
            device_executor=handle.executor,
            run=run,
            prepare=prepare,
            probe=lambda: probe_batch_size(handle.device, dummy, limit),
        )

    async def admit(
        self, handle: ModelHandle, modalities: Iterable[Modality], deadline: float
    ) -> None:
        """Refuse (429) or hold a new request while a queue it needs is full."""
        overflow = self._settings.batching.queue_overflow_action
        for modality in dict.fromkeys(modalities):
            await self.queue(handle, modality).admit(overflow, deadline)

    # --- texts ---------------------------------------------------------------------------------

    async def texts(
        self,
        handle: ModelHandle,
        values: Sequence[str],
        *,
        deadline: float,
        window: int,
        out: dict[str, TextOutcome | ClipServeError],
    ) -> None:
        """Encode each distinct text into ``out`` (an outcome or the item's error)."""
        limit = self._settings.server.max_prompt_chars
        todo: dict[str, str] = {}
        for text in dict.fromkeys(values):
            if len(text) > limit:
                out[text] = InvalidInputError(
                    f"text is {len(text)} characters long; the limit is {limit}",
                    detail={"max_prompt_chars": limit},
                )
            elif UNPAIRED_SURROGATE.search(text):
                out[text] = InvalidInputError(
                    "text holds an unpaired UTF-16 surrogate (such as \\ud800), which is not "
                    "valid Unicode; send the whole character or drop it"
                )
            else:
                todo[text] = text
        if not todo:
            return

        async def as_payload(text: str) -> str:
            return text

        queue = self.queue(handle, "text")
        await _through(queue, todo, as_payload, deadline=deadline, window=window, out=out)

    # --- images --------------------------------------------------------------------------------

    async def images(
        self,
        handle: ModelHandle,
        values: Sequence[ImageInput],
        *,
        deadline: float,
        window: int,
        out: dict[str, torch.Tensor | ClipServeError],
        on_done: Callable[[str], None] | None = None,
    ) -> None:
        """Fetch, decode, preprocess and encode each distinct image into ``out``."""
        unique: dict[str, ImageInput] = {}
        for value in values:
            unique.setdefault(image_key(value), value)
        if not unique:
            return
        queue = self.queue(handle, "image")

        async def prepare(value: ImageInput) -> torch.Tensor:
            return await self._prepare_image(handle, value)

        await _through(
            queue, unique, prepare, deadline=deadline, window=window, out=out, on_done=on_done
        )

    async def _prepare_image(self, handle: ModelHandle, value: ImageInput) -> torch.Tensor:
        started = time.perf_counter()
        loaded = await self._images.load(value)
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(
            self._cpu, contained, handle.backend.preprocess, loaded.image
        )
        self._metrics.image_processing_time_seconds.labels(loaded.source.value).observe(
            time.perf_counter() - started
        )
        return pixels


async def _through(
    queue: BatchQueue[Any, Any],
    inputs: dict[str, K],
    prepare: Callable[[K], Awaitable[Any]],
    *,
    deadline: float,
    window: int,
    out: dict[str, Any],
    on_done: Callable[[str], None] | None = None,
) -> None:
    """Prepare each input and put it through ``queue``, at most ``window`` at a time; each key's
    outcome (a result or its error) lands in ``out``."""
    slots = asyncio.Semaphore(max(1, window))

    async def one(key: str, value: K) -> None:
        async with slots:
            try:
                payload = await prepare(value)
                (future,) = await queue.submit([payload], deadline=deadline)
                out[key] = await future
            except ClipServeError as exc:
                out[key] = exc
            except Exception as exc:
                out[key] = as_error(exc, f"preparing a {queue.modality} input")
        if on_done is not None:
            on_done(key)

    await asyncio.gather(*(one(key, value) for key, value in inputs.items()))
