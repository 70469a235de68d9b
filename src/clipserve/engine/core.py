"""The engine core: lifecycle, leases, deadlines and readiness, under the tasks.

It owns the model registry, the image loader, the worker threads, the embedding cache
(:mod:`clipserve.engine.cache`), the encoder and the dynamic batcher. A task
(:mod:`clipserve.engine.tasks`) serves a request inside :meth:`EngineCore.serving`: it gets a
deadline (``request_timeout``), a lease on its model, a modality check and admission control (a
full queue refuses the request up front, so an admitted request is never half-dropped), and sends
its deduplicated inputs through the encoder, where they share forward passes with every other
request for the same model (or are found in the cache).

Shutdown (:meth:`EngineCore.close`) never hangs: the batcher drains within ``drain_timeout``, then
models are closed and the worker threads stopped within a grace period (:data:`SHUTDOWN_GRACE_S`
at most); a thread still stuck in model code is reported and abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Self

from clipserve.config import Settings
from clipserve.engine.batcher import (
    FAILING_AFTER,
    LOCAL_CLIENT,
    Batcher,
    client_share,
    deadline_error,
)
from clipserve.engine.cache import EmbeddingCache
from clipserve.engine.encoder import Encoder, Scope
from clipserve.engine.executor import Executors, cpu_workers
from clipserve.engine.registry import BackendLoader, ModelHandle, ModelRegistry, ModelState
from clipserve.engine.warmup import Warmup, WarmupReport
from clipserve.errors import (
    EngineNotReadyError,
    InvalidInputError,
    ModelNotFoundError,
    UnsupportedModalityError,
)
from clipserve.media import ImageLoader
from clipserve.models.base import Modality
from clipserve.models.loader import load_backend
from clipserve.observability.context import note_model
from clipserve.observability.metrics import UNKNOWN_MODEL, Metrics
from clipserve.observability.system import publish_gpu
from clipserve.observability.tracing import Tracing

logger = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 5.0
"""After the drain: how long closing models and joining worker threads may take at most (less
with a shorter ``drain_timeout``, never under a second)."""


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str | None = None
    retry_after_s: float | None = None


_ABILITY: dict[Modality, str] = {
    "text": "encode text inputs",
    "image": "encode image inputs",
    "caption": "caption images",
    "answer": "answer questions about images",
}


def prefetch_window(batch_size: int) -> int:
    """Inputs of one request in flight at once for a given ``batch_size``: two batches, so the next
    one is prepared while the current one runs."""
    return 2 * batch_size


class EngineCore:
    def __init__(
        self,
        settings: Settings,
        *,
        loader: BackendLoader | None = None,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing()
        self.metrics = metrics if metrics is not None else Metrics()
        self.executors = Executors(cpu_workers(settings))
        self.batcher = Batcher(
            settings.batching, self.metrics, self.executors.cpu, tracing=self.tracing
        )
        self.images = ImageLoader(settings.media, executor=self.executors.cpu)
        self.cache = EmbeddingCache.from_settings(settings.cache, self.metrics)
        """None when ``cache.enabled`` is off."""
        self.encoder = Encoder(
            settings,
            batcher=self.batcher,
            images=self.images,
            metrics=self.metrics,
            cache=self.cache,
            tracing=self.tracing,
        )
        self.registry = ModelRegistry(
            settings,
            loader=loader
            or partial(
                load_backend,
                media=settings.media,
                api_key=settings.captions.openai_api_key,
                runtime_cache_dir=settings.runtime_cache_dir,
                compile_mode=settings.compile_mode,
            ),
            executors=self.executors,
            metrics=self.metrics,
            on_load=self.encoder.build_queues,
            on_unload=self._unloaded,
        )
        self.metrics.before_scrape.append(self._refresh_gauges)
        self._warmup = Warmup(
            self.registry, self.metrics, timeout_s=settings.batching.request_timeout
        )
        self.started_at = time.time()
        self._watcher: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        interval = self.settings.config_reload_interval_s
        if self.settings.config_path is not None and interval > 0:
            self._watcher = asyncio.create_task(self.registry.watch(interval), name="config-watch")
        if self.settings.preload:
            await self.registry.preload()  # queues are built (and on CUDA probed) as models load

    async def close(self) -> None:
        """Graceful: refuse new work, drain the batcher, then unload models and stop threads."""
        await self.batcher.close()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        loop = asyncio.get_running_loop()
        grace = max(1.0, min(SHUTDOWN_GRACE_S, self.settings.batching.drain_timeout))
        deadline = loop.time() + grace
        await self.registry.close(grace)
        if self.cache is not None:
            await self.cache.close()
        await self.images.aclose()
        self.executors.shutdown(max(0.0, deadline - loop.time()))

    def _refresh_gauges(self) -> None:
        """At each scrape: the age of each queue's oldest item, GPU memory and utilisation."""
        try:
            asyncio.get_running_loop()  # queue ages are on the loop's clock
        except RuntimeError:
            return
        for queue in self.batcher.stats().queues:
            self.metrics.batcher_oldest_item_age_seconds.labels(queue.model, queue.modality).set(
                queue.oldest_wait_s
            )
        publish_gpu(self.metrics)

    async def _unloaded(self, handle: ModelHandle) -> None:
        """A model unloads (a reload, a config change, shutdown): its queues close, and its
        entries leave the in-process cache."""
        if self.cache is not None:
            self.cache.forget(handle.name)
        await self.batcher.discard(handle)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def warm_up(self, names: Sequence[str] | None = None) -> list[WarmupReport]:
        """Dummy forward passes through ``names`` (loaded first if needed; default: every loaded
        model), one model after another. An unknown name raises ``ModelNotFoundError`` before any
        work; a model that fails has the reason in its report (:mod:`clipserve.engine.warmup`)."""
        if not self.batcher.accepting:
            raise EngineNotReadyError("the server is shutting down and accepts no new work")
        return await self._warmup.run(names)

    def resolve_model(self, name: str | None) -> str:
        return name or self.settings.default_model

    # --- readiness -----------------------------------------------------------------------------

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

    # --- deadlines, leases, limits -------------------------------------------------------------

    def scope(
        self, window: int | None = None, client: str | None = None, *, cache: bool = True
    ) -> Scope:
        """A new request's bounds: its deadline (``request_timeout`` from now), its inputs in
        flight at once (default: two of the batcher's batches; never above the client's share of
        a queue), its client, its window of decoded pixels and whether it uses the cache."""
        batching = self.settings.batching
        return Scope(
            deadline=asyncio.get_running_loop().time() + batching.request_timeout,
            window=min(window or prefetch_window(batching.max_batch_size), client_share(batching)),
            client=client or LOCAL_CLIENT,
            pixels=self.images.window(),
            cache=cache,
        )

    @contextlib.asynccontextmanager
    async def serving(
        self, name: str, modalities: Sequence[Modality], scope: Scope
    ) -> AsyncIterator[ModelHandle]:
        """Lease, modality check and admission for one request on one model, bounded by the
        deadline. The work inside bounds itself per input (the encoder answers each input that
        misses the deadline with its own 504), so the results that are ready are kept. The
        request's access line names the model (``unknown`` when no such config exists)."""
        known = name in self.registry.names(include_disabled=True)
        note_model(name if known else UNKNOWN_MODEL)
        try:
            async with self.registry.use(name, deadline=scope.deadline) as handle:
                self._require(handle, modalities)
                await self.encoder.admit(handle, modalities, scope)
                yield handle
        except TimeoutError:
            raise deadline_error(self.settings.batching) from None

    @staticmethod
    def _require(handle: ModelHandle, modalities: Sequence[Modality]) -> None:
        missing = [m for m in dict.fromkeys(modalities) if m not in handle.info.modalities]
        if missing:
            what = " or ".join(_ABILITY[m] for m in missing)
            raise UnsupportedModalityError(
                f"model '{handle.name}' cannot {what} "
                f"(it supports: {', '.join(sorted(handle.info.modalities))})",
                detail={"model": handle.name, "modalities": sorted(handle.info.modalities)},
            )

    def check_image_count(self, distinct: int) -> None:
        limit = self.settings.server.max_images_per_request
        if distinct > limit:
            raise InvalidInputError(
                f"the request has {distinct} distinct images; the limit is {limit}",
                detail={"max_images_per_request": limit},
            )
