"""A bulk job's rows (:class:`Record`) and the :class:`Source` protocol every reader implements.

A source yields its rows in one deterministic order, numbered from 0, so the same source always
maps the same rows to the same output shard, and a resumed run can skip finished shards without
reading their images: :meth:`Source.records` is told which rows to skip and never reads their
payloads.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from clipserve.errors import InvalidInputError
from clipserve.media import ImageInput

IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SIDECAR_MAX_BYTES: Final = 1 << 20
"""Captions and JSON metadata larger than this are not read."""

SourceFormat = Literal["folder", "table", "webdataset"]
Skip = Callable[[int], bool]
"""``skip(index)``: True for rows that need no embedding (their shard is finished)."""


class BulkInputError(InvalidInputError):
    """The source, the output folder or the flags cannot be used."""


@dataclass(frozen=True, slots=True)
class Record:
    """One row of the source: what to embed and what to write next to its embedding."""

    index: int
    """0-based position in the source; row ``index`` goes to shard ``index // shard_size``."""
    key: str
    image: ImageInput | None = None
    """The image to embed: a file path, a URL, a data URI or the bytes of a tar member."""
    image_path: str | None = None
    url: str | None = None
    caption: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None
    """Why this row cannot be embedded (invalid JSON, missing image...); None when it can."""

    @property
    def where(self) -> str | None:
        """The row's image as a person would look for it (path or URL)."""
        return self.image_path or self.url


class Source(Protocol):
    format: SourceFormat
    description: str
    has_images: bool
    has_captions: bool

    def count(self) -> int | None:
        """How many rows there are (a cheap pass), or None when that would cost a full read."""

    def records(self, skip: Skip | None = None) -> Iterator[Record]:
        """The rows in order, leaving out those ``skip`` names (without reading their data)."""

    def close(self) -> None: ...


def flatten(value: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested objects as dotted columns (``{"a": {"b": 1}}`` → ``{"a.b": 1}``), as pandas'
    ``json_normalize`` does for clip-retrieval's metadata."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f"{prefix}{key}"
        if isinstance(item, Mapping) and item:
            out.update(flatten(item, f"{name}."))
        else:
            out[name] = item
    return out


def read_sidecar(path: Path) -> bytes | None:
    try:
        if path.stat().st_size > SIDECAR_MAX_BYTES:
            return None
        return path.read_bytes()
    except OSError:
        return None


def json_metadata(data: bytes | None) -> tuple[dict[str, Any], str | None]:
    """A sidecar's metadata (flattened), or a problem with it."""
    if data is None:
        return {}, None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return {}, f"invalid JSON metadata ({exc})"
    if not isinstance(value, dict):
        return {}, "the JSON metadata is not an object"
    return flatten(value), None


def decode_text(data: bytes | None) -> str | None:
    if data is None:
        return None
    return data.decode("utf-8", errors="replace").strip()
