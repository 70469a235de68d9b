"""Facts about the machine: GPU memory and utilisation (when CUDA is present), the backend
libraries installed; and the GPU gauges, published from them at each scrape."""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
from dataclasses import dataclass

import torch

from clipserve.observability.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuMemory:
    device: str
    name: str
    total_mb: float
    free_mb: float
    allocated_mb: float
    reserved_mb: float


def gpu_memory() -> list[GpuMemory] | None:
    """Memory of every visible CUDA device; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    out = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        out.append(
            GpuMemory(
                device=f"cuda:{index}",
                name=torch.cuda.get_device_name(index),
                total_mb=total / 2**20,
                free_mb=free / 2**20,
                allocated_mb=torch.cuda.memory_allocated(index) / 2**20,
                reserved_mb=torch.cuda.memory_reserved(index) / 2**20,
            )
        )
    return out


def gpu_utilization() -> dict[str, float] | None:
    """Per visible CUDA device, the percent of the last sample period during which a kernel ran
    (``torch.cuda.utilization``, as nvidia-smi shows it); None without CUDA, or without pynvml
    (``nvidia-ml-py``), which that reading needs (said once, at debug level), or when NVML
    cannot be read (said at debug level)."""
    if not torch.cuda.is_available() or not _pynvml_importable():
        return None
    out = {}
    for index in range(torch.cuda.device_count()):
        try:
            out[f"cuda:{index}"] = float(torch.cuda.utilization(index))
        except Exception as exc:  # NVML errors, a driver it cannot load: no reading, no failure
            logger.debug("GPU utilisation of cuda:%d cannot be read: %s", index, exc)
            return None
    return out


@functools.cache
def _pynvml_importable() -> bool:
    if importlib.util.find_spec("pynvml") is None:
        logger.debug("pynvml (nvidia-ml-py) is not installed: no GPU utilisation gauge")
        return False
    return True


def publish_gpu(metrics: Metrics) -> None:
    """Set the GPU gauges (memory by kind, utilisation) from a reading now; no series at all
    without CUDA, and no utilisation series without pynvml."""
    for gpu in gpu_memory() or ():
        for kind in ("total", "free", "allocated", "reserved"):
            value = getattr(gpu, f"{kind}_mb") * 2**20
            metrics.gpu_memory_bytes.labels(gpu.device, kind).set(value)
    for device, percent in (gpu_utilization() or {}).items():
        metrics.gpu_utilization_ratio.labels(device).set(percent / 100)


BACKEND_PACKAGES = ("open_clip", "transformers", "sentence_transformers")
"""The libraries behind the ``open_clip``, ``hf`` and ``sentence-transformers`` backends."""


def backend_packages() -> dict[str, bool]:
    """Whether each backend library is imported already or can be (found on the path; not
    imported here: importing transformers takes seconds)."""
    return {
        name: name in sys.modules or importlib.util.find_spec(name) is not None
        for name in BACKEND_PACKAGES
    }
