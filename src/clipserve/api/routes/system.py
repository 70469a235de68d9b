"""Health, status and metrics."""

from __future__ import annotations

import dataclasses
import platform
import time

import torch
from fastapi import APIRouter, Response

from clipserve import __version__
from clipserve.api.deps import EngineDep, MetricsDep
from clipserve.api.schemas.system import GpuMemory, HealthResponse, StatusResponse
from clipserve.engine.registry import ModelState
from clipserve.errors import ModelLoadError
from clipserve.models.loader import resolve_device
from clipserve.observability.system import gpu_memory

router = APIRouter(tags=["system"])


def describe_device(requested: str) -> str:
    """The device ``requested`` resolves to, or why it cannot be used."""
    try:
        return resolve_device(requested)
    except ModelLoadError as exc:  # e.g. cuda configured on a host without it
        return f"{requested} (unavailable: {exc.message})"


@router.get("/evaluator/health", response_model=HealthResponse)
async def health(engine: EngineDep) -> HealthResponse:
    """Liveness with the truth about models: `degraded` when an enabled model failed to load or
    its inputs keep failing."""
    statuses = engine.registry.statuses()
    errors = {s.name: s.error or "failed to load" for s in statuses if s.state is ModelState.ERROR}
    enabled = {s.name for s in statuses}
    for name, problems in engine.queue_problems().items():
        if name in enabled:
            errors.setdefault(name, "; ".join(problems))
    gpus = gpu_memory()
    return HealthResponse(
        status="degraded" if errors else "healthy",
        version=__version__,
        uptime_s=round(time.time() - engine.started_at, 3),
        default_model=engine.settings.default_model,
        models={s.name: s.state.value for s in statuses},
        model_errors=errors,
        gpu=[GpuMemory(**dataclasses.asdict(g)) for g in gpus] if gpus is not None else None,
    )


@router.get("/v1/system/status", response_model=StatusResponse)
async def status(engine: EngineDep) -> StatusResponse:
    """Service facts: versions, device, config reloads, model counts, limits."""
    settings, registry = engine.settings, engine.registry
    statuses = registry.statuses()
    media = settings.media
    return StatusResponse(
        version=__version__,
        uptime_s=round(time.time() - engine.started_at, 3),
        started_at=engine.started_at,
        python_version=platform.python_version(),
        torch_version=torch.__version__,
        cuda_available=torch.cuda.is_available(),
        device=describe_device(settings.device),
        default_model=settings.default_model,
        config_path=str(settings.config_path) if settings.config_path else None,
        last_reload_at=registry.last_reload_at,
        last_reload_error=registry.last_reload_error,
        models_total=len(statuses),
        models_loaded=sum(s.state is ModelState.LOADED for s in statuses),
        models_failed=sum(s.state is ModelState.ERROR for s in statuses),
        limits={
            "max_image_bytes": media.max_image_bytes,
            "max_image_pixels": media.max_image_pixels,
            "max_batch_items": settings.server.max_batch_items,
            "max_prompt_chars": settings.server.max_prompt_chars,
            "fetch_timeout_s": media.fetch_timeout_s,
        },
    )


@router.get("/evaluator/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format."""
    return Response(content=metrics.render(), media_type=metrics.content_type)
