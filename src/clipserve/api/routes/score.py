"""POST /v1/score: the image x text CLIP-score matrix, and image x image or text x text cosine
matrices, in one call."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from clipserve.api.deps import CallerDep, EngineDep, InputsDep
from clipserve.api.schemas.score import (
    ScoredItem,
    ScoredText,
    ScoreRequest,
    ScoreResponse,
    ScoreTiming,
)
from clipserve.api.security import counted_before_validation

router = APIRouter(tags=["evaluation"])


@router.post(
    "/v1/score",
    response_model=ScoreResponse,
    dependencies=[
        Depends(counted_before_validation("images")),
        Depends(counted_before_validation("texts")),
    ],
)
async def score(
    body: ScoreRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> ScoreResponse:
    """Every image against every text: `scores[i][j]` = max(100 * cos(image i, text j), 0), the
    seed's CLIP score. With images only, `image_similarity` (cosines; CLIP-I); with texts only,
    `text_similarity`; with both and `self_similarity`, all three. An input that fails has its
    `error` and null cells; the answer holds at most 100,000 cells."""
    images, texts = body.images or [], body.texts or []
    await inputs(len(images) + len(texts), "images and texts")
    result = await engine.score(
        body.model, images, texts, self_similarity=body.self_similarity, client=caller
    )
    return ScoreResponse(
        model=result.model,
        images=[
            ScoredItem(index=i, error=s.error.message if s.error else None)
            for i, s in enumerate(result.images)
        ],
        texts=[
            ScoredText(index=i, error=s.error.message if s.error else None, truncated=s.truncated)
            for i, s in enumerate(result.texts)
        ],
        scores=result.scores,
        image_similarity=result.image_similarity,
        text_similarity=result.text_similarity,
        timing=ScoreTiming(total_ms=round(result.seconds * 1000, 3)),
    )
