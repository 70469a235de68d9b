"""The model registry: specs from config, lazy single-flight loading, leases, hot reload.

Every model config name has an entry with a state (``not_loaded`` → ``loading`` → ``loaded`` or
``error``). Requests take a *lease* on a loaded model (``async with registry.use(name)``); a model
that is removed, disabled or changed by a reload is retired and its weights are released only when
its last lease ends, so in-flight requests always finish on the model they started with.

Concurrency contract:

* a load runs once however many callers wait (they await it shielded: a caller that goes away
  cannot cancel a load others wait for), on the loader threads, never on the event loop;
* a retired or closed handle is never handed out: a caller whose shielded wait returns a handle
  retired meanwhile asks again;
* loads and closes run on tasks the registry owns (kept, with a done-callback that logs), never
  inside a request's ``finally`` that a client disconnect could cancel; ``close`` waits for them
  up to a time limit and abandons (and reports) what is still running, such as a close queued
  behind a stuck forward pass;
* when a handle is closed its metric series go too (unless the name is live again);
* memory budget (``memory_budget_gb``, per device, :mod:`clipserve.engine.memory_budget`): a
  load reserves its estimate before its first await and releases it however it ends; with
  ``evict_idle`` it may retire least recently used idle models (never one with requests in
  flight) and waits for their closes; otherwise it is refused with a 503 that is not held for
  ``model_retry_interval_s`` (the next request checks again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from clipserve.config import Settings
from clipserve.engine.executor import Executors, WorkerThreads
from clipserve.engine.memory_budget import MemoryBudget
from clipserve.errors import (
    ClipServeError,
    ConfigError,
    MemoryBudgetError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from clipserve.model_specs import ModelSpec, load_model_specs
from clipserve.models.base import Backend, BackendInfo, Modality
from clipserve.models.loader import resolve_device, resolve_dtype
from clipserve.observability.metrics import Metrics

if TYPE_CHECKING:
    from clipserve.engine.batcher import BatchQueue

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _SupersededError(ModelUnavailableError):
    """The entry being loaded was replaced by a config reload meanwhile: waiters ask again."""


CLOSE_TIMEOUT_S = 10.0
"""How long closing one model may wait for its device thread (behind queued forward passes)."""
_HANDOUT_ATTEMPTS = 3

# Fields whose change means the weights must be loaded again; others (description...) are metadata.
# Caption backends hold their spec's prompt and remote settings from the load on.
_WEIGHTS_FIELDS = ("model_name", "pretrained", "backend", "device", "precision", "task")
_LOAD_FIELDS = (*_WEIGHTS_FIELDS, "prompt", "base_url", "api_key", "timeout_s", "max_retries")


class BackendLoader(Protocol):
    def __call__(self, spec: ModelSpec, *, device: str, dtype: torch.dtype) -> Backend: ...


class ModelState(StrEnum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    LOADED = "loaded"
    ERROR = "error"


@dataclass(eq=False)
class ModelHandle:
    """A loaded backend with the executor its forward passes run on and its batcher queues."""

    name: str
    spec: ModelSpec
    backend: Backend
    executor: WorkerThreads
    """The device's single thread: every forward pass of this model runs there."""
    device: str
    queues: Mapping[Modality, BatchQueue[Any, Any]] = field(default_factory=dict)
    """Built when the model loads (the registry's ``on_load``), closed when it unloads."""
    leases: int = 0
    retired: bool = False
    closed: bool = False
    warmup_time_s: float | None = None
    """How long the last warm-up of this load took (:mod:`clipserve.engine.warmup`)."""
    warmed_up_at: float | None = None
    last_used: float = 0.0
    """Registry clock time of the load or of the last lease's start or end: ``evict_idle``
    unloads the least recently used idle model first."""

    @property
    def info(self) -> BackendInfo:
        return self.backend.info


