"""How big a batch a device can take: out-of-memory detection and the start-up probe.

On CUDA the probe runs one forward pass at batch 1 and one at batch 2 on dummy inputs, reads the
peak memory of each, and divides the free memory (with headroom) by the per-item cost. On the CPU
batch sizes are what the settings say: host memory is not the limit there, time is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

HEADROOM = 0.8
"""Fraction of the free device memory a batch may use (allocator fragmentation, other models)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/MPS/host allocation failures, however the framework spelled them."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def batch_size_for_memory(
    *, free_bytes: int, one_item_peak: int, two_item_peak: int, limit: int
) -> int:
    """The largest batch whose estimated peak (``base + n * per_item``) fits the free memory."""
    per_item = max(two_item_peak - one_item_peak, 1)
    base = max(one_item_peak - per_item, 0)
    budget = free_bytes * HEADROOM - base
    if budget < per_item:
        return 1
    return max(1, min(limit, int(budget // per_item)))


def probe_batch_size(device: str, forward: Callable[[int], object], limit: int) -> int:
    """Run ``forward(n)`` (a dummy batch of n items) on ``device`` and size batches from free
    memory. Returns ``limit`` on non-CUDA devices. Runs on the device's thread."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return limit
    index = torch.device(device).index
    dev = torch.device("cuda", index if index is not None else torch.cuda.current_device())
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        forward(n)
        torch.cuda.synchronize(dev)
        peaks.append(torch.cuda.max_memory_allocated(dev) - before)
    free, _total = torch.cuda.mem_get_info(dev)
    size = batch_size_for_memory(
        free_bytes=free, one_item_peak=peaks[0], two_item_peak=peaks[1], limit=limit
    )
    logger.info(
        "probe on %s: %.1f MiB free, peaks %.1f / %.1f MiB at batch 1 / 2 -> batch size %d",
        device,
        free / 2**20,
        peaks[0] / 2**20,
        peaks[1] / 2**20,
        size,
    )
    return size
