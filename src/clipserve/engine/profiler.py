"""The PyTorch profiler over a model's forward passes (seed 002's "integrate PyTorch Profiler,
memory usage tracking"): ``clipserve profile`` and ``POST /v1/system/profile``.

The passes are dummy batches (:func:`clipserve.engine.encoder.dummy_forward`) run on the model's
device thread, so under live load they take their turn between real batches and never run beside
one; the profiler records them (CPU, and CUDA where the model is on a GPU, with memory), writes a
Chrome trace and returns the operators with the most self time.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clipserve.engine.encoder import dummy_forward
from clipserve.engine.registry import ModelHandle
from clipserve.errors import InvalidInputError, UnsupportedModalityError
from clipserve.models.base import Modality

MAX_PASSES = 100


def trace_folder(configured: Path | None) -> Path:
    """Where traces go: ``server.profile_dir``, else ``<tmp>/clipserve-profiles``."""
    return configured or Path(tempfile.gettempdir()) / "clipserve-profiles"


TOP_OPERATORS = 15


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    calls: int
    self_cpu_ms: float
    cpu_ms: float
    self_device_ms: float
    self_cpu_memory_mb: float


@dataclass(frozen=True, slots=True)
class ProfileReport:
    model: str
    modality: Modality
    batch_size: int
    passes: int
    wall_ms: float
    """The profiled passes' wall time (the profiler's own cost included)."""
    peak_memory_mb: float | None
    """Peak device memory allocated during the passes (CUDA only)."""
    operators: tuple[Operator, ...]
    trace: Path


def _run(
    handle: ModelHandle, modality: Modality, batch_size: int, passes: int, trace: Path
) -> ProfileReport:
    """On the device thread."""
    from torch.profiler import ProfilerActivity, profile

    forward = dummy_forward(handle.backend, modality)
    cuda = handle.device.startswith("cuda") and torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    forward(batch_size)  # warm: the first pass pays allocations and lazy initialisation
    if cuda:
        torch.cuda.synchronize(handle.device)
        torch.cuda.reset_peak_memory_stats(handle.device)
    started = time.perf_counter()
    with profile(activities=activities, profile_memory=True) as prof:
        for _ in range(passes):
            forward(batch_size)
        if cuda:
            torch.cuda.synchronize(handle.device)
    wall_ms = (time.perf_counter() - started) * 1000
    peak = torch.cuda.max_memory_allocated(handle.device) / 2**20 if cuda else None
    trace.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(trace))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    operators = tuple(
        Operator(
            name=e.key,
            calls=e.count,
            self_cpu_ms=e.self_cpu_time_total / 1000,
            cpu_ms=e.cpu_time_total / 1000,
            self_device_ms=getattr(e, "self_device_time_total", 0.0) / 1000,
            self_cpu_memory_mb=e.self_cpu_memory_usage / 2**20,
        )
        for e in events[:TOP_OPERATORS]
    )
    return ProfileReport(handle.name, modality, batch_size, passes, wall_ms, peak, operators, trace)


async def profile_model(
    handle: ModelHandle, modality: Modality, *, batch_size: int, passes: int, trace: Path
) -> ProfileReport:
    """Profile ``passes`` forward passes of ``batch_size`` dummy inputs on the device thread,
    writing the Chrome trace to ``trace``."""
    if modality not in handle.info.modalities:
        raise UnsupportedModalityError(
            f"model '{handle.name}' cannot encode {modality} inputs "
            f"(it supports: {', '.join(sorted(handle.info.modalities))})"
        )
    if not 1 <= passes <= MAX_PASSES:
        raise InvalidInputError(f"passes is 1 to {MAX_PASSES}, not {passes}")
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        handle.executor, _run, handle, modality, batch_size, passes, trace
    )


def format_report(report: ProfileReport) -> list[str]:
    """The report as text lines: a header, then one line per operator."""
    peak = "" if report.peak_memory_mb is None else f", peak {report.peak_memory_mb:.1f} MB"
    lines = [
        f"{report.model} {report.modality}: {report.passes} passes of batch {report.batch_size} "
        f"in {report.wall_ms:.1f} ms{peak}; trace: {report.trace}",
        f"{'operator':<44} {'calls':>6} {'self cpu ms':>12} {'cpu ms':>10} "
        f"{'self dev ms':>12} {'self mem MB':>12}",
    ]
    for op in report.operators:
        lines.append(
            f"{op.name[:44]:<44} {op.calls:>6} {op.self_cpu_ms:>12.2f} {op.cpu_ms:>10.2f} "
            f"{op.self_device_ms:>12.2f} {op.self_cpu_memory_mb:>12.2f}"
        )
    return lines
