"""GET /v1/system/status: service facts."""

from __future__ import annotations

import platform
import time

import torch
from fastapi import APIRouter

from clipserve import __version__
from clipserve.api.deps import EngineDep
from clipserve.api.routes.health import describe_device
from clipserve.api.schemas.system import StatusResponse
from clipserve.engine.registry import ModelState

router = APIRouter(tags=["system"])


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
