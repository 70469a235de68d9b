"""HTTP schemas of the ML inference service's endpoints (seed 001): captions, image and text
embeddings, under ``server.inference_prefix`` (``/api/v1``), and ``POST /v1/qa``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipserve.api.schemas.embeddings import CACHE_DESCRIPTION

_EMBEDDING_MODEL = "An embedding model's config name (default: `default_model`)."
_IMAGE = "An image: an http(s) URL, a base64 data URI or a path under the media root."


class GenerationFields(BaseModel):
    max_new_tokens: int | None = Field(
        default=None,
        description="Tokens to generate at most (default `captions.max_new_tokens`; at most "
        "`captions.max_new_tokens_limit`).",
    )
    num_beams: int | None = Field(
        default=None,
        description="1: greedy decoding (default); more: beam search (at most "
        "`captions.max_num_beams`).",
    )


class CaptionRequest(GenerationFields):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"image": "https://example.com/cat.jpg"},
                {"images": ["data:image/png;base64,iVBOR..."], "prompt": "a photography of"},
            ]
        },
    )

    model: str | None = Field(
        default=None,
        description="A caption model's config name (default `captions.default_model`).",
    )
    image: str | None = Field(default=None, description=_IMAGE)
    images: list[str] | None = Field(default=None, description="Several images (" + _IMAGE + ")")
    prompt: str | None = Field(
        default=None,
        description="A text each caption continues (conditional captioning); default: the "
        "model's `prompt`.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> CaptionRequest:
        if (self.image is None) == (self.images is None):
            raise ValueError("send exactly one of 'image' or 'images'")
        return self

    @property
    def all_images(self) -> list[str]:
        return [self.image] if self.image is not None else list(self.images or [])


class CaptionItem(BaseModel):
    index: int
    caption: str | None = Field(description="None when this image failed (see `error`).")
    error: str | None = None


class Timing(BaseModel):
    total_ms: float
    per_image_ms: float


class CaptionResponse(BaseModel):
    model: str
    captions: list[CaptionItem]
    timing: Timing


class QaRequest(GenerationFields):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        default=None,
        description="A model that answers questions (BLIP VQA, BLIP-2, openai-vision; default "
        "`captions.default_model`).",
    )
    image: str = Field(description=_IMAGE)
    question: str = Field(description="The question about the image.")


class QaResponse(BaseModel):
    model: str
    question: str
    answer: str
    timing: Timing


class EmbedImagesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description=_EMBEDDING_MODEL)
    images: list[str] = Field(description="Images (" + _IMAGE + ")")
    cache: bool = Field(default=True, description=CACHE_DESCRIPTION)


class EmbedTextsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(default=None, description=_EMBEDDING_MODEL)
    texts: list[str] = Field(description="Texts to embed.")
    cache: bool = Field(default=True, description=CACHE_DESCRIPTION)


class VectorsResponse(BaseModel):
    model: str
    dimensions: int
    embeddings: list[list[float]] = Field(description="L2-normalised, in input order.")
    timing: Timing
