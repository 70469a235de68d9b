"""Probes and metrics: GET /health, /ready and /evaluator/health, and Prometheus at /metrics and
/evaluator/metrics.

Readiness comes from one place (``Engine.readiness``) and maps to HTTP in one place here: ready is
200, not ready is 503 with the reason and, where known, ``Retry-After``.
"""

from __future__ import annotations

import dataclasses
import time

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from clipserve import __version__
from clipserve.api.deps import EngineDep, MetricsDep
from clipserve.api.errors import retry_after
from clipserve.api.schemas.system import (
    BatchProcessing,
    GpuMemory,
    HealthResponse,
    QueueInfo,
    ReadyResponse,
    RecentRequestsInfo,
    ServiceHealth,
)
from clipserve.engine.batcher import BatcherStats
from clipserve.engine.core import Readiness
from clipserve.engine.engine import Engine
from clipserve.engine.registry import ModelState, ModelStatus
from clipserve.errors import ModelLoadError, ModelNotFoundError
from clipserve.models.loader import resolve_device
from clipserve.observability.system import gpu_memory
from clipserve.observability.window import RecentRequests

router = APIRouter(tags=["system"])


def describe_device(requested: str) -> str:
    """The device ``requested`` resolves to, or why it cannot be used."""
    try:
        return resolve_device(requested)
    except ModelLoadError as exc:  # e.g. cuda configured on a host without it
        return f"{requested} (unavailable: {exc.message})"


def _probe(body: dict[str, object], readiness: Readiness) -> JSONResponse:
    """The one mapping of readiness to HTTP: 200, or 503 with Retry-After where known."""
    if readiness.ready:
        return JSONResponse(body)
    return JSONResponse(body, status_code=503, headers=retry_after(readiness.retry_after_s))


def _default_model(engine: Engine) -> ModelStatus | None:
    try:
        return engine.registry.status(engine.settings.default_model)
    except ModelNotFoundError:
        return None


def _device(engine: Engine, status: ModelStatus | None) -> str:
    if status is not None and status.device:
        return status.device
    return describe_device((status.spec.device if status else None) or engine.settings.device)


def _batch_processing(engine: Engine, stats: BatcherStats) -> BatchProcessing:
    settings = engine.settings.batching
    return BatchProcessing(
        accepting=stats.accepting,
        max_batch_size=settings.max_batch_size,
        batch_timeout_s=settings.batch_timeout,
        num_batching_workers=settings.num_batching_workers,
        max_concurrent_batches=settings.max_concurrent_batches,
        max_queue_size=settings.max_queue_size,
        queue_overflow_action=settings.queue_overflow_action,
        request_timeout_s=settings.request_timeout,
        batches_processed=sum(q.batches for q in stats.queues),
        items_processed=sum(q.items for q in stats.queues),
        queues=[
            QueueInfo(
                model=q.model,
                modality=q.modality,
                device=q.device,
                size=q.size,
                max_batch_size=q.max_batch_size,
                batches=q.batches,
                items=q.items,
                drain_rate_items_per_s=round(q.drain_rate, 3) if q.drain_rate else None,
                consecutive_failures=q.consecutive_failures,
                last_error=q.last_error,
                running_for_s=round(q.running_for_s, 3),
            )
            for q in stats.queues
        ],
    )


@router.get(
    "/health",
    response_model=ServiceHealth,
    responses={503: {"model": ServiceHealth, "description": "batcher or default model not ready"}},
)
async def health(engine: EngineDep) -> JSONResponse:
    """The batcher and the default model; 503 (with the reason in `error`) when not ready."""
    readiness = engine.readiness()
    stats = engine.batcher.stats()
    status = _default_model(engine)
    body = ServiceHealth(
        status="healthy" if readiness.ready else "unhealthy",
        model=engine.settings.default_model,
        model_state=status.state.value if status else None,
        device=_device(engine, status),
        queue_size=stats.queue_size,
        inflight_batches=stats.inflight_batches,
        batch_processing=_batch_processing(engine, stats),
        error=readiness.reason,
    )
    return _probe(body.model_dump(mode="json"), readiness)


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready (see error)"}},
)
async def ready(engine: EngineDep) -> JSONResponse:
    """Readiness probe: 200 `{"status": "ready"}`, or 503 with the reason."""
    readiness = engine.readiness()
    body = ReadyResponse(status="ready" if readiness.ready else "not_ready", error=readiness.reason)
    return _probe(body.model_dump(exclude_none=True), readiness)


@router.get("/evaluator/health", response_model=HealthResponse)
async def evaluator_health(engine: EngineDep) -> HealthResponse:
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
        recent=recent_requests(engine.metrics.recent.recent()),
    )


def recent_requests(recent: RecentRequests) -> RecentRequestsInfo:
    rate = recent.error_rate
    return RecentRequestsInfo(
        window_s=recent.window_s,
        requests=recent.requests,
        server_errors=recent.server_errors,
        error_rate=None if rate is None else round(rate, 6),
    )


@router.get("/metrics", response_class=Response)
@router.get("/evaluator/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format (one registry, on both paths)."""
    return Response(content=metrics.render(), media_type=metrics.content_type)
