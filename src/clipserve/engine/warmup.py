"""Warm-up: dummy forward passes through a model's encoders before real traffic needs them.

The first forward passes of a model pay one-off costs (CUDA kernel selection and allocator
growth, lazy initialisation in the libraries, cold CPU caches). A warm-up runs, on the model's
device thread and for each modality it encodes, the batch size probe's own dummy pass
(:func:`clipserve.engine.encoder.dummy_forward`: blank images, texts filling the context) at
batch 1 and at the queue's current ``max_batch_size`` (after the start-up probe on CUDA), so both
the latency path and the largest batch are ready.

Models are warmed one after another (bounded memory peaks); a model that fails (it cannot load,
runs out of memory...) gets its error in its report and the others still run. Unknown names are
refused up front (:class:`~clipserve.errors.ModelNotFoundError`), before any work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from clipserve.engine.capacity import is_out_of_memory
from clipserve.engine.encoder import dummy_forward
from clipserve.engine.registry import ModelHandle, ModelRegistry
from clipserve.errors import ClipServeError, EngineNotReadyError
from clipserve.models.base import Modality
from clipserve.models.loader import release_device_memory
from clipserve.observability.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WarmupPass:
    modality: Modality
    batch_size: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class WarmupReport:
    """What warming one model did: its passes, how long they took, or why it failed."""

    model: str
    device: str | None
    modalities: tuple[Modality, ...]
    """The queues warmed (or meant to be, when it failed)."""
    passes: tuple[WarmupPass, ...]
    duration_s: float
    error: str | None = None


class _PassFailedError(Exception):
    def __init__(self, modality: Modality, batch_size: int, cause: BaseException) -> None:
        super().__init__(f"{modality} pass at batch size {batch_size} failed")
        self.modality, self.batch_size, self.cause = modality, batch_size, cause


class Warmup:
    def __init__(self, registry: ModelRegistry, metrics: Metrics, *, timeout_s: float) -> None:
        self._registry = registry
        self._metrics = metrics
        self._timeout_s = timeout_s

    def targets(self, names: Sequence[str] | None) -> list[str]:
        """The models to warm: ``names`` (deduplicated; an unknown or disabled one raises
        ``ModelNotFoundError``), or every loaded model when ``names`` is empty."""
        if not names:
            return [s.name for s in self._registry.statuses() if s.loaded]
        unique = list(dict.fromkeys(names))
        for name in unique:
            self._registry.status(name, include_disabled=False)
        return unique

    async def run(self, names: Sequence[str] | None) -> list[WarmupReport]:
        return [await self.model(name) for name in self.targets(names)]

    async def model(self, name: str) -> WarmupReport:
        """Warm one model (loading it first if needed), within ``timeout_s``."""
        started = time.perf_counter()
        passes: list[WarmupPass] = []
        device: str | None = None
        modalities: tuple[Modality, ...] = ()
        error: str | None = None
        cause: BaseException | None = None  # logged with its traceback
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._registry.use(name) as handle:
                    device, modalities = handle.device, tuple(sorted(handle.queues))
                    started = time.perf_counter()  # the warm-up proper, not the wait for a load
                    await self._passes(handle, passes)
                    self._record(handle, time.perf_counter() - started)
        except TimeoutError:
            error = f"the warm-up did not finish within {self._timeout_s:g} s (request_timeout)"
        except ClipServeError as exc:  # not loadable (503's message), or shutting down
            error = exc.message
        except _PassFailedError as exc:
            error = _explain(exc)
            cause = None if is_out_of_memory(exc.cause) else exc.cause
        except Exception as exc:
            error = "unexpected error while warming up; the details are in the server log"
            cause = exc
        if error is not None:
            logger.warning("model '%s' failed to warm up: %s", name, error, exc_info=cause)
        elapsed = time.perf_counter() - started
        return WarmupReport(name, device, modalities, tuple(passes), elapsed, error)

    async def _passes(self, handle: ModelHandle, passes: list[WarmupPass]) -> None:
        loop = asyncio.get_running_loop()
        for modality, queue in sorted(handle.queues.items()):
            await queue.wait_probed()  # then max_batch_size is what the device fits
            forward = dummy_forward(handle.backend, modality)
            for n in sorted({1, queue.max_batch_size}):
                began = time.perf_counter()
                try:
                    running = loop.run_in_executor(handle.executor, forward, n)
                except RuntimeError as exc:  # the worker threads are stopped
                    raise EngineNotReadyError("the server is shutting down") from exc
                try:
                    await running
                except Exception as exc:
                    if is_out_of_memory(exc):  # give the cached blocks back, as the batcher does
                        await loop.run_in_executor(
                            handle.executor, release_device_memory, handle.device
                        )
                    raise _PassFailedError(modality, n, exc) from exc
                passes.append(WarmupPass(modality, n, time.perf_counter() - began))

    def _record(self, handle: ModelHandle, elapsed: float) -> None:
        handle.warmup_time_s, handle.warmed_up_at = elapsed, time.time()
        if not handle.retired:  # a retired handle's name may belong to a newer load
            self._metrics.model_warmup_time_seconds.labels(model=handle.name).set(elapsed)
        logger.info("model '%s' warmed up in %.3f s", handle.name, elapsed)


def _explain(failed: _PassFailedError) -> str:
    """A client-safe reason: out of memory says so; anything else names its type only."""
    where = f"the {failed.modality} pass at batch size {failed.batch_size}"
    if is_out_of_memory(failed.cause):
        return f"out of device memory in {where}; lower max_batch_size"
    return f"{where} failed ({type(failed.cause).__name__}); the details are in the server log"
