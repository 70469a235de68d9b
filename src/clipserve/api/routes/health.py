"""GET /health, /ready and /metrics: probes for load balancers and Kubernetes, and Prometheus."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from clipserve.api.deps import EngineDep, MetricsDep
from clipserve.api.routes.system import describe_device
from clipserve.api.schemas.system import (
    BatchProcessing,
    QueueInfo,
    ReadyResponse,
    ServiceHealth,
)
from clipserve.engine.batcher import BatcherStats
from clipserve.engine.engine import Engine
from clipserve.engine.registry import ModelStatus
from clipserve.errors import ModelNotFoundError

router = APIRouter(tags=["system"])


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


def _retry_after(seconds: float | None) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))} if seconds else {}


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
    return JSONResponse(
        body.model_dump(mode="json"),
        status_code=200 if readiness.ready else 503,
        headers=_retry_after(readiness.retry_after_s),
    )


@router.get(
    "/ready",
    response_model=ReadyResponse,
    responses={503: {"model": ReadyResponse, "description": "not ready (see error)"}},
)
async def ready(engine: EngineDep) -> JSONResponse:
    """Readiness probe: 200 `{"status": "ready"}`, or 503 with the reason."""
    readiness = engine.readiness()
    if readiness.ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        ReadyResponse(status="not_ready", error=readiness.reason).model_dump(),
        status_code=503,
        headers=_retry_after(readiness.retry_after_s),
    )


@router.get("/metrics", response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus text format (the same registry as /evaluator/metrics)."""
    return Response(content=metrics.render(), media_type=metrics.content_type)
