"""Worker threads: one single-thread executor per device, one bounded pool for CPU work, and a
fresh thread per model load.

All forward passes for a device run on that device's one thread, serially and in submission order,
so models never race for the GPU (or for the CPU's intra-op threads). Decoding, preprocessing and
tokenization run on the bounded CPU pool, without torch operators. (``torch.set_num_threads`` is
process-wide in effect, so the pool does not change it: it would starve the encoder thread.)

Only the device threads are long-lived threads that run torch's parallel operators. Each thread
that runs one gets an OpenMP team of its own for life, and once the teams hold more threads than
there are cores, libgomp stops letting their workers spin between parallel regions: every region
then waits for a futex wake-up. Measured on 2 cores (ViT-B/32 text tower, batch 1): 21 ms per
forward with one team, 30 ms once a second thread had run torch ops. So a model loads on a thread
of its own that ends with the load (its team goes with it), and code off the device threads sticks
to numpy without BLAS.

Contract: a thread stuck in model code can never hang the process. The workers are daemon threads
that the interpreter does not join at exit (``ThreadPoolExecutor``'s are joined, so one stuck
forward pass would block shutdown forever); :meth:`WorkerThreads.stop` waits for them only up
to a time limit and reports (and abandons) those still running. Model code that raises
``SystemExit`` or ``KeyboardInterrupt`` has it turned into a ``RuntimeError`` on its future, so it
cannot escape into the event loop and stop the server.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from clipserve.config import Settings

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")


def default_cpu_workers() -> int:
    return max(2, min(32, (os.cpu_count() or 2)))


def cpu_workers(settings: Settings) -> int:
    """Size of the CPU pool: ``media.decode_workers`` when set; else, with
    ``batching.auto_scale_workers``, CPU count x ``cpu_utilization_factor``."""
    if settings.media.decode_workers is not None:
        return settings.media.decode_workers
    batching = settings.batching
    if not batching.auto_scale_workers:
        return default_cpu_workers()
    cores = os.cpu_count() or 2
    return max(2, min(64, math.ceil(cores * batching.cpu_utilization_factor)))


@dataclass(slots=True)
class _Work:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _run(work: _Work) -> None:
    """Run one job into its future, containing what must not reach the event loop."""
    if not work.future.set_running_or_notify_cancel():
        return
    try:
        result = work.fn(*work.args, **work.kwargs)
    except Exception as exc:
        work.future.set_exception(exc)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt: contained here
        error = RuntimeError(f"the worker thread raised {type(exc).__name__}")
        error.__cause__ = exc
        work.future.set_exception(error)
    else:
        work.future.set_result(result)


class WorkerThreads(Executor):
    """A fixed set of daemon worker threads taking work in submission order."""

    def __init__(self, workers: int, name: str) -> None:
        self.name = name
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: cannot take new work after shutdown")
            future: Future[T] = Future()
            self._work.put(_Work(future, fn, args, kwargs))
            return future

    def _serve(self) -> None:
        while True:
            work = self._work.get()
            if work is None:
                return
            _run(work)
            del work  # do not keep the last job's arguments (a batch) alive while idle

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.stop(timeout=None if wait else 0.0, cancel_futures=cancel_futures)

    def stop(self, *, timeout: float | None, cancel_futures: bool = True) -> list[str]:
        """Stop taking work (cancelling queued work with ``cancel_futures``) and join the threads
        for up to ``timeout`` seconds (None: as long as they take). Returns the names of the
        threads still running: abandoned, they end with the process."""
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    while True:
                        try:
                            work = self._work.get_nowait()
                        except queue.Empty:
                            break
                        if work is not None:
                            work.future.cancel()
                for _ in self._threads:
                    self._work.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return [thread.name for thread in self._threads if thread.is_alive()]


class Executors:
    """Owns the per-device executors, the CPU pool and the model-loading threads."""

    def __init__(self, cpu_workers: int | None = None) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, WorkerThreads] = {}
        self._loads: set[threading.Thread] = set()
        self.cpu = WorkerThreads(cpu_workers or default_cpu_workers(), "clipserve-cpu")

    def load(self, fn: Callable[[], T], name: str) -> Future[T]:
        """Run a model load (download, deserialisation) on a new thread that ends with it: off
        the event loop and the device, and without leaving an OpenMP team behind."""
        future: Future[T] = Future()

        def work() -> None:
            try:
                _run(_Work(future, fn, (), {}))
            finally:
                with self._lock:
                    self._loads.discard(thread)

        thread = threading.Thread(target=work, name=f"clipserve-load-{name}", daemon=True)
        with self._lock:
            self._loads.add(thread)
        thread.start()
        return future

    def device(self, device: str) -> WorkerThreads:
        """The one executor for ``device`` (created on first use)."""
        with self._lock:
            executor = self._devices.get(device)
            if executor is None:
                executor = WorkerThreads(1, f"clipserve-device-{device.replace(':', '')}")
                self._devices[device] = executor
            return executor

    def shutdown(self, timeout: float) -> list[str]:
        """Stop every pool, cancelling queued work, waiting at most ``timeout`` seconds in all.
        Threads still busy after that (a stuck forward pass, a hung download) are logged and
        abandoned; their names are returned."""
        with self._lock:
            pools = [*self._devices.values(), self.cpu]
            loads = list(self._loads)
            self._devices.clear()
        deadline = time.monotonic() + timeout
        for pool in pools:  # signal every pool first, then wait
            pool.stop(timeout=0.0)
        stuck: list[str] = []
        for pool in pools:
            stuck += pool.stop(timeout=max(0.0, deadline - time.monotonic()))
        for thread in loads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        if stuck:
            logger.warning(
                "shutdown: %d worker thread(s) still busy after %.1f s, abandoned: %s",
                len(stuck),
                timeout,
                ", ".join(stuck),
            )
        return stuck