@dataclass(eq=False)
class _Entry:
    name: str
    spec: ModelSpec
    state: ModelState = ModelState.NOT_LOADED
    handle: ModelHandle | None = None
    error: str | None = None
    failed_at: float | None = None
    load_task: asyncio.Task[ModelHandle] | None = None
    load_time_s: float | None = None
    loaded_at: float | None = None


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A snapshot of one registry entry, for the API."""

    name: str
    spec: ModelSpec
    state: ModelState
    device: str | None = None
    dtype: str | None = None
    load_time_s: float | None = None
    loaded_at: float | None = None
    error: str | None = None
    info: BackendInfo | None = None
    in_flight: int = 0
    warmup_time_s: float | None = None
    warmed_up_at: float | None = None

    @property
    def loaded(self) -> bool:
        return self.state is ModelState.LOADED


@dataclass(frozen=True, slots=True)
class ReloadResult:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    """Specs whose weights must be reloaded (the old model was retired)."""
    updated: list[str] = field(default_factory=list)
    """Specs whose metadata changed only (the loaded model was kept)."""


class ModelRegistry:
    def __init__(
        self,
        settings: Settings,
        *,
        loader: BackendLoader,
        executors: Executors,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        on_load: Callable[[ModelHandle], None] | None = None,
        on_unload: Callable[[ModelHandle], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._on_load = on_load
        self._on_unload = on_unload
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loader = loader
        self._executors = executors
        self._metrics = metrics
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._config_stamp: tuple[int, int] | None = None
        self._budget = MemoryBudget(settings, clock)
        self._reload_lock = asyncio.Lock()
        self.last_reload_at: float | None = None
        self.last_reload_error: str | None = None
        specs = load_model_specs(settings)  # raises ConfigError: a bad config fails start-up loudly
        self._config_stamp = self._stamp()
        self._entries = {name: _Entry(name, spec) for name, spec in specs.items()}
        for name in self._entries:
            self._publish_state(name)

    # --- lookup --------------------------------------------------------------------------------

    def names(self, *, include_disabled: bool = False) -> list[str]:
        return [n for n, e in self._entries.items() if include_disabled or e.spec.enabled]

    def spec(self, name: str) -> ModelSpec:
        return self._entry(name).spec

    def status(self, name: str, *, include_disabled: bool = True) -> ModelStatus:
        entry = self._entry(name, include_disabled=include_disabled)
        handle = entry.handle
        info = handle.info if handle else None
        return ModelStatus(
            name=name,
            spec=entry.spec,
            state=entry.state,
            device=info.device if info else None,
            dtype=info.dtype if info else None,
            load_time_s=entry.load_time_s,
            loaded_at=entry.loaded_at,
            error=entry.error,
            info=info,
            in_flight=handle.leases if handle else 0,
            warmup_time_s=handle.warmup_time_s if handle else None,
            warmed_up_at=handle.warmed_up_at if handle else None,
        )

    def statuses(self, *, include_disabled: bool = False) -> list[ModelStatus]:
        return [self.status(n) for n in self.names(include_disabled=include_disabled)]

    def _entry(self, name: str, *, include_disabled: bool = False) -> _Entry:
        entry = self._entries.get(name)
        if entry is None or not (entry.spec.enabled or include_disabled):
            raise ModelNotFoundError(
                name, self.names(), disabled=entry is not None and not entry.spec.enabled
            )
        return entry

    # --- loading and leases --------------------------------------------------------------------

    async def get(self, name: str) -> ModelHandle:
        """The loaded model, loading it first (once, however many callers wait)."""
        for _ in range(_HANDOUT_ATTEMPTS):
            entry = self._entry(name)
            if entry.handle is not None:
                return entry.handle
            if entry.state is ModelState.ERROR and entry.failed_at is not None:
                wait = self._settings.model_retry_interval_s - (self._clock() - entry.failed_at)
                if wait > 0:
                    raise ModelUnavailableError(
                        name, entry.error or "failed to load", retry_after_s=wait
                    )
            if entry.load_task is None:
                entry.load_task = self._spawn(self._load(entry), f"load-{name}")
            try:
                # Shielded: a caller that goes away must not cancel a load others wait for.
                handle = await asyncio.shield(entry.load_task)
            except _SupersededError:
                continue  # the config changed while loading: load what it says now
            if not handle.retired:  # a reload may have retired it while this caller waited
                return handle
        raise ModelUnavailableError(
            name, "the model was reloaded while loading; retry", retry_after_s=1.0
        )

    @contextlib.asynccontextmanager
    async def use(self, name: str, *, deadline: float | None = None) -> AsyncIterator[ModelHandle]:
        """Lease a loaded model for the duration of the block. Waiting for it to load is bounded
        by ``deadline`` (event-loop time): past it, ``TimeoutError``."""
        async with asyncio.timeout_at(deadline):
            handle = await self.get(name)
        handle.leases += 1
        handle.last_used = self._clock()
        try:
            yield handle
        finally:
            handle.leases -= 1
            handle.last_used = self._clock()
            if handle.retired and handle.leases == 0:
                self._schedule_close(handle)

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        """A task the registry owns: kept until done, its failure logged, awaited by close."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, ClipServeError):  # load errors: logged there
            logger.error("registry task %s failed", task.get_name(), exc_info=exc)

    async def _load(self, entry: _Entry) -> ModelHandle:
        try:
            return await self._load_entry(entry)
        finally:  # however the load ends, its memory reservation goes (one load per entry)
            self._budget.release(entry)

    async def _load_entry(self, entry: _Entry) -> ModelHandle:
        spec = entry.spec
        entry.state, entry.error = ModelState.LOADING, None
        self._publish_state(entry.name)
        started = self._clock()
        try:
            device = resolve_device(spec.device or self._settings.device)
            dtype = resolve_dtype(device, spec.precision, self._settings.cuda_precision)
            # Synchronous: before the first await.
            evicted = self._budget.reserve(entry, entry.name, spec, device, evict=self._evict)
            if evicted:  # their weights must be gone before these are loaded
                await asyncio.wait(evicted)
            logger.info("loading model '%s' (%s) on %s", entry.name, spec.model_name, device)
            backend = await asyncio.wrap_future(
                self._executors.load(
                    partial(self._loader, spec, device=device, dtype=dtype), entry.name
                )
            )
        except MemoryBudgetError as exc:
            logger.warning("model '%s' not loaded: %s", entry.name, exc.reason)
            entry.state, entry.error, entry.failed_at = ModelState.ERROR, exc.reason, None
            entry.load_task = None
            self._publish_state(entry.name)
            raise
        except Exception as exc:
            if isinstance(exc, ModelLoadError):
                reason = exc.message
                logger.error(
                    "model '%s' failed to load: %s | %s",
                    entry.name,
                    reason,
                    exc.technical or "no further detail",
                    exc_info=exc,
                )
            else:
                reason = (
                    f"unexpected error while loading ({type(exc).__name__}); "
                    "the details are in the server log"
                )
                logger.exception("unexpected error loading model '%s'", entry.name)
            self._failed(entry, reason)
            raise ModelUnavailableError(
                entry.name, reason, retry_after_s=self._settings.model_retry_interval_s
            ) from exc
        elapsed = self._clock() - started
        device = backend.info.device
        handle = ModelHandle(entry.name, spec, backend, self._executors.device(device), device)
        handle.last_used = self._clock()
        self._budget.loaded(entry, handle)
        if self._entries.get(entry.name) is not entry:  # replaced by a reload while loading
            handle.retired = True
            self._schedule_close(handle)
            raise _SupersededError(entry.name, "the model was unloaded by a config reload")
        if self._on_load is not None:
            try:
                self._on_load(handle)
            except ClipServeError:  # the batcher refuses work: shutting down (not the model)
                handle.retired = True
                self._schedule_close(handle)
                entry.state, entry.load_task = ModelState.NOT_LOADED, None
                self._publish_state(entry.name)
                raise
        entry.handle, entry.state, entry.load_task = handle, ModelState.LOADED, None
        entry.load_time_s, entry.loaded_at = elapsed, time.time()
        entry.failed_at = None
        self._metrics.model_load_time_seconds.labels(model=entry.name).set(elapsed)
        self._publish_state(entry.name)
        logger.info("model '%s' loaded in %.2f s", entry.name, elapsed)
        return handle

    def _evict(self, name: str) -> None:
        self._retire(self._entries[name])
        self._publish_state(name)

    def _failed(self, entry: _Entry, reason: str) -> None:
        entry.state, entry.error, entry.failed_at = ModelState.ERROR, reason, self._clock()
        entry.load_task = None
        self._publish_state(entry.name)

    async def preload(self, names: list[str] | None = None) -> None:
        """Load models one after another (bounded memory peaks); failures are recorded."""
        for name in names if names is not None else self.names():
            with contextlib.suppress(ModelUnavailableError):
                await self.get(name)

    def _retire(self, entry: _Entry) -> None:
        handle, entry.handle = entry.handle, None
        entry.state = ModelState.NOT_LOADED
        entry.load_task = None
        if handle is not None:
            handle.retired = True
            if handle.leases == 0:
                self._schedule_close(handle)

    def _schedule_close(self, handle: ModelHandle) -> None:
        if not handle.closed:
            handle.closed = True
            task = self._spawn(self._close_handle(handle), f"close-{handle.name}")
            self._budget.closing(handle, task)

    async def _close_handle(self, handle: ModelHandle) -> None:
        try:
            await self._release(handle)
        finally:
            self._budget.closed(handle)

    async def _release(self, handle: ModelHandle) -> None:
        logger.info("unloading model '%s'", handle.name)
        if self._on_unload is not None:
            await self._on_unload(handle)
        # On the device thread: queued forward passes of this model finish first; bounded, so a
        # stuck forward pass cannot hold the unload (or the shutdown) forever.
        loop = asyncio.get_running_loop()
        try:
            closing = loop.run_in_executor(handle.executor, handle.backend.close)
        except RuntimeError:  # the worker threads are stopped already (shutting down)
            handle.backend.close()
        else:
            try:
                await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
            except TimeoutError:
                logger.warning(
                    "model '%s': its device thread did not free within %.0f s (a forward pass "
                    "is stuck?); its weights are abandoned",
                    handle.name,
                    CLOSE_TIMEOUT_S,
                )
        entry = self._entries.get(handle.name)
        if entry is None or entry.handle is None:  # the name is not live again: forget it
            self._metrics.forget_model(handle.name)
            self._publish_state(handle.name)

    # --- hot reload ----------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int] | None:
        path = self._settings.config_path
        if path is None:
            return None
        try:
            stat = Path(path).stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    async def check_for_changes(self) -> ReloadResult | None:
        """Reload if the config file changed since the last (re)load; None when unchanged."""
        if self._stamp() == self._config_stamp:
            return None
        try:
            return await self.reload()
        except ConfigError:
            return None  # recorded in last_reload_error; the previous config stays in force

    async def reload(self) -> ReloadResult:
        """Re-read the config sources and apply the difference.

        Raises ConfigError, keeping the previous config in force."""
        async with self._reload_lock:
            stamp = self._stamp()
            try:
                specs = await asyncio.to_thread(load_model_specs, self._settings)
            except ConfigError as exc:
                self._config_stamp = stamp  # do not retry the same broken file every tick
                self.last_reload_error = exc.message
                logger.error("config reload failed, keeping the previous config: %s", exc.message)
                raise
            self._config_stamp = stamp
            result = await self._apply(specs)
            self.last_reload_at, self.last_reload_error = time.time(), None
            logger.info(
                "config reloaded: added=%s removed=%s changed=%s updated=%s",
                result.added,
                result.removed,
                result.changed,
                result.updated,
            )
            return result

    async def _apply(self, specs: dict[str, ModelSpec]) -> ReloadResult:
        result = ReloadResult()
        for name in list(self._entries):
            if name not in specs:
                self._retire(self._entries.pop(name))
                self._metrics.forget_model(name)
                result.removed.append(name)
        for name, spec in specs.items():
            entry = self._entries.get(name)
            if entry is None:
                self._entries[name] = _Entry(name, spec)
                result.added.append(name)
            elif spec == entry.spec:
                continue
            elif not spec.enabled or any(
                getattr(spec, f) != getattr(entry.spec, f) for f in _LOAD_FIELDS
            ):
                self._retire(entry)
                self._entries[name] = _Entry(name, spec)
                result.changed.append(name)
            else:
                entry.spec = spec
                if entry.handle is not None:
                    entry.handle.spec = spec
                result.updated.append(name)
            self._publish_state(name)
        return result

    async def watch(self, interval_s: float) -> None:
        """Poll the config file every ``interval_s`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.check_for_changes()
            except Exception:  # the watcher must never die
                logger.exception("config watcher error")

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until no load or close is running (at most ``timeout`` s); True when none is."""
        pending = list(self._tasks)
        if not pending:
            return True
        _, still = await asyncio.wait(pending, timeout=timeout)
        return not still

    async def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Retire every model and wait up to ``timeout`` s for loads and closes to finish; what
        is still running after that is reported and abandoned."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        loads = [e.load_task for e in self._entries.values() if e.load_task is not None]
        if loads:
            await asyncio.wait(loads, timeout=timeout)
        for entry in list(self._entries.values()):
            self._retire(entry)
        if not await self.drain(max(0.0, deadline - loop.time())):
            names = sorted(task.get_name() for task in self._tasks)
            logger.warning("registry close: abandoned after %.0f s: %s", timeout, names)
            for task in list(self._tasks):
                task.cancel()

    def _publish_state(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is not None:
            self._metrics.set_model_state(name, entry.state.value)
