"""HTTP schemas of /v1/rank and /v1/classify."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clipserve.api.schemas.embeddings import Usage
from clipserve.api.schemas.inputs import ImageItem, InputItem
from clipserve.engine.tasks.retrieve import MAX_LABELS


class RankRequest(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "fast",
                    "query": "a photo of a cat",
                    "documents": [{"image": "https://example.com/cat.jpg"}, "a dog"],
                    "top_n": 1,
                    "return_documents": True,
                }
            ]
        },
    )

    model: str | None = None
    query: InputItem
    documents: list[InputItem] = Field(min_length=1)
    top_n: int | None = Field(default=None, ge=1, description="Return the best n only.")
    return_documents: bool = False
    query_modality: Literal["text", "image"] = Field(
        default="text", description="What a plain-string query is."
    )
    documents_modality: Literal["text", "image"] = Field(
        default="text", description="What plain-string documents are."
    )


class RankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float | None = Field(
        description="Cosine similarity to the query, in [-1, 1]; null when the document failed."
    )
    document: str | None = Field(
        default=None, description="The text, or a short reference to the image (return_documents)."
    )
    error: str | None = Field(
        default=None, description="Why this document could not be ranked (it is listed last)."
    )


class RankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    model: str
    results: list[RankResult] = Field(
        description="Most relevant first (at most top_n), then every document that failed."
    )
    usage: Usage


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "fast",
                    "input": "https://example.com/cat.jpg",
                    "labels": ["cat", "dog", "car"],
                    "template": "a photo of a {}",
                }
            ]
        },
    )

    model: str | None = None
    input: str | ImageItem | list[str | ImageItem] = Field(
        description="One image or a list: URLs, data URIs, paths, or {image} items."
    )
    labels: list[str] = Field(min_length=1, max_length=MAX_LABELS)
    template: str = Field(
        default="a photo of a {}", min_length=2, max_length=500, description="'{}' is the label."
    )


class LabelResult(BaseModel):
    index: int = Field(description="Position of the label in the request.")
    label: str
    score: float = Field(description="Cosine similarity of the image and the label's prompt.")
    probability: float = Field(
        description="Softmax over logit_scale*cos across labels (CLIP), or sigmoid (SigLIP)."
    )


class Classification(BaseModel):
    index: int
    top_label: str | None = Field(description="The most probable label; null on error.")
    labels: list[LabelResult] = Field(description="Most probable first; empty on error.")
    error: str | None = Field(default=None, description="Why this image could not be classified.")


class ClassifyResponse(BaseModel):
    object: Literal["classification"] = "classification"
    model: str
    data: list[Classification]
