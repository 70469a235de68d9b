"""Dynamic batching: many small concurrent requests served by forward passes of big batches.

There is one :class:`BatchQueue` per (model, modality), built when the model loads, and one
:class:`DeviceSlots` per device: at most ``max_concurrent_batches`` batches in flight on it.

**When a batch runs.** A queue's collectors (``num_batching_workers``) dispatch a batch as soon as

* the device is idle (nothing in flight on it): a queue with items runs at once, so batching
  costs nothing at low load; or
* ``max_batch_size`` items wait; or
* the oldest item has waited ``batch_timeout`` (this clock only matters while the device is busy).

Only a batch that is ready takes a device slot; it then takes up to ``max_batch_size`` live items
at that moment (whatever arrived while it waited for the slot rides along). A queue still forming
its batch never holds a slot, so a text queue waiting out its timeout cannot keep an image batch
that is ready off the only CPU slot. A batch runs on the device's single executor thread. It is
prepared (e.g. tokenized) on the CPU pool where the device takes more than one batch at a time, so
the next batch is ready when the current one ends (CUDA); with one slot (the CPU's) nothing could
overlap, so it is prepared on the device thread, saving a thread hand-off.

**The contract** (after Ray Serve's ``_BatchQueue``): every submitted item's future gets exactly
one outcome, a result or an exception, unless its caller cancelled it (a client that went away);
then it is dropped before inference. On every path:

* items whose deadline passes are answered :class:`~clipserve.errors.InferenceTimeoutError` at the
  deadline by their own timer, even while the device is stuck;
* a batch may fail single items (:class:`FailedItem`) and stand for the others;
* a batch that fails is split in halves and retried down to single items, so one poison input (or
  a CUDA out-of-memory error) fails alone; out-of-memory also lowers the queue's batch size;
* a batch task that ends any other way (a bug, a failure while freeing memory, a shutdown) has its
  done-callback settle all of its items at once: an internal error, or 503 on shutdown;
* a collector that dies has its done-callback fail the items it held and the queued ones, and a
  new collector starts (after the next arrival, so a deterministic bug cannot spin);
* queues are bounded: callers are refused (:class:`~clipserve.errors.QueueFullError`, with a
  drain-rate estimate for ``Retry-After``) or wait for room until their deadline; and one client
  (an API key, an address) may fill at most ``client_queue_share`` of a queue, so a greedy client
  meets its own limit while everyone else still finds room;
* ``close`` drains until its deadline, then cancels what runs and fails what is left (503).

Every task a queue starts is kept (collectors, batches), has a done-callback, and is cancelled and
awaited by ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from clipserve.config import BatchingSettings, OverflowAction
from clipserve.engine.capacity import is_out_of_memory
from clipserve.engine.executor import WorkerThreads
from clipserve.engine.slots import DeviceSlots, Signal, wait_any
from clipserve.errors import (
    ClipServeError,
    EngineNotReadyError,
    InferenceError,
    InferenceTimeoutError,
    QueueFullError,
)
from clipserve.models.loader import release_device_memory
from clipserve.observability.metrics import Metrics
from clipserve.observability.tracing import Tracing

logger = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Results(Protocol[R_co]):
    """What a batch returns: one result per payload (a list, or a tensor of rows); a payload
    that failed alone while the rest of its batch stands is its :class:`FailedItem`."""

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[R_co]: ...


_RATE_SMOOTHING = 0.3
"""Weight of the newest batch in the drain-rate moving average."""
FAILING_AFTER = 3
"""Consecutive failed inputs (each isolated by splitting) after which a queue reports failing."""


LOCAL_CLIENT = "local"
"""The client of work submitted in-process (the CLI, the Python API)."""


@dataclass(frozen=True, slots=True)
class FailedItem:
    """One payload's failure in a batch that otherwise succeeded: its item is answered
    ``error`` (a remote call refused, a prompt too long for the model)."""

    error: ClipServeError


def client_share(settings: BatchingSettings) -> int:
    """Items of one queue one client may hold: ``client_queue_share`` of ``max_queue_size``."""
    return max(1, int(settings.max_queue_size * settings.client_queue_share))


def deadline_error(settings: BatchingSettings) -> InferenceTimeoutError:
    """What an input whose request's deadline passed is answered (504)."""
    limit = settings.request_timeout
    return InferenceTimeoutError(
        f"the request did not finish within its {limit:g} s deadline (request_timeout)",
        detail={"request_timeout_s": limit},
    )


@dataclass(eq=False, slots=True)
class _Item(Generic[P, R]):
    payload: P
    future: asyncio.Future[R]
    enqueued_at: float
    deadline: float
    client: str
    timer: asyncio.TimerHandle | None = None
    """Answers the item 504 at its deadline, whatever the collectors are doing."""
    trace: Any = None
    """The tracing context its request queued it in (None with tracing off)."""


@dataclass(frozen=True, slots=True)
class _Running(Generic[P, R]):
    started: float
    items: list[_Item[P, R]]


@dataclass(frozen=True, slots=True)
class QueueStats:
    model: str
    modality: str
    device: str
    size: int
    max_batch_size: int
    batches: int
    items: int
    drain_rate: float | None
    """Items per second of recent batches (a moving average); None before the first batch."""
    consecutive_failures: int = 0
    last_error: str | None = None
    last_failure_at: float | None = None
    """Event-loop time of the last failed input."""
    running_for_s: float = 0.0
    """How long the oldest batch in flight has been running."""
    oldest_wait_s: float = 0.0
    """How long the oldest queued item has waited (0 with none queued)."""
    probed_batch_size: int | None = None
    """What the start-up probe found fits the device's free memory; None without a probe (the
    CPU), before it ends, or when it failed."""


class BatchQueue(Generic[P, R]):
    """One bounded queue and its collectors.

    ``prepare`` (optional) turns a batch's payloads into the model's input on the CPU pool;
    ``run`` computes the batch on the device thread and returns one result per payload.
    ``probe`` (optional) runs once on the device thread before the first batch and returns the
    largest safe batch size (see :mod:`clipserve.engine.capacity`). ``release_memory`` runs on
    the device thread after an out-of-memory error, before the smaller retries.
    """

    def __init__(
        self,
        *,
        model: str,
        modality: str,
        run: Callable[[Any], Results[R]],
        prepare: Callable[[list[P]], Any] | None,
        device_executor: WorkerThreads,
        cpu_executor: WorkerThreads,
        slots: DeviceSlots,
        settings: BatchingSettings,
        metrics: Metrics,
        probe: Callable[[], int] | None = None,
        release_memory: Callable[[], None] | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.model, self.modality, self.device = model, modality, slots.device
        self.max_batch_size = settings.max_batch_size
        self.max_queue_size = settings.max_queue_size
        self.client_share = client_share(settings)
        self._run, self._prepare, self._probe = run, prepare, probe
        self._tracing = tracing or Tracing()
        self._release_memory = release_memory or partial(release_device_memory, slots.device)
        self._device_executor, self._cpu_executor = device_executor, cpu_executor
        self._slots = slots
        self.settings = settings
        self._items: deque[_Item[P, R]] = deque()
        self._by_client: Counter[str] = Counter()
        self._arrived = Signal()
        self._room = Signal()
        self._idle = Signal()
        self._collectors: set[asyncio.Task[None]] = set()
        self._taken: list[_Item[P, R]] = []
        self._running: dict[asyncio.Task[None], _Running[P, R]] = {}
        self._ready = asyncio.Event()
        self._probing = False
        self.probed_batch_size: int | None = None
        self._closing = False
        self.batches = 0
        self.items_done = 0
        self.drain_rate: float | None = None
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.last_failure_at: float | None = None
        labels = (model, modality)
        self._m_requests = metrics.batcher_requests_total
        self._m_latency = metrics.batcher_request_latency_seconds.labels(*labels)
        self._m_batch = metrics.batcher_batch_size.labels(*labels)
        self._m_wait = metrics.batcher_batch_wait_time_seconds.labels(*labels)
        self._m_infer = metrics.batcher_inference_time_seconds.labels(*labels)
        self._m_queue = metrics.batcher_queue_size.labels(*labels)
        metrics.batcher_queue_capacity.labels(*labels).set(self.max_queue_size)
        self._m_forward = metrics.inference_time_seconds.labels(*labels)
        self._m_forward_size = metrics.forward_batch_size.labels(*labels)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._probe is None:
            self._ready.set()
        for _ in range(self.settings.num_batching_workers):
            self._start_collector(after_failure=False)

    def _start_collector(self, *, after_failure: bool) -> None:
        task = asyncio.create_task(
            self._collect(after_failure), name=f"batcher-{self.model}-{self.modality}"
        )
        self._collectors.add(task)
        task.add_done_callback(self._collector_done)

    async def close(self, deadline: float) -> None:
        """Stop accepting; finish queued and in-flight work until ``deadline``; fail the rest."""
        self._closing = True
        self._room.fire()
        self._arrived.fire()
        try:
            async with asyncio.timeout_at(deadline):
                while self._items or self._running:
                    await wait_any(self._idle)
        except TimeoutError:
            logger.warning(
                "batcher %s/%s: drain timed out with %d queued items and %d running batches",
                self.model,
                self.modality,
                len(self._items),
                len(self._running),
            )
        tasks = [*self._collectors, *self._running]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_queued(
            EngineNotReadyError("the server shut down before this request was processed")
        )

    # --- submitting ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._items)

    def retry_after_s(self) -> float:
        """How long the queued work should take to drain, from the recent drain rate."""
        if not self.drain_rate:
            return 1.0
        return min(60.0, max(1.0, len(self._items) / self.drain_rate))

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise EngineNotReadyError("the server is shutting down and accepts no new work")

    def _has_room(self, client: str) -> bool:
        return (
            len(self._items) < self.max_queue_size and self._by_client[client] < self.client_share
        )

    async def admit(
        self, overflow: OverflowAction, deadline: float, client: str = LOCAL_CLIENT
    ) -> None:
        """Admission control for a new request: refuse it (or wait) while this queue is full, or
        while ``client`` already fills its share of it."""
        self._refuse_if_closing()
        if self._has_room(client):
            return
        if overflow == "reject":
            self._m_requests.labels(self.model, self.modality, "rejected").inc()
            if len(self._items) >= self.max_queue_size:
                raise QueueFullError(
                    f"the server is overloaded: the {self.modality} queue of model "
                    f"'{self.model}' holds {len(self._items)} items (max_queue_size "
                    f"{self.max_queue_size}); retry later",
                    retry_after_s=self.retry_after_s(),
                )
            raise QueueFullError(
                f"too many requests from this client: it holds {self._by_client[client]} items "
                f"of the {self.modality} queue of model '{self.model}', its share "
                f"(client_queue_share of max_queue_size {self.max_queue_size}); retry later",
                retry_after_s=self.retry_after_s(),
            )
        await self._wait_until(lambda: self._has_room(client), deadline)

    async def submit(
        self, payloads: Sequence[P], *, deadline: float, client: str = LOCAL_CLIENT
    ) -> list[asyncio.Future[R]]:
        """Queue items, waiting (until ``deadline``) for room; each future resolves to a result.

        Room means the queue stays within ``max_queue_size`` and ``client`` within its share
        (``client_share`` items), or they hold nothing yet (so a submission larger than either
        still runs, alone)."""
        n = len(payloads)
        if n == 0:
            return []
        by_client = self._by_client

        def room() -> bool:
            queue_ok = not self._items or len(self._items) + n <= self.max_queue_size
            return queue_ok and (
                not by_client[client] or by_client[client] + n <= self.client_share
            )

        await self._wait_until(room, deadline)
        loop = asyncio.get_running_loop()
        now = loop.time()
        trace = self._tracing.current()
        items: list[_Item[P, R]] = [
            _Item(p, loop.create_future(), now, deadline, client, trace=trace) for p in payloads
        ]
        for item in items:
            item.timer = loop.call_at(deadline, self._expire, item)
        self._items.extend(items)
        by_client[client] += n
        self._m_queue.set(len(self._items))
        self._arrived.fire()
        return [item.future for item in items]

    async def _wait_until(self, condition: Callable[[], bool], deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    self._refuse_if_closing()
                    if condition():
                        return
                    await wait_any(self._room)
        except TimeoutError:
            self._m_requests.labels(self.model, self.modality, "timeout").inc()
            raise InferenceTimeoutError(
                f"the request's deadline passed while waiting for room in the {self.modality} "
                f"queue of model '{self.model}'"
            ) from None

    # --- collecting ----------------------------------------------------------------------------

    async def _collect(self, after_failure: bool) -> None:
        if after_failure:  # a replacement: start on new work, so a repeating bug cannot spin
            await wait_any(self._arrived)
        await self._run_probe()
        while True:
            await self._until_ready()
            await self._slots.acquire()
            try:
                batch = self._take()
                if batch:
                    self._launch(batch)
                self._taken = []  # the batch task owns them now
            except BaseException as exc:
                self._slots.release()
                self._settle_all(self._taken, self._internal_error("forming a batch", exc))
                raise
            if not batch:
                self._slots.release()
                self._notify_idle()

    async def _until_ready(self) -> None:
        """Until a batch should run: the device is idle, the batch is full, the oldest item has
        waited ``batch_timeout``, or the queue is closing (drain at once)."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                await wait_any(self._arrived)
                continue
            if self._closing or self._slots.idle or len(self._items) >= self.max_batch_size:
                return
            remaining = self._items[0].enqueued_at + self.settings.batch_timeout - loop.time()
            if remaining <= 0:
                return
            await wait_any(self._arrived, self._slots.freed, timeout=remaining)

    def _take(self) -> list[_Item[P, R]]:
        """Up to ``max_batch_size`` live items (cancelled and expired ones are dropped). They are
        also in ``_taken`` until launched, for the collector's failure path."""
        now = asyncio.get_running_loop().time()
        batch: list[_Item[P, R]] = []
        self._taken = batch
        while self._items and len(batch) < self.max_batch_size:
            item = self._popleft()
            if self._is_live(item, now):
                batch.append(item)
        self._m_queue.set(len(self._items))
        self._room.fire()
        return batch

    def _popleft(self) -> _Item[P, R]:
        item = self._items.popleft()
        left = self._by_client[item.client] - 1
        if left:
            self._by_client[item.client] = left
        else:
            del self._by_client[item.client]  # no entry per client ever seen
        return item

    def _launch(self, batch: list[_Item[P, R]]) -> None:
        """Run ``batch`` on a task that owns the slot just taken (its done-callback frees it)."""
        task = asyncio.create_task(
            self._run_batch(batch), name=f"batch-{self.model}-{self.modality}"
        )
        self._running[task] = _Running(asyncio.get_running_loop().time(), batch)
        task.add_done_callback(self._batch_done)

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        self._collectors.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        logger.error(
            "batcher %s/%s: a collector stopped unexpectedly",
            self.model,
            self.modality,
            exc_info=exc,
        )
        self._fail_queued(self._internal_error("collecting a batch", exc))
        if not self._closing:
            self._start_collector(after_failure=True)

    async def _run_probe(self) -> None:
        """Before the first batch: lower ``max_batch_size`` to what the device's memory fits."""
        if self._probe is None or self._probing:
            await self._ready.wait()  # no probe, or another collector runs it
            return
        self._probing = True
        loop = asyncio.get_running_loop()
        try:
            safe = await loop.run_in_executor(self._device_executor, self._probe)
        except Exception:
            logger.exception("batcher %s/%s: batch size probe failed", self.model, self.modality)
        else:
            self.probed_batch_size = safe
            if safe < self.max_batch_size:
                logger.info(
                    "batcher %s/%s: max batch size %d -> %d (probed from free device memory)",
                    self.model,
                    self.modality,
                    self.max_batch_size,
                    safe,
                )
                self.max_batch_size = max(1, safe)
        finally:
            self._ready.set()

    async def wait_probed(self) -> None:
        """Until the start-up probe has run (at once when there is none)."""
        await self._ready.wait()

    def _is_live(self, item: _Item[P, R], now: float) -> bool:
        if item.future.cancelled():
            if item.timer is not None:
                item.timer.cancel()
            self._m_requests.labels(self.model, self.modality, "cancelled").inc()
            return False
        if item.future.done():
            return False
        if now >= item.deadline:
            self._expire(item)
            return False
        return True

    def _expire(self, item: _Item[P, R]) -> None:
        """The deadline passed before a result: answer 504 (a running batch's result for this
        item is then dropped; a queued item is skipped when its batch forms)."""
        self._settle(item, error=deadline_error(self.settings))

    # --- running -------------------------------------------------------------------------------

    async def _run_batch(self, batch: list[_Item[P, R]]) -> None:
        started = asyncio.get_running_loop().time()
        self._m_batch.observe(len(batch))
        for item in batch:
            self._m_wait.observe(started - item.enqueued_at)
        await self._execute(batch)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        """Frees the slot and settles whatever the batch left unanswered."""
        running = self._running.pop(task)
        self._slots.release()
        self.batches += 1
        self._m_infer.observe(asyncio.get_running_loop().time() - running.started)
        error: ClipServeError | None = None
        if task.cancelled():
            error = EngineNotReadyError(
                "the server shut down before this request's result was ready"
            )
        elif (exc := task.exception()) is not None:
            logger.error(
                "batcher %s/%s: a batch of %d failed unexpectedly",
                self.model,
                self.modality,
                len(running.items),
                exc_info=exc,
            )
            error = self._internal_error("running a batch", exc)
        if error is not None:
            self._settle_all(running.items, error)
        self._notify_idle()

    def _internal_error(self, what: str, exc: BaseException | None) -> InferenceError:
        cause = f" ({type(exc).__name__})" if exc is not None else ""
        return InferenceError(
            f"internal error while {what} of {self.modality} inputs for model '{self.model}'"
            f"{cause}; the details are in the server log"
        )

    async def _execute(self, items: list[_Item[P, R]]) -> None:
        now = asyncio.get_running_loop().time()
        live = [item for item in items if self._is_live(item, now)]
        if not live:
            return
        traced = [(i.trace, now - i.enqueued_at) for i in live] if self._tracing.on else []
        try:
            with self._tracing.batch(self.model, self.modality, traced):
                outputs = await self._forward([item.payload for item in live])
        except ClipServeError as exc:
            self._settle_all(live, exc)
            return
        except Exception as exc:
            await self._recover(live, exc)
            return
        if len(outputs) != len(live):
            self._settle_all(
                live,
                InferenceError(
                    f"model '{self.model}' returned {len(outputs)} {self.modality} results "
                    f"for {len(live)} inputs"
                ),
            )
            return
        self.consecutive_failures = 0
        for item, output in zip(live, outputs, strict=True):
            if isinstance(output, FailedItem):
                self._settle(item, error=output.error)
            else:
                self._settle(item, result=output)

    async def _recover(self, live: list[_Item[P, R]], exc: Exception) -> None:
        """A batch failed: split it to isolate the failing items (and shrink it on OOM)."""
        oom = is_out_of_memory(exc)
        if oom:
            await asyncio.get_running_loop().run_in_executor(
                self._device_executor, self._release_memory
            )
            if len(live) > 1 and self.max_batch_size >= len(live):
                self.max_batch_size = max(1, len(live) // 2)
                logger.warning(
                    "batcher %s/%s: out of memory at batch size %d; max batch size is now %d",
                    self.model,
                    self.modality,
                    len(live),
                    self.max_batch_size,
                )
        if len(live) > 1:
            if not oom:
                logger.warning(
                    "batcher %s/%s: a batch of %d failed (%s: %s); retrying in halves",
                    self.model,
                    self.modality,
                    len(live),
                    type(exc).__name__,
                    exc,
                )
            middle = len(live) // 2
            await self._execute(live[:middle])
            await self._execute(live[middle:])
            return
        if oom:
            message = (
                f"model '{self.model}' ran out of device memory on a single {self.modality} input"
            )
            logger.error("batcher %s/%s: %s", self.model, self.modality, message)
        else:
            message = (
                f"inference failed for model '{self.model}' ({self.modality}): {type(exc).__name__}"
            )
            logger.error(
                "batcher %s/%s: forward pass failed", self.model, self.modality, exc_info=exc
            )
        self.consecutive_failures += 1
        self.last_error = message
        self.last_failure_at = asyncio.get_running_loop().time()
        self._settle(live[0], error=InferenceError(message))

    async def _forward(self, payloads: list[P]) -> Results[R]:
        loop = asyncio.get_running_loop()
        job: Callable[[], Results[R]]
        if self._prepare is None:
            job = partial(self._run, payloads)
        elif self._slots.limit > 1:  # prepared on the CPU pool while another batch runs
            prepared = await loop.run_in_executor(self._cpu_executor, self._prepare, payloads)
            job = partial(self._run, prepared)
        else:  # nothing else can run meanwhile: prepare on the device thread, one hand-off
            job = partial(_prepare_then_run, self._prepare, self._run, payloads)
        started = loop.time()
        outputs = await loop.run_in_executor(self._device_executor, job)
        elapsed = loop.time() - started
        self._m_forward.observe(elapsed)
        self._m_forward_size.observe(len(payloads))
        rate = len(payloads) / max(elapsed, 1e-6)
        self.drain_rate = (
            rate
            if self.drain_rate is None
            else (1 - _RATE_SMOOTHING) * self.drain_rate + _RATE_SMOOTHING * rate
        )
        return outputs

    # --- outcomes ------------------------------------------------------------------------------

    def _settle(
        self, item: _Item[P, R], *, result: R | None = None, error: ClipServeError | None = None
    ) -> None:
        """Give the item its one outcome (unless its caller already gave up on it)."""
        if item.timer is not None:
            item.timer.cancel()
        if item.future.done():
            return
        if error is not None:
            item.future.set_exception(error)
            outcome = "timeout" if isinstance(error, InferenceTimeoutError) else "error"
        else:
            item.future.set_result(result)  # type: ignore[arg-type]
            outcome = "ok"
            self.items_done += 1
        self._m_requests.labels(self.model, self.modality, outcome).inc()
        self._m_latency.observe(asyncio.get_running_loop().time() - item.enqueued_at)

    def _settle_all(self, items: Sequence[_Item[P, R]], error: ClipServeError) -> None:
        for item in items:
            self._settle(item, error=error)

    def _fail_queued(self, error: ClipServeError) -> None:
        while self._items:
            self._settle(self._popleft(), error=error)
        self._m_queue.set(0)
        self._room.fire()

    def _notify_idle(self) -> None:
        if self._closing or (not self._items and not self._running):
            self._idle.fire()  # the drain loop re-checks

    def stats(self) -> QueueStats:
        now = asyncio.get_running_loop().time()
        oldest = min((r.started for r in self._running.values()), default=None)
        return QueueStats(
            model=self.model,
            modality=self.modality,
            device=self.device,
            size=len(self._items),
            max_batch_size=self.max_batch_size,
            batches=self.batches,
            items=self.items_done,
            drain_rate=self.drain_rate,
            consecutive_failures=self.consecutive_failures,
            last_error=self.last_error,
            last_failure_at=self.last_failure_at,
            running_for_s=0.0 if oldest is None else now - oldest,
            oldest_wait_s=now - self._items[0].enqueued_at if self._items else 0.0,
            probed_batch_size=self.probed_batch_size,
        )


def _prepare_then_run(
    prepare: Callable[[list[P]], Any], run: Callable[[Any], Results[R]], payloads: list[P]
) -> Results[R]:
    return run(prepare(payloads))


@dataclass(frozen=True, slots=True)
class BatcherStats:
    accepting: bool
    queue_size: int
    inflight_batches: int
    queues: tuple[QueueStats, ...]


class Batcher:
    """All queues and device slots of one engine."""

    def __init__(
        self,
        settings: BatchingSettings,
        metrics: Metrics,
        cpu_executor: WorkerThreads,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._cpu_executor = cpu_executor
        self._tracing = tracing
        self._queues: dict[tuple[Hashable, str], BatchQueue[Any, Any]] = {}
        self._slots: dict[str, DeviceSlots] = {}
        self.accepting = True

    def queue(
        self,
        owner: Hashable,
        *,
        model: str,
        modality: str,
        device: str,
        device_executor: WorkerThreads,
        run: Callable[[Any], Results[R]],
        prepare: Callable[[list[P]], Any] | None = None,
        probe: Callable[[], int] | None = None,
        release_memory: Callable[[], None] | None = None,
    ) -> BatchQueue[P, R]:
        """Create and start the queue of ``owner`` (a loaded model) for one modality."""
        if not self.accepting:
            raise EngineNotReadyError("the server is shutting down and accepts no new work")
        key = (owner, modality)
        if key in self._queues:
            raise ValueError(f"model '{model}' already has a {modality} queue")
        slots = self._slots.get(device)
        if slots is None:
            limit = self.settings.concurrent_batches(device)
            slots = self._slots[device] = DeviceSlots(device, limit, self._metrics)
        queue = BatchQueue[P, R](
            model=model,
            modality=modality,
            run=run,
            prepare=prepare,
            device_executor=device_executor,
            cpu_executor=self._cpu_executor,
            slots=slots,
            settings=self.settings,
            metrics=self._metrics,
            probe=probe,
            release_memory=release_memory,
            tracing=self._tracing,
        )
        queue.start()
        self._queues[key] = queue
        return queue

    async def discard(self, owner: Hashable) -> None:
        """Close the queues of a model being unloaded (they are empty: no request leases it)."""
        keys = [key for key in self._queues if key[0] is owner]
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        for key in keys:
            await self._queues.pop(key).close(deadline)

    async def close(self) -> None:
        """Graceful shutdown: refuse new work, drain within ``drain_timeout``, fail what is left."""
        self.accepting = False
        deadline = asyncio.get_running_loop().time() + self.settings.drain_timeout
        queues, self._queues = list(self._queues.values()), {}
        await asyncio.gather(*(queue.close(deadline) for queue in queues))

    def stats(self) -> BatcherStats:
        queues = tuple(queue.stats() for queue in self._queues.values())
        return BatcherStats(
            accepting=self.accepting,
            queue_size=sum(q.size for q in queues),
            inflight_batches=sum(s.inflight for s in self._slots.values()),
            queues=queues,
        )
