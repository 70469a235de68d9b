"""Service facts, warm-up and the profiler: GET /v1/system/status, POST /v1/system/profile and
GET /v1/system/profiles/{file} (admin); and on ``inference_router`` (mounted under
``server.inference_prefix``, ``/api/v1``): POST /warmup and GET /capabilities."""

from __future__ import annotations

import dataclasses
import logging
import platform
import re
import time

import PIL
import torch
from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from clipserve import __version__
from clipserve.api.deps import EngineDep
from clipserve.api.routes.health import describe_device, recent_requests
from clipserve.api.schemas.system import (
    CapabilitiesResponse,
    GpuMemory,
    ModelCapabilities,
    ModelWarmup,
    ProfiledOperator,
    ProfileRequest,
    ProfileResponse,
    QueueCapabilities,
    StatusResponse,
    WarmupPass,
    WarmupRequest,
    WarmupResponse,
)
from clipserve.api.security import require_admin
from clipserve.config import Settings
from clipserve.engine.batcher import QueueStats
from clipserve.engine.profiler import trace_folder
from clipserve.engine.registry import ModelState, ModelStatus
from clipserve.engine.warmup import WarmupReport
from clipserve.errors import ItemNotFoundError, ModelLoadError
from clipserve.models.loader import dtype_name, resolve_device, resolve_dtype
from clipserve.observability.system import backend_packages, gpu_memory

logger = logging.getLogger(__name__)

router = APIRouter(tags=["system"])
inference_router = APIRouter(tags=["inference service"])


@router.get("/v1/system/status", response_model=StatusResponse)
async def status(engine: EngineDep) -> StatusResponse:
    """Service facts: versions, uptime, device, config reloads, model counts, the last five
    minutes' requests and 5xx rate, GPU memory, limits."""
    settings, registry = engine.settings, engine.registry
    statuses = registry.statuses()
    media = settings.media
    gpus = gpu_memory()
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
        recent=recent_requests(engine.metrics.recent.recent()),
        gpu=[GpuMemory(**dataclasses.asdict(g)) for g in gpus] if gpus is not None else None,
        limits={
            "max_image_bytes": media.max_image_bytes,
            "max_image_pixels": media.max_image_pixels,
            "max_batch_items": settings.server.max_batch_items,
            "max_prompt_chars": settings.server.max_prompt_chars,
            "fetch_timeout_s": media.fetch_timeout_s,
        },
    )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _model_warmup(report: WarmupReport) -> ModelWarmup:
    return ModelWarmup(
        model=report.model,
        status="error" if report.error else "ok",
        device=report.device,
        modalities=list(report.modalities),
        passes=[
            WarmupPass(
                modality=p.modality,
                batch_size=p.batch_size,
                duration_ms=_ms(p.duration_s),
            )
            for p in report.passes
        ],
        duration_ms=_ms(report.duration_s),
        error=report.error,
    )


@inference_router.post("/warmup", response_model=WarmupResponse)
async def warmup(engine: EngineDep, body: WarmupRequest | None = None) -> WarmupResponse:
    """Dummy forward passes (batch 1 and the queue's max batch size, per modality) through the
    named models, loading them first if needed; no body: every loaded model. A model that fails
    has its `error` (the request still answers 200); an unknown model is a 404."""
    started = time.perf_counter()
    reports = await engine.warm_up(body.models if body else None)
    return WarmupResponse(
        models=[_model_warmup(r) for r in reports],
        total_ms=_ms(time.perf_counter() - started),
    )


def _default_device(settings: Settings) -> tuple[str, str | None]:
    """The service's default device and the dtype weights get there (unless a spec says)."""
    try:
        device = resolve_device(settings.device)
    except ModelLoadError:
        return describe_device(settings.device), None
    return device, dtype_name(resolve_dtype(device, None, settings.cuda_precision))


