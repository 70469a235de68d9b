"""Facts about the machine: GPU memory (when CUDA is present)."""

from __future__ import annotations

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
