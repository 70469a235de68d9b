"""Multipart image uploads on the same paths as the JSON APIs.

A JSON route and a multipart route share a path: :class:`MultipartRoute` matches only requests
whose body is ``multipart/form-data``, so each kind is validated by FastAPI with its own
parameters. The JSON route documents both bodies in OpenAPI (:func:`multipart_body`).
"""

from __future__ import annotations

from typing import Any

from fastapi import UploadFile
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from clipserve.config import MediaSettings
from clipserve.errors import MediaTooLargeError

_FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


def _is_form(scope: Scope) -> bool:
    for name, value in scope.get("headers") or []:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() in _FORM_TYPES
    return False


class MultipartRoute(APIRoute):
    """Matches only form bodies (``multipart/form-data``, or urlencoded fields without files);
    other bodies fall through to the next route on the same path."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] == "http" and not _is_form(scope):
            return Match.NONE, {}
        return super().matches(scope)


def multipart_body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """``openapi_extra`` that adds a multipart body to a JSON route's documentation."""
    return {
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {"type": "object", "properties": properties, "required": required}
                }
            }
        }
    }


FILE_FIELD = {"type": "string", "format": "binary"}
FILES_FIELD = {"type": "array", "items": {"type": "string", "format": "binary"}}
TEXT_FIELD = {"type": "string"}
TEXTS_FIELD = {"type": "array", "items": {"type": "string"}}


async def read_upload(upload: UploadFile, media: MediaSettings, where: str) -> bytes:
    """The bytes of one uploaded image, refusing oversized ones before reading them whole."""
    limit = media.max_image_bytes
    if upload.size is not None and upload.size > limit:
        raise MediaTooLargeError(
            f"{where}: the upload is {upload.size} bytes; the limit is {limit}",
            detail={"max_image_bytes": limit},
        )
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise MediaTooLargeError(
            f"{where}: the upload is larger than the {limit}-byte limit",
            detail={"max_image_bytes": limit},
        )
    return data  # an empty file fails as that input's "the data is empty" (alone, per item)


async def read_uploads(uploads: list[UploadFile], media: MediaSettings) -> list[bytes]:
    return [await read_upload(u, media, f"files[{i}]") for i, u in enumerate(uploads)]
