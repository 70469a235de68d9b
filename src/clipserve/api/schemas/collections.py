"""HTTP schemas of /v1/collections."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipserve.engine.tasks.embed import Content
from clipserve.engine.tasks.search import Collection, Item
from clipserve.index.base import MAX_DIM, MAX_TOP_K

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class CollectionCreateRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        protected_namespaces=(),
        json_schema_extra={
            "examples": [{"name": "photos", "model": "fast", "metric": "cosine", "index": "hnsw"}]
        },
    )

    name: str = Field(pattern=NAME_PATTERN, description="1-64 letters, digits, _ or -")
    model: str | None = Field(default=None, description="Embeds items and queries (default model).")
    metric: Literal["cosine", "ip", "l2"] = "cosine"
    index: Literal["flat", "ivf-pq", "hnsw", "scann"] = Field(
        default="flat",
        description="flat (exact), ivf-pq or hnsw (FAISS), scann; on Milvus: flat or hnsw",
    )
    store: Literal["local", "milvus"] = "local"
    params: dict[str, Any] | None = Field(
        default=None, description="Index parameters (nlist, m, nprobe, ef_search...)."
    )


class CollectionResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model: str | None
    dim: int
    metric: str
    index: str
    store: str
    size: int
    trained: bool = Field(description="False while an index that needs training scans exactly.")
    memory_bytes: int | None
    params: dict[str, Any]

    @classmethod
    def of(cls, collection: Collection) -> CollectionResponse:
        info = collection.info
        return cls(
            name=info.name,
            model=info.model,
            dim=info.dim,
            metric=info.metric,
            index=info.index,
            store=collection.store,
            size=info.size,
            trained=info.trained,
            memory_bytes=info.memory_bytes,
            params=dict(info.params),
        )


class CollectionListResponse(BaseModel):
    collections: list[CollectionResponse]


class ItemRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=512)
    text: str | None = None
    image: str | None = Field(default=None, description="URL, data URI or path")
    vector: list[float] | None = Field(
        default=None,
        max_length=MAX_DIM,
        description="An embedding computed elsewhere with the collection's model.",
    )
    metadata: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_content(self) -> ItemRequest:
        if sum(v is not None for v in (self.text, self.image, self.vector)) != 1:
            raise ValueError("an item is one text, one image or one vector")
        return self

    def item(self) -> Item:
        if self.text is not None:
            return Item(self.id, Content.text(self.text), self.metadata)
        if self.vector is not None:
            return Item(self.id, np.asarray(self.vector, dtype=np.float32), self.metadata)
        assert self.image is not None
        return Item(self.id, Content.image(self.image), self.metadata)


class AddItemsRequest(BaseModel):
    items: list[ItemRequest] = Field(min_length=1)


class ItemError(BaseModel):
    index: int
    id: str
    error: str


class AddItemsResponse(BaseModel):
    collection: str
    added: int
    errors: list[ItemError] = Field(description="Items that could not be embedded (not added).")


class SearchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"text": "a photo of a cat", "top_k": 5},
                {"text": "red", "image": "https://example.com/shoe.jpg", "text_weight": 0.3},
            ]
        },
    )

    text: str | None = None
    image: str | None = Field(default=None, description="URL, data URI or path")
    text_weight: float = Field(
        default=0.5, ge=0, le=1, description="With both: w·text + (1-w)·image (normalised)."
    )
    top_k: int = Field(default=10, ge=1, le=MAX_TOP_K)
    filter: dict[str, Any] | None = Field(
        default=None,
        description='Metadata: {"key": value} or {"key": {"$in": [...]}}; all must match.',
    )


class SearchHit(BaseModel):
    id: str
    score: float = Field(
        description="cosine or inner product (higher is better), l2 distance (lower)."
    )
    metadata: dict[str, Any]


class SearchResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    collection: str
    model: str
    results: list[SearchHit]
