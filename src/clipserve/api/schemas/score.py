"""HTTP schemas of POST /v1/score (score matrices)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from clipserve.engine.tasks.score import FORMULA


class ScoreRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"images": ["https://example.com/cat.jpg"], "texts": ["a cat", "a dog"]},
                {"images": ["data:image/png;base64,iVBOR...", "https://example.com/b.jpg"]},
            ]
        },
    )

    model: str | None = Field(default=None, description="Model config name; default if omitted.")
    images: list[str] | None = Field(
        default=None, description="Images: http(s) URLs, data URIs or paths under the media root."
    )
    texts: list[str] | None = Field(default=None, description="Texts (prompts).")
    self_similarity: bool = Field(
        default=False,
        description="Also image x image and text x text cosines when both sides are sent.",
    )


class ScoredItem(BaseModel):
    index: int
    error: str | None = None


class ScoredText(ScoredItem):
    truncated: bool = False


class ScoreTiming(BaseModel):
    total_ms: float


class ScoreResponse(BaseModel):
    model: str
    formula: str = Field(default=FORMULA, description="How `scores` are computed.")
    images: list[ScoredItem]
    texts: list[ScoredText]
    scores: list[list[float | None]] | None = Field(
        description="images x texts CLIP scores; null cells where either input failed; null "
        "without images or without texts."
    )
    image_similarity: list[list[float | None]] | None = Field(
        description="images x images cosine similarity (without texts, or with self_similarity)."
    )
    text_similarity: list[list[float | None]] | None = Field(
        description="texts x texts cosine similarity (without images, or with self_similarity)."
    )
    timing: ScoreTiming
