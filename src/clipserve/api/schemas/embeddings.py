"""HTTP schemas of /embed and the OpenAI-compatible /v1/embeddings."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from clipserve.api.schemas.inputs import InputItem, OpenAIBaseModel

EncodingFormat = Literal["float", "base64"]
CACHE_DESCRIPTION = (
    "false: compute every embedding, neither reading nor filling the server's embedding cache."
)


class EmbedRequest(BaseModel):
    input_text: str = Field(min_length=1, max_length=1024, description="The text to embed.")
    cache: bool = Field(default=True, description=CACHE_DESCRIPTION)


class EmbedResponse(BaseModel):
    embedding: list[float] = Field(description="L2-normalised embedding.")
    model: str


class EmbeddingsRequest(OpenAIBaseModel):
    model_config = OpenAIBaseModel.model_config | {
        "json_schema_extra": {
            "examples": [
                {"model": "fast", "input": ["a photo of a cat", "a photo of a dog"]},
                {"model": "fast", "input": ["data:image/png;base64,iVBOR..."], "modality": "image"},
                {"model": "fast", "input": [{"image": "https://example.com/cat.jpg"}]},
            ]
        }
    }

    model: str | None = Field(default=None, description="Model config name; default if omitted.")
    input: str | list[int] | list[list[int]] | list[InputItem] = Field(
        description="A string, or a list of strings / {text} / {image} / image_url items."
    )
    encoding_format: EncodingFormat = Field(
        default="float", description="float, or base64 of little-endian float32 (as OpenAI)."
    )
    dimensions: int | None = Field(
        default=None, ge=1, description="Only where the model was trained to be truncated."
    )
    user: str | None = None
    modality: Literal["text", "image"] = Field(
        default="text", description="What plain strings in `input` are (Infinity-style)."
    )
    cache: bool = Field(default=True, description=CACHE_DESCRIPTION)


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage
