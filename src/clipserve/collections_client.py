"""``clipserve search``: a collection searched in this process (its data directory) or through a
running service (``--service-url``), with the same answer."""

from __future__ import annotations

import asyncio
import base64
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.errors import ClipServeError, InvalidInputError, quote


class RemoteSearchError(ClipServeError):
    """The service answered the search with an error."""


def _is_reference(image: str) -> bool:
    return image.startswith(("http://", "https://", "data:"))


def _read(image: str) -> bytes:
    """A query image named on the command line is this user's file: read here (the service, or
    the media root, need not see it)."""
    path = Path(image)
    if not path.is_file():
        raise InvalidInputError(f"no such image file: {quote(image, 200)}")
    return path.read_bytes()


def _as_uri(image: str) -> str:
    if _is_reference(image):
        return image
    mime = mimetypes.guess_type(image)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(_read(image)).decode()}"


def search_remote(
    service_url: str,
    collection: str,
    query: Mapping[str, Any],
    *,
    api_key: str | None = None,
    timeout_s: float = 60.0,
) -> list[dict[str, Any]]:
    body = dict(query)
    if body.get("image") is not None:
        body["image"] = _as_uri(body["image"])
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{service_url.rstrip('/')}/v1/collections/{collection}/search"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise RemoteSearchError(f"cannot reach {service_url}: {exc}") from exc
    if response.status_code != 200:
        try:
            message = response.json().get("error", response.text)
        except ValueError:
            message = response.text
        raise RemoteSearchError(f"{response.status_code}: {quote(str(message), 300)}")
    hits: list[dict[str, Any]] = response.json()["results"]
    return hits


def search_local(
    settings: Settings, collection: str, query: Mapping[str, Any]
) -> list[dict[str, Any]]:
    query = dict(query)
    image = query.get("image")
    if isinstance(image, str) and not _is_reference(image):
        query["image"] = _read(image)

    async def run() -> list[dict[str, Any]]:
        async with Engine(settings) as engine:
            result = await engine.collections.search(collection, **query)
        return [{"id": h.id, "score": h.score, "metadata": dict(h.metadata)} for h in result.hits]

    return asyncio.run(run())
