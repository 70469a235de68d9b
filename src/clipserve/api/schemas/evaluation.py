"""HTTP schemas of the evaluation API (field names are part of the public contract)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

_IMAGE_DESCRIPTION = (
    "An http(s) URL, a base64 data URI (data:image/png;base64,...), or a local path under the "
    "configured media root."
)


class EvaluationRequest(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "image_input": "https://example.com/cat.jpg",
                    "text_prompt": "a photo of a cat",
                    "model_config_name": "fast",
                }
            ]
        },
    )

    image_input: str = Field(description=_IMAGE_DESCRIPTION)
    text_prompt: str = Field(description="The caption to score against the image.")
    model_config_name: str | None = Field(
        default=None,
        description="A model config name from the registry; the default model if omitted.",
    )


class EvaluationResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    image_input: str = Field(description="The input, echoed (long data URIs abbreviated).")
    text_prompt: str
    clip_score: float | None = Field(description="max(100 * cos(image, text), 0); null on error.")
    processing_time_ms: float
    model_used: str = Field(description="The model config name that produced the score.")
    error: str | None = None
    text_truncated: bool = Field(
        default=False, description="True when the prompt was longer than the model's context."
    )
    text_context_length: int | None = Field(
        default=None,
        description=(
            "The model's text context in tokens (77 for CLIP, 64 for SigLIP, 248 for "
            "Long-CLIP...): the limit text_truncated is about; null on error."
        ),
    )


class BatchEvaluationRequest(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "evaluations": [
                        {"image_input": "https://example.com/cat.jpg", "text_prompt": "a cat"},
                        {
                            "image_input": "https://example.com/dog.jpg",
                            "text_prompt": "a dog",
                            "model_config_name": "accurate",
                        },
                    ],
                    "batch_size": 32,
                    "show_progress": True,
                }
            ]
        }
    )

    evaluations: list[EvaluationRequest] = Field(min_length=1)
    batch_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description=(
            "Pipelining window: up to 2 x batch_size of this request's pairs are fetched, decoded "
            "and queued ahead. Forward passes are formed by the server's batcher (max_batch_size), "
            "shared with concurrent requests."
        ),
    )
    show_progress: bool = Field(default=True, description="Log progress on the server.")


class BatchEvaluationResponse(BaseModel):
    results: list[EvaluationResponse] = Field(description="One result per evaluation, in order.")
    total_processed: int
    total_successful: int
    total_failed: int
    total_processing_time_ms: float
