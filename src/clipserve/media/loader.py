"""One entry point that turns any :data:`ImageInput` into a clean RGB image, off the event loop.

Only a URL's download is asynchronous I/O. Everything after it (a data URI's base64 decoding or a
file read, the image decode, and the caller's ``transform``, such as a model's preprocessing) is
one job on the executor, so an image costs one thread hand-off and its decoded pixels live only
inside that job. The job decodes only once the loader's :class:`~clipserve.media.budget.PixelBudget`
(``max_decoded_pixels``) and the request's window (``max_request_decoded_pixels``) have room for
the size its header declares.

:meth:`ImageLoader.read` gives an input's encoded bytes and their sha256 without decoding them
(a content-addressed cache looks them up first); :meth:`ImageLoader.load` then decodes those bytes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import os
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, overload

from PIL import Image

from clipserve.config import MediaSettings
from clipserve.media.budget import PixelBudget, PixelWindow, Reservation
from clipserve.media.decode import draft_jpeg, finish_image, open_image, prepare_image
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
class EncodedImage:
    """An image input's encoded bytes, not decoded yet: a URL's body, a data URI's payload, a
    file's contents or the bytes given; ``sha256`` is their hex digest."""

    data: bytes
    source: SourceKind
    sha256: str
    read_seconds: float


INLINE_DIGEST_BYTES = 64 * 1024
"""Inputs up to this size are hashed on the event loop; larger ones on the executor."""


def _read_job(kind: SourceKind, value: str | bytes, settings: MediaSettings) -> tuple[bytes, str]:
    """The encoded bytes of a data URI, a file or bytes (a URL's body), and their sha256."""
    if isinstance(value, bytes):
        data = value
    elif kind is SourceKind.DATA_URI:
        _, data = parse_data_uri(value, max_bytes=settings.max_image_bytes)
    else:
        data = read_local_image(value, settings)
    return data, hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class _Decoded(Generic[T]):
    image: T
    num_bytes: int
    read_seconds: float
    decode_seconds: float


@dataclass(frozen=True, slots=True)
class _Heavy:
    """A job's answer for an image over ``heavy_image_pixels``: its bytes, to decode on the
    low-priority threads."""

    data: bytes
    read_seconds: float


def _decode_job(
    kind: SourceKind,
    value: ImageInput,
    settings: MediaSettings,
    transform: Callable[[Image.Image], Any] | None,
    reserve: Callable[[], AbstractContextManager[Reservation]],
    heavy_above: int | None,
    draft: int | None,
) -> _Decoded[Any] | _Heavy:
    """Read (a data URI, a file), decode and transform one image: the loader's one executor job.
    For a URL, ``value`` is the body already downloaded. The pixels are decoded only once the
    header has been read and its ``width * height`` taken from the reservation, and are freed
    before it ends (only ``transform``'s result, such as a tensor, outlives the job). With
    ``draft``, a JPEG is decoded at the smallest scale still ``draft`` pixels on both sides
    (:func:`~clipserve.media.decode.draft_jpeg`), and its size is counted after that. An encoded
    image over ``heavy_above`` pixels (as it will be decoded) is handed back undecoded
    (:class:`_Heavy`)."""
    started = time.perf_counter()
    read_seconds = 0.0
    with reserve() as reservation:
        if isinstance(value, Image.Image):
            num_bytes = 0
            reservation.take(value.width * value.height)
            image = prepare_image(value, settings)
            result = image if transform is None else transform(image)
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
            with open_image(data, settings) as header:
                if draft is not None:
                    draft_jpeg(header, draft)
                pixels = header.width * header.height
                if heavy_above is not None and pixels > heavy_above:
                    return _Heavy(data, read_seconds)
                reservation.take(pixels)
                # Transformed before the file closes, so the decoded image need not be copied.
                image = finish_image(header, detach=transform is None)
                del data  # the encoded bytes are not needed past the decode
                result = image if transform is None else transform(image)
        del image
    return _Decoded(result, num_bytes, read_seconds, time.perf_counter() - started - read_seconds)


HEAVY_NICENESS = 19
"""The nice value of the threads that decode images over ``heavy_image_pixels``."""


def _background_priority() -> None:
    """Thread initializer: this thread takes only the CPU that others leave (on Linux a thread's
    nice value and scheduling policy are its own). ``SCHED_IDLE`` where the platform has it: a
    waking normal thread then preempts it at once, where a nice-19 thread keeps its slice
    (hostile_load, a stream of 36-Mpx batches beside small requests: good p99 120 -> 70 ms,
    good throughput 0.85 -> 0.90 of baseline). The nice value is raised too, for platforms without
    ``SCHED_IDLE`` and for tools that show only niceness."""
    thread = threading.get_native_id()
    # Either may be missing on this platform or not allowed: what is left applies.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(
            os.PRIO_PROCESS, thread, max(HEAVY_NICENESS, os.getpriority(os.PRIO_PROCESS, thread))
        )
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))


