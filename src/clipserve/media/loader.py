"""One entry point that turns any :data:`ImageInput` into a clean RGB image, off the event loop.

Only a URL's download is asynchronous I/O. Everything after it (a data URI's base64 decoding or a
file read, the image decode, and the caller's ``transform``, such as a model's preprocessing) is
one job on the executor, so an image costs one thread hand-off and its decoded pixels live only
inside that job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, overload

from PIL import Image

from clipserve.config import MediaSettings
from clipserve.media.decode import decode_image, prepare_image
from clipserve.media.fetch import UrlFetcher
from clipserve.media.source import (
    ImageInput,
    SourceKind,
    classify,
    parse_data_uri,
    read_local_image,
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LoadedImage(Generic[T]):
    """A decoded RGB image (or what the loader's ``transform`` made of it) and where its time went.

    ``num_bytes`` is the size of the encoded image (0 for PIL inputs). ``fetch_seconds`` covers the
    download, the file read or the data URI's base64 decoding (0 for bytes and PIL inputs);
    ``decode_seconds`` the image decode (for PIL inputs: the checks and RGB conversion) and the
    transform.
    """

    image: T
    source: SourceKind
    num_bytes: int
    fetch_seconds: float
    decode_seconds: float


@dataclass(frozen=True, slots=True)
class _Decoded(Generic[T]):
    image: T
    num_bytes: int
    read_seconds: float
    decode_seconds: float


def _decode_job(
    kind: SourceKind,
    value: ImageInput,
    settings: MediaSettings,
    transform: Callable[[Image.Image], Any] | None,
) -> _Decoded[Any]:
    """Read (a data URI, a file), decode and transform one image: the loader's one executor job.
    For a URL, ``value`` is the body already downloaded."""
    started = time.perf_counter()
    read_seconds = 0.0
    if isinstance(value, Image.Image):
        image, num_bytes = prepare_image(value, settings), 0
    else:
        if not isinstance(value, str):
            data = bytes(value)  # bytes given, or a URL's body
        elif kind is SourceKind.DATA_URI:
            _, data = parse_data_uri(value, max_bytes=settings.max_image_bytes)
        else:
            data = read_local_image(value, settings)
        if kind in (SourceKind.DATA_URI, SourceKind.PATH):
            read_seconds = time.perf_counter() - started
        num_bytes = len(data)
        image = decode_image(data, settings)
        del data  # the encoded bytes are not needed past the decode
    result = image if transform is None else transform(image)
    return _Decoded(result, num_bytes, read_seconds, time.perf_counter() - started - read_seconds)


class ImageLoader:
    """Loads image inputs of every kind. Owns (and closes) the executor and fetcher it creates."""

    def __init__(
        self,
        settings: MediaSettings,
        *,
        executor: concurrent.futures.Executor | None = None,
        fetcher: UrlFetcher | None = None,
    ) -> None:
        self._settings = settings
        self._owns_executor = executor is None
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.decode_workers or os.cpu_count() or 1,
            thread_name_prefix="clipserve-decode",
        )
        self._owns_fetcher = fetcher is None
        self._fetcher = fetcher or UrlFetcher(settings)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close what this loader created; executors and fetchers passed in are left open."""
        if self._owns_fetcher:
            await self._fetcher.aclose()
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @overload
    async def load(self, value: ImageInput) -> LoadedImage[Image.Image]: ...
    @overload
    async def load(
        self, value: ImageInput, transform: Callable[[Image.Image], T]
    ) -> LoadedImage[T]: ...

    async def load(
        self, value: ImageInput, transform: Callable[[Image.Image], Any] | None = None
    ) -> LoadedImage[Any]:
        """Fetch or read, decode and (optionally) ``transform`` ``value``; bad input raises a
        ``MediaError`` subclass (``transform``'s own errors propagate)."""
        kind = classify(value)
        started = time.perf_counter()
        fetch_seconds = 0.0
        if kind is SourceKind.URL and isinstance(value, str):
            value = await self._fetcher.fetch(value.strip())
            fetch_seconds = time.perf_counter() - started
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(
            self._executor, _decode_job, kind, value, self._settings, transform
        )
        return LoadedImage(
            image=decoded.image,
            source=kind,
            num_bytes=decoded.num_bytes,
            fetch_seconds=fetch_seconds + decoded.read_seconds,
            decode_seconds=decoded.decode_seconds,
        )
