"""Facts about the machine: GPU memory (when CUDA is present), the backend libraries installed."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass

import torch


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


BACKEND_PACKAGES = ("open_clip", "transformers", "sentence_transformers")
"""The libraries behind the ``open_clip``, ``hf`` and ``sentence-transformers`` backends."""


def backend_packages() -> dict[str, bool]:
    """Whether each backend library is imported already or can be (found on the path; not
    imported here: importing transformers takes seconds)."""
    return {
        name: name in sys.modules or importlib.util.find_spec(name) is not None
        for name in BACKEND_PACKAGES
    }