class ImageLoader:
    """Loads image inputs of every kind. Owns (and closes) the executor and fetcher it creates,
    and its own low-priority threads for images over ``heavy_image_pixels``: a batch of huge
    images then slows the requests for small ones (and the model's forward passes) little."""

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
        self.pixels = PixelBudget(settings.max_decoded_pixels)
        """Decoded pixels held at once by every job of this loader."""
        self._heavy = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.heavy_decode_workers or max(1, (os.cpu_count() or 2) // 2),
            thread_name_prefix="clipserve-decode-heavy",
            initializer=_background_priority,
        )

    def window(self) -> PixelWindow:
        """A new request window's share of the pixel budget (``max_request_decoded_pixels``)."""
        return PixelWindow(self._settings.max_request_decoded_pixels)

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
        self._heavy.shutdown(wait=False, cancel_futures=True)

    async def read(self, value: str | bytes) -> EncodedImage:
        """The encoded bytes of ``value`` (a URL downloaded, a data URI's base64 decoded, a file
        read under the media root), undecoded, with their sha256; bad input raises a
        ``MediaError`` subclass. :meth:`load` decodes what this returns."""
        kind = classify(value)
        started = time.perf_counter()
        if kind is SourceKind.URL and isinstance(value, str):
            value = await self._fetcher.fetch(value.strip())
        elif isinstance(value, bytearray | memoryview):
            value = bytes(value)
        if isinstance(value, bytes) and len(value) <= INLINE_DIGEST_BYTES:
            data, digest = _read_job(kind, value, self._settings)
        else:
            loop = asyncio.get_running_loop()
            data, digest = await loop.run_in_executor(
                self._executor, _read_job, kind, value, self._settings
            )
        return EncodedImage(data, kind, digest, time.perf_counter() - started)

    @overload
    async def load(
        self,
        value: ImageInput | EncodedImage,
        *,
        window: PixelWindow | None = None,
        timeout: float | None = None,
        draft: int | None = None,
    ) -> LoadedImage[Image.Image]: ...
    @overload
    async def load(
        self,
        value: ImageInput | EncodedImage,
        transform: Callable[[Image.Image], T],
        *,
        window: PixelWindow | None = None,
        timeout: float | None = None,
        draft: int | None = None,
    ) -> LoadedImage[T]: ...

    async def load(
        self,
        value: ImageInput | EncodedImage,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        window: PixelWindow | None = None,
        timeout: float | None = None,
        draft: int | None = None,
    ) -> LoadedImage[Any]:
        """Fetch or read, decode and (optionally) ``transform`` ``value``; bad input raises a
        ``MediaError`` subclass (``transform``'s own errors propagate).

        The decode holds its pixels of the loader's budget and of ``window`` (a request's share,
        from :meth:`window`), waiting up to ``timeout`` seconds for room. ``draft``: decode JPEGs
        at the smallest DCT scale still at least ``draft`` pixels on both sides (a model's input
        size: its ``preprocess: fast``). An :class:`EncodedImage` (from :meth:`read`) is decoded
        as its bytes, reported with its own source and read time."""
        until = None if timeout is None else time.monotonic() + timeout
        started = time.perf_counter()
        fetch_seconds = 0.0
        if isinstance(value, EncodedImage):
            source, kind = value.source, SourceKind.BYTES
            fetch_seconds, value = value.read_seconds, value.data
        else:
            kind = source = classify(value)
        if kind is SourceKind.URL and isinstance(value, str):
            value = await self._fetcher.fetch(value.strip())
            fetch_seconds = time.perf_counter() - started
        loop = asyncio.get_running_loop()
        reserve = partial(self.pixels.reserve, window, until=until)
        settings = self._settings
        decoded = await loop.run_in_executor(
            self._executor,
            _decode_job,
            kind,
            value,
            settings,
            transform,
            reserve,
            settings.heavy_image_pixels,
            draft,
        )
        if isinstance(decoded, _Heavy):
            read_seconds = decoded.read_seconds
            decoded = await loop.run_in_executor(
                self._heavy,
                _decode_job,
                kind,
                decoded.data,
                settings,
                transform,
                reserve,
                None,
                draft,
            )
            assert isinstance(decoded, _Decoded)
            decoded = dataclasses.replace(decoded, read_seconds=read_seconds)
        return LoadedImage(
            image=decoded.image,
            source=source,
            num_bytes=decoded.num_bytes,
            fetch_seconds=fetch_seconds + decoded.read_seconds,
            decode_seconds=decoded.decode_seconds,
        )
