"""Input items shared by the embeddings, rank and classify APIs.

A plain string is a text (or, where the request says ``modality: image``, an image reference);
objects say what they are: ``{"text": ...}``, ``{"image": ...}`` or OpenAI's content-part shape
``{"type": "image_url", "image_url": {"url": ...}}``. Image references are http(s) URLs, base64
data URIs, or paths under the media root. An empty item is not a schema error: where the API
answers per item (rank documents, classify images) it fails alone, with its error.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipserve.engine.tasks.embed import Content
from clipserve.models.base import Modality

logger = logging.getLogger(__name__)


class OpenAIBaseModel(BaseModel):
    """Accepts (and logs) fields it does not know, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def model_post_init(self, context: Any, /) -> None:
        if self.model_extra:
            logger.debug(
                "%s: ignoring unknown fields %s", type(self).__name__, sorted(self.model_extra)
            )


class TextItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] | None = None
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str


class ImageItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["image", "image_url"] | None = None
    image: str | None = Field(default=None, description="URL, data URI or path")
    image_url: ImageUrl | str | None = Field(default=None, description="OpenAI content-part style")

    @model_validator(mode="after")
    def _exactly_one(self) -> ImageItem:
        if (self.image is None) == (self.image_url is None):
            raise ValueError("an image item needs exactly one of 'image' or 'image_url'")
        return self

    @property
    def reference(self) -> str:
        if self.image is not None:
            return self.image
        assert self.image_url is not None
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


InputItem = str | TextItem | ImageItem


def to_content(item: InputItem, strings_are: Modality = "text") -> Content:
    if isinstance(item, TextItem):
        return Content.text(item.text)
    if isinstance(item, ImageItem):
        return Content.image(item.reference)
    return Content(strings_are, item)
