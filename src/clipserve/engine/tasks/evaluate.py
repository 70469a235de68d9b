"""Evaluation: the CLIP score ``max(100 * cos(image, text), 0)`` of image-text pairs.

Every pair gets its own result: a problem with one pair (an empty or undecodable image, an empty
or overlong prompt, an unknown or unavailable model) fails that pair alone, and the rest are
scored. Pairs are grouped by model; each group runs under its own lease, and all of them share the
request's deadline and forward passes with concurrent requests.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clipserve.engine.core import EngineCore, prefetch_window
from clipserve.engine.encoder import (
    ImageOutcomes,
    ImageRef,
    Scope,
    TextOutcome,
    TextOutcomes,
    image_ref,
    stack,
)
from clipserve.errors import ClipServeError, InvalidInputError, quote
from clipserve.media import ImageInput
from clipserve.models.base import clip_scores
from clipserve.observability.metrics import UNKNOWN_MODEL

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
    text_context_length: int | None = None
    """The model's text context in tokens, the limit ``text_truncated`` is about (None on error)."""


def _item_problem(item: EvalItem) -> ClipServeError | None:
    if isinstance(item.image, str) and not item.image.strip():
        return InvalidInputError(
            "image_input is empty: expected an http(s) URL, a data URI or a file path"
        )
    if not item.text.strip():
        return InvalidInputError("text_prompt is empty")
    return None


async def _both_sides(
    images: Coroutine[Any, Any, ImageOutcomes], texts: Coroutine[Any, Any, TextOutcomes]
) -> tuple[ImageOutcomes, TextOutcomes]:
    """The image and text outcomes of a group, prepared and encoded concurrently. When every
    outcome of the side that ends first is an error, no pair can be scored: the other side is
    cancelled (its inputs leave the queues unencoded) and comes back empty. An exception of either
    side cancels the other before it propagates; neither task outlives the call."""
    image_task, text_task = asyncio.ensure_future(images), asyncio.ensure_future(texts)
    sides: tuple[asyncio.Future[Any], asyncio.Future[Any]] = (image_task, text_task)
    try:
        pending: set[asyncio.Future[Any]] = set(sides)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for side in done:
                outcomes: Mapping[str, object] = side.result()  # an exception propagates
                if (
                    pending
                    and outcomes
                    and all(isinstance(v, ClipServeError) for v in outcomes.values())
                ):
                    for other in pending:
                        other.cancel()
                    await asyncio.wait(pending)
                    pending = set()
        return (
            {} if image_task.cancelled() else image_task.result(),
            {} if text_task.cancelled() else text_task.result(),
        )
    finally:
        for side in sides:
            side.cancel()
        await asyncio.gather(*sides, return_exceptions=True)


class Evaluation:
    def __init__(self, core: EngineCore) -> None:
        self._core = core

    async def one(self, item: EvalItem, *, client: str | None = None) -> EvalResult:
        """Score one pair; raises its error instead of returning it."""
        (result,) = await self.run([item], client=client)
        if result.error is not None:
            raise result.error
        return result

    async def run(
        self,
        items: Sequence[EvalItem],
        *,
        window: int | None = None,
        progress: ProgressCallback | None = None,
        client: str | None = None,
    ) -> list[EvalResult]:
        """Score pairs; results in input order, a failing pair carries its error.

        ``window``: how many of this request's pairs are prepared ahead (default: two batches of
        ``eval_batch_size``); forward passes hold up to ``batching.max_batch_size`` inputs,
        shared with concurrent requests."""
        core = self._core
        refs = [image_ref(item.image) for item in items]
        core.check_image_count(len({ref.key for ref in refs}))
        scope = core.scope(window or prefetch_window(core.settings.eval_batch_size), client)
        counter = _Progress(len(items), progress)
        results: list[EvalResult | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            name = core.resolve_model(item.model)
            problem = _item_problem(item)
            if problem is None:
                groups.setdefault(name, []).append(index)
            else:
                results[index] = self._failed(name, problem, 0.0)
                counter.advance(1)
        scored = await asyncio.gather(
            *(
                self._group(name, [items[i] for i in idx], [refs[i] for i in idx], scope, counter)
                for name, idx in groups.items()
            )
        )
        for indices, group in zip(groups.values(), scored, strict=True):
            for index, result in zip(indices, group, strict=True):
                results[index] = result
        return [r for r in results if r is not None]

    async def _group(
        self,
        name: str,
        items: list[EvalItem],
        refs: list[ImageRef],
        scope: Scope,
        progress: _Progress,
    ) -> list[EvalResult]:
        core = self._core
        started = time.perf_counter()
        per_key = Counter(ref.key for ref in refs)
        reported = 0

        def image_done(key: str) -> None:
            nonlocal reported
            reported += per_key[key]
            progress.advance(per_key[key])

        try:
            async with core.serving(name, ("image", "text"), scope) as handle:
                images, texts = await _both_sides(
                    core.encoder.images(handle, refs, scope, on_done=image_done),
                    core.encoder.texts(handle, [it.text for it in items], scope),
                )
        except ClipServeError as exc:  # the model (unknown, unavailable...): every pair fails
            progress.advance(len(items) - reported)
            elapsed = (time.perf_counter() - started) * 1000
            return [self._failed(name, exc, elapsed) for _ in items]
        progress.advance(len(items) - reported)  # images not encoded: their texts all failed
        elapsed = (time.perf_counter() - started) * 1000
        context = handle.info.context_length
        out: list[EvalResult | None] = [None] * len(items)
        ok: list[tuple[int, torch.Tensor, TextOutcome]] = []
        for i, (ref, item) in enumerate(zip(refs, items, strict=True)):
            image, text = images.get(ref.key), texts.get(item.text)
            if isinstance(image, ClipServeError):
                out[i] = self._failed(name, image, elapsed)
            elif isinstance(text, ClipServeError):
                out[i] = self._failed(name, text, elapsed)
            elif image is not None and text is not None:  # a side is cut only if all of it failed
                ok.append((i, image, text))
        if ok:  # one score computation for the whole group
            scores = clip_scores(
                stack([image for _, image, _ in ok]), stack([text.embedding for _, _, text in ok])
            ).tolist()
            for (i, _, text), score in zip(ok, scores, strict=True):
                core.metrics.clip_score_distribution.labels(name).observe(score)
                out[i] = EvalResult(name, score, None, text.truncated, elapsed, context)
            core.metrics.evaluations_total.labels(name).inc(len(ok))
        return [r for r in out if r is not None]

    def _failed(self, name: str, error: ClipServeError, elapsed_ms: float) -> EvalResult:
        if name not in self._core.registry.names(include_disabled=True):
            # A name the client made up: never a metric label, and echoed only short.
            self._core.metrics.evaluation_errors_total.labels(
                UNKNOWN_MODEL, type(error).__name__
            ).inc()
            return EvalResult(quote(name, 100), None, error, processing_time_ms=elapsed_ms)
        self._core.metrics.evaluation_errors_total.labels(name, type(error).__name__).inc()
        return EvalResult(name, None, error, processing_time_ms=elapsed_ms)


class _Progress:
    """Counts pairs whose image has been encoded (or failed) and reports to an optional callback."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total, self.done, self._callback = total, 0, callback

    def advance(self, n: int) -> None:
        if n <= 0:
            return
        self.done = min(self.total, self.done + n)
        if self._callback is not None:
            self._callback(self.done, self.total)