def _gpus() -> list[GpuMemory] | None:
    try:
        gpus = gpu_memory()
    except Exception:  # a driver hiccup must not fail the report
        logger.warning("could not read GPU memory", exc_info=True)
        return None
    return [GpuMemory(**dataclasses.asdict(g)) for g in gpus] if gpus is not None else None


def _model_capabilities(status: ModelStatus, queues: list[QueueStats]) -> ModelCapabilities:
    info = status.info
    assert info is not None  # loaded
    by_modality = {q.modality: q for q in queues if q.model == status.name}  # the newest wins
    runtime = info.runtime
    return ModelCapabilities(
        name=status.name,
        backend=info.backend,
        architecture=info.architecture,
        device=info.device,
        dtype=info.dtype,
        runtime=runtime.name,
        compiled=runtime.name == "compile",
        runtime_towers=list(runtime.towers),
        runtime_load_ms=None if runtime.load_s is None else _ms(runtime.load_s),
        runtime_fallback=runtime.fallback,
        modalities=sorted(info.modalities),
        queues=[
            QueueCapabilities(
                modality=q.modality,
                max_batch_size=q.max_batch_size,
                probed_batch_size=q.probed_batch_size,
            )
            for _, q in sorted(by_modality.items())
        ],
        load_time_ms=None if status.load_time_s is None else _ms(status.load_time_s),
        warmup_time_ms=None if status.warmup_time_s is None else _ms(status.warmup_time_s),
        warmed_up_at=status.warmed_up_at,
    )


@inference_router.get("/capabilities", response_model=CapabilitiesResponse)
async def capabilities(engine: EngineDep) -> CapabilitiesResponse:
    """What this server runs on and with: device, dtype, runtime, batch sizes per queue, image
    decoder, backend libraries, torch and CUDA (GPU memory per device), and per loaded model its
    device, dtype, queues and load and warm-up times."""
    settings = engine.settings
    device, dtype = _default_device(settings)
    queues = list(engine.batcher.stats().queues)
    models = [
        _model_capabilities(s, queues)
        for s in engine.registry.statuses()
        if s.loaded and s.info is not None
    ]
    return CapabilitiesResponse(
        device=device,
        dtype=dtype,
        compiled=any(m.compiled for m in models),
        pillow_version=PIL.__version__,
        backends=backend_packages(),
        torch_version=torch.__version__,
        cuda_available=torch.cuda.is_available(),
        cuda_version=torch.version.cuda,
        gpu=_gpus(),
        max_batch_size=settings.batching.max_batch_size,
        models=models,
    )


_TRACE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}\.json$")


@router.post(
    "/v1/system/profile", response_model=ProfileResponse, dependencies=[Depends(require_admin)]
)
async def profile(body: ProfileRequest, engine: EngineDep) -> ProfileResponse:
    """torch.profiler over `passes` dummy batches of `batch_size` on the model's device thread
    (between live batches, never beside one): the top operators by self CPU time, peak device
    memory, and a Chrome trace to download. Admin only when API keys are on."""
    report = await engine.profile(
        body.model, body.modality, batch_size=body.batch_size, passes=body.passes
    )
    return ProfileResponse(
        model=report.model,
        modality=report.modality,
        batch_size=report.batch_size,
        passes=report.passes,
        wall_ms=round(report.wall_ms, 2),
        peak_memory_mb=report.peak_memory_mb,
        operators=[ProfiledOperator(**dataclasses.asdict(op)) for op in report.operators],
        trace_url=f"/v1/system/profiles/{report.trace.name}",
    )


@router.get(
    "/v1/system/profiles/{file}",
    response_class=FileResponse,
    dependencies=[Depends(require_admin)],
)
async def profile_trace(file: str, engine: EngineDep) -> FileResponse:
    """A Chrome trace written by `POST /v1/system/profile`."""
    path = trace_folder(engine.settings.server.profile_dir) / file
    if not _TRACE_NAME.match(file) or not path.is_file():
        raise ItemNotFoundError("profiles", file)
    return FileResponse(path, media_type="application/json")
