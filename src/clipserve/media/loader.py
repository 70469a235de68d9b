"""One entry point that turns any :data:`ImageInput` into a clean RGB image, off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self, TypeVar, TypeVarTuple

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

_T = TypeVar("_T")
_Ts = TypeVarTuple("_Ts")


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """A decoded RGB image and where its time went.

    ``num_bytes`` is the size of the encoded image (0 for PIL inputs). ``fetch_seconds`` covers the
    download, the file read or the data URI's base64 decoding (0 for bytes and PIL inputs);
    ``decode_seconds`` the image decode (for PIL inputs: the checks and RGB conversion).
    """

    image: Image.Image
    source: SourceKind
    num_bytes: int
    fetch_seconds: float
    decode_seconds: float


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

    async def load(self, value: ImageInput) -> LoadedImage:
        """Fetch or read, then decode ``value``; bad input raises a ``MediaError`` subclass."""
        kind = classify(value)
        settings = self._settings
        started = time.perf_counter()
        if isinstance(value, Image.Image):
            image = await self._run(prepare_image, value, settings)
            return LoadedImage(image, kind, 0, 0.0, time.perf_counter() - started)
        if not isinstance(value, str):
            data = bytes(value)
        elif kind is SourceKind.URL:
            data = await self._fetcher.fetch(value.strip())
        elif kind is SourceKind.DATA_URI:
            _, data = await self._run(_parse_data_uri, value, settings.max_image_bytes)
        else:
            data = await self._run(read_local_image, value, settings)
        fetched = time.perf_counter()
        image = await self._run(decode_image, data, settings)
        return LoadedImage(
            image=image,
            source=kind,
            num_bytes=len(data),
            fetch_seconds=fetched - started if kind is not SourceKind.BYTES else 0.0,
            decode_seconds=time.perf_counter() - fetched,
        )

    async def _run(self, func: Callable[[*_Ts], _T], *args: *_Ts) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, func, *args)


def _parse_data_uri(uri: str, max_bytes: int) -> tuple[str, bytes]:
    return parse_data_uri(uri, max_bytes=max_bytes)
