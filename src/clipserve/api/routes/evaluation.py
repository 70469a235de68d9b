"""POST /evaluator/v1/evaluation/{single,batch}: schema -> engine -> schema."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Depends

from clipserve.api.deps import CallerDep, EngineDep, InputsDep, MetricsDep
from clipserve.api.schemas.evaluation import (
    BatchEvaluationRequest,
    BatchEvaluationResponse,
    EvaluationRequest,
    EvaluationResponse,
)
from clipserve.api.security import counted_before_validation
from clipserve.engine.core import prefetch_window
from clipserve.engine.encoder import UNPAIRED_SURROGATE
from clipserve.engine.tasks.evaluate import EvalItem, EvalResult
from clipserve.errors import quote
from clipserve.media import describe

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/evaluator/v1/evaluation", tags=["evaluation"])


def _echo(text: str, limit: int) -> str:
    """The prompt as echoed back: lone surrogates (refused, but echoed with their error) cannot be
    encoded as UTF-8, so they become U+FFFD; a prompt over the limit (refused) is echoed short."""
    return quote(UNPAIRED_SURROGATE.sub("\ufffd", text), limit)


def _response(request: EvaluationRequest, result: EvalResult, limit: int) -> EvaluationResponse:
    return EvaluationResponse(
        image_input=describe(request.image_input),
        text_prompt=_echo(request.text_prompt, limit),
        clip_score=result.score,
        processing_time_ms=round(result.processing_time_ms, 3),
        model_used=result.model,
        error=result.error.message if result.error else None,
        text_truncated=result.text_truncated,
        text_context_length=result.text_context_length,
    )


def _item(request: EvaluationRequest) -> EvalItem:
    return EvalItem(request.image_input, request.text_prompt, request.model_config_name)


@router.post("/single", response_model=EvaluationResponse)
async def evaluate_single(
    body: EvaluationRequest, engine: EngineDep, caller: CallerDep
) -> EvaluationResponse:
    """Score one image-text pair. Errors answer with their 4xx/5xx status and `{error, detail}`."""
    result = await engine.evaluate_one(_item(body), client=caller)
    return _response(body, result, engine.settings.server.max_prompt_chars)


@router.post(
    "/batch",
    response_model=BatchEvaluationResponse,
    dependencies=[Depends(counted_before_validation("evaluations"))],
)
async def evaluate_batch(
    body: BatchEvaluationRequest,
    engine: EngineDep,
    caller: CallerDep,
    inputs: InputsDep,
    metrics: MetricsDep,
) -> BatchEvaluationResponse:
    """Score many pairs through the batcher (`batch_size` sets how far ahead they are prepared). A
    failing item (an empty or bad image, an empty prompt, an unknown model...) gets
    `clip_score: null` and its `error`; the others succeed. Results keep request order. Only a
    structurally broken request (wrong types, too many items) is refused as a whole (422)."""
    await inputs(len(body.evaluations), "evaluations")
    started = time.perf_counter()
    step = max(1, len(body.evaluations) // 10)

    def progress(done: int, total: int) -> None:
        if done == total or done % step == 0:
            logger.info("batch evaluation progress: %d/%d", done, total)

    results = await engine.evaluate(
        [_item(e) for e in body.evaluations],
        window=prefetch_window(body.batch_size),
        progress=progress if body.show_progress else None,
        client=caller,
    )
    elapsed = time.perf_counter() - started
    limit = engine.settings.server.max_prompt_chars
    failed = sum(1 for r in results if r.error is not None)
    metrics.batch_processing_efficiency.set(len(results) / elapsed if elapsed > 0 else 0.0)
    return BatchEvaluationResponse(
        results=[
            _response(req, res, limit) for req, res in zip(body.evaluations, results, strict=True)
        ],
        total_processed=len(results),
        total_successful=len(results) - failed,
        total_failed=failed,
        total_processing_time_ms=round(elapsed * 1000, 3),
    )
