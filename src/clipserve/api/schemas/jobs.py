"""HTTP schemas of /v1/jobs."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from clipserve.engine.jobs import JobState, JobStatus

JobType = Literal["embed", "score"]


class JobItem(BaseModel):
    """An item: for ``embed`` one of ``text`` or ``image``; for ``score`` both (also spelled
    ``image_input`` and ``text_prompt``, as in ``/api/v1/evaluate``)."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(default=None, validation_alias=AliasChoices("image", "image_input"))
    text: str | None = Field(default=None, validation_alias=AliasChoices("text", "text_prompt"))

    def as_dict(self) -> dict[str, str]:
        return {k: v for k, v in (("image", self.image), ("text", self.text)) if v is not None}


class JobRequest(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "type": "embed",
                    "model": "fast",
                    "items": [{"text": "a photo of a cat"}, {"image": "https://example.com/a.jpg"}],
                },
                {
                    "type": "score",
                    "items": [{"image": "https://example.com/a.jpg", "text": "a photo of a cat"}],
                },
            ]
        },
    )

    type: JobType
    model: str | None = None
    items: list[JobItem] = Field(min_length=1)

    @model_validator(mode="after")
    def _items_fit_type(self) -> JobRequest:
        for i, item in enumerate(self.items):
            both = item.image is not None and item.text is not None
            neither = item.image is None and item.text is None
            if self.type == "score" and not both:
                raise ValueError(f"items[{i}]: a score item needs both image and text")
            if self.type == "embed" and (both or neither):
                raise ValueError(f"items[{i}]: an embed item is one text or one image")
        return self


class JobCounts(BaseModel):
    total: int
    done: int
    succeeded: int
    failed: int


class JobError(BaseModel):
    index: int
    error: str


class JobResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    id: str
    type: JobType
    model: str
    state: JobState
    progress: float = Field(description="Items done (succeeded or failed) over the total, 0 to 1.")
    counts: JobCounts
    chunks: int
    chunks_done: int
    errors: list[JobError] = Field(description="The first 20 failed items (counts has them all).")
    reason: str | None = Field(default=None, description="Why it failed or was cancelled.")
    created_at: float
    started_at: float | None
    finished_at: float | None
    results_url: str

    @classmethod
    def of(cls, status: JobStatus) -> JobResponse:
        return cls(
            id=status.id,
            type=status.kind,
            model=status.model,
            state=status.state,
            progress=round(status.progress, 6),
            counts=JobCounts(
                total=status.total,
                done=status.done,
                succeeded=status.succeeded,
                failed=status.failed,
            ),
            chunks=status.chunks,
            chunks_done=status.chunks_done,
            errors=[JobError(index=i, error=e) for i, e in status.errors],
            reason=status.reason,
            created_at=status.created_at,
            started_at=status.started_at,
            finished_at=status.finished_at,
            results_url=f"/v1/jobs/{status.id}/results",
        )
