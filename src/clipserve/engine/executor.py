"""Thread pools: one single-thread executor per device, one bounded pool for CPU preprocessing.

All forward passes for a device run on that device's one thread, serially and in submission order,
so models never race for the GPU (or for the CPU's intra-op threads). Decoding, preprocessing and
tokenization run on the bounded CPU pool. (``torch.set_num_threads`` is process-wide in effect, so
the pool does not change it: it would starve the encoder thread.)
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from clipserve.config import Settings


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


class Executors:
    """Owns the per-device executors and the CPU pool; ``shutdown`` stops them all."""

    def __init__(self, cpu_workers: int | None = None) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, ThreadPoolExecutor] = {}
        self.cpu = ThreadPoolExecutor(
            max_workers=cpu_workers or default_cpu_workers(), thread_name_prefix="clipserve-cpu"
        )

    def device(self, device: str) -> ThreadPoolExecutor:
        """The one executor for ``device`` (created on first use)."""
        with self._lock:
            executor = self._devices.get(device)
            if executor is None:
                executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"clipserve-device-{device.replace(':', '')}"
                )
                self._devices[device] = executor
            return executor

    def shutdown(self, *, wait: bool = True) -> None:
        with self._lock:
            devices = list(self._devices.values())
            self._devices.clear()
        for executor in devices:
            executor.shutdown(wait=wait, cancel_futures=not wait)
        self.cpu.shutdown(wait=wait, cancel_futures=not wait)
