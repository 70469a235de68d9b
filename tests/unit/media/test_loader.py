"""ImageLoader: every input kind, timings, executor use and ownership."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import io
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from clipserve.config import MediaSettings
from clipserve.errors import (
    InvalidImageError,
    MediaAccessDeniedError,
    MediaTooLargeError,
    UnsupportedMediaTypeError,
)
from clipserve.media import ImageLoader, LoadedImage, SourceKind, UrlFetcher, decode_image
from clipserve.media.loader import HEAVY_NICENESS, INLINE_DIGEST_BYTES


class RecordingExecutor(concurrent.futures.ThreadPoolExecutor):
    """Records the function of every job and the thread it ran on."""

    def __init__(self) -> None:
        super().__init__(max_workers=2, thread_name_prefix="test-decode")
        self.jobs: list[str] = []
        self.threads: set[str] = set()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        self.jobs.append(fn.__name__)

        def run() -> Any:
            self.threads.add(threading.current_thread().name)
            return fn(*args, **kwargs)

        return super().submit(run)


async def resolve_public(host: str, port: int) -> list[str]:
    return ["93.184.215.14"]


@pytest.fixture
def jpeg(photo_bytes: Callable[..., bytes]) -> bytes:
    return photo_bytes("astronaut")


@pytest.fixture
async def fetcher(jpeg: bytes) -> AsyncIterator[UrlFetcher]:
    async def serve(request: httpx.Request) -> httpx.Response:
        # A stream, as a server sends it (`content=` would be read, and consumed, up front).
        return httpx.Response(
            200, headers={"content-type": "image/jpeg"}, stream=httpx.ByteStream(jpeg)
        )

    fetcher = UrlFetcher(
        MediaSettings(), transport=httpx.MockTransport(serve), resolver=resolve_public
    )
    yield fetcher
    await fetcher.aclose()


@pytest.fixture
async def executor() -> AsyncIterator[RecordingExecutor]:
    executor = RecordingExecutor()
    yield executor
    executor.shutdown(wait=True)


@pytest.fixture
async def loader(
    tmp_path: Path, fetcher: UrlFetcher, executor: RecordingExecutor
) -> AsyncIterator[ImageLoader]:
    loader = ImageLoader(MediaSettings(media_root=tmp_path), executor=executor, fetcher=fetcher)
    yield loader
    await loader.aclose()


def assert_loaded_512(loaded: LoadedImage, source: SourceKind, num_bytes: int) -> None:
    assert loaded.source is source
    assert (loaded.image.mode, loaded.image.size) == ("RGB", (512, 512))
    assert loaded.num_bytes == num_bytes
    assert loaded.fetch_seconds >= 0.0
    assert loaded.decode_seconds > 0.0


async def test_url(loader: ImageLoader, executor: RecordingExecutor, jpeg: bytes) -> None:
    loaded = await loader.load(" https://img.example/astronaut.jpg ")
    assert_loaded_512(loaded, SourceKind.URL, len(jpeg))
    assert loaded.fetch_seconds > 0.0
    assert executor.jobs == ["_decode_job"]  # everything after the download: one job


async def test_data_uri(loader: ImageLoader, executor: RecordingExecutor, jpeg: bytes) -> None:
    loaded = await loader.load("data:image/jpeg;base64," + base64.b64encode(jpeg).decode())
    assert_loaded_512(loaded, SourceKind.DATA_URI, len(jpeg))
    assert executor.jobs == ["_decode_job"]  # base64 is decoded off-loop too, in the same job


async def test_path(
    loader: ImageLoader, executor: RecordingExecutor, jpeg: bytes, tmp_path: Path
) -> None:
    (tmp_path / "astronaut.jpg").write_bytes(jpeg)
    assert_loaded_512(await loader.load("astronaut.jpg"), SourceKind.PATH, len(jpeg))
    assert_loaded_512(
        await loader.load(str(tmp_path / "astronaut.jpg")), SourceKind.PATH, len(jpeg)
    )
    assert executor.jobs == ["_decode_job"] * 2


async def test_bytes(loader: ImageLoader, executor: RecordingExecutor, jpeg: bytes) -> None:
    loaded = await loader.load(jpeg)
    assert_loaded_512(loaded, SourceKind.BYTES, len(jpeg))
    assert loaded.fetch_seconds == 0.0
    assert executor.jobs == ["_decode_job"]
    assert executor.threads
    assert all(name.startswith("test-decode") for name in executor.threads)


async def test_pil(loader: ImageLoader, executor: RecordingExecutor) -> None:
    original = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    loaded = await loader.load(original)
    assert_loaded_512(loaded, SourceKind.PIL, 0)
    assert loaded.fetch_seconds == 0.0
    assert loaded.image.getpixel((0, 0)) == (255, 255, 255)
    assert original.mode == "RGBA"
    assert executor.jobs == ["_decode_job"]


async def test_read_gives_the_undecoded_bytes_and_their_sha256_of_every_kind(
    loader: ImageLoader, executor: RecordingExecutor, jpeg: bytes, tmp_path: Path
) -> None:
    (tmp_path / "astronaut.jpg").write_bytes(jpeg)
    digest = hashlib.sha256(jpeg).hexdigest()
    inputs = {
        SourceKind.URL: "https://img.example/astronaut.jpg",
        SourceKind.DATA_URI: "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(),
        SourceKind.PATH: "astronaut.jpg",
        SourceKind.BYTES: jpeg,
    }
    for kind, value in inputs.items():
        encoded = await loader.read(value)
        assert (encoded.source, encoded.data, encoded.sha256) == (kind, jpeg, digest)
    assert len(jpeg) <= INLINE_DIGEST_BYTES  # a small body, small bytes: hashed in place
    assert executor.jobs == ["_read_job"] * 2  # base64 and files: decoded, read off the loop
    big = jpeg + bytes(INLINE_DIGEST_BYTES)
    assert (await loader.read(big)).sha256 == hashlib.sha256(big).hexdigest()
    assert executor.jobs == ["_read_job"] * 3  # large ones are hashed off the loop too


async def test_load_decodes_what_read_gave_under_its_source(
    loader: ImageLoader, executor: RecordingExecutor
) -> None:
    encoded = await loader.read("https://img.example/astronaut.jpg")
    loaded = await loader.load(encoded)
    assert_loaded_512(loaded, SourceKind.URL, len(encoded.data))
    assert loaded.fetch_seconds == encoded.read_seconds > 0.0
    assert executor.jobs == ["_decode_job"]  # the body was hashed in place (small)


async def test_read_refuses_what_load_refuses(loader: ImageLoader) -> None:
    with pytest.raises(UnsupportedMediaTypeError):
        await loader.read("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(MediaAccessDeniedError):
        await loader.read("../outside.jpg")


async def test_same_pixels_whatever_the_source(
    loader: ImageLoader, jpeg: bytes, tmp_path: Path
) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg)
    expected = decode_image(jpeg, MediaSettings()).tobytes()
    inputs: list[str | bytes] = [
        jpeg,
        "a.jpg",
        "https://img.example/a.jpg",
        "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(),
    ]
    for value in inputs:
        assert (await loader.load(value)).image.tobytes() == expected


async def test_a_transform_runs_in_the_same_job_as_the_decode(
    loader: ImageLoader, executor: RecordingExecutor, jpeg: bytes
) -> None:
    threads: list[str] = []

    def thumbnail(image: Image.Image) -> tuple[int, int]:
        threads.append(threading.current_thread().name)
        return image.resize((8, 8)).size

    data_uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    loaded = await loader.load(data_uri, thumbnail)
    assert loaded.image == (8, 8)
    assert loaded.num_bytes == len(jpeg)
    assert executor.jobs == ["_decode_job"]  # parse + decode + transform: one hand-off
    assert threads
    assert threads[0].startswith("test-decode")


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ("ftp://img.example/a.png", UnsupportedMediaTypeError, "unsupported image URL scheme"),
        ("data:text/plain;base64,aGk=", UnsupportedMediaTypeError, "data URI media type"),
        ("../outside.png", MediaAccessDeniedError, "image path is outside the media root"),
        (b"not an image", InvalidImageError, "image could not be decoded: "),
        (b"", InvalidImageError, "image could not be decoded: the data is empty"),
    ],
)
async def test_errors_propagate(
    loader: ImageLoader, value: str | bytes, error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as caught:
        await loader.load(value)
    assert str(caught.value).startswith(message)


async def test_limits_apply_to_every_kind(jpeg: bytes, tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg)
    settings = MediaSettings(media_root=tmp_path, max_image_bytes=1000)
    async with ImageLoader(settings) as loader:
        for value in (jpeg, "a.jpg", "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()):
            with pytest.raises(MediaTooLargeError):
                await loader.load(value)
    async with ImageLoader(MediaSettings(max_image_pixels=1000)) as loader:
        with pytest.raises(MediaTooLargeError, match=r"262144 pixels exceeds the limit"):
            await loader.load(Image.new("RGB", (512, 512)))


async def test_paths_are_disabled_by_default(jpeg: bytes, tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(jpeg)
    async with ImageLoader(MediaSettings()) as loader:
        with pytest.raises(MediaAccessDeniedError, match=r"^local image paths are disabled"):
            await loader.load(str(tmp_path / "a.jpg"))


async def test_aclose_leaves_borrowed_resources_open(
    fetcher: UrlFetcher, executor: RecordingExecutor
) -> None:
    loader = ImageLoader(MediaSettings(), executor=executor, fetcher=fetcher)
    await loader.aclose()
    assert executor.submit(lambda: 42).result(timeout=5) == 42
    assert len(await fetcher.fetch("http://img.example/a.jpg")) > 0


async def test_owned_executor_is_sized_from_settings(jpeg: bytes) -> None:
    loader = ImageLoader(MediaSettings(decode_workers=3))
    try:
        owned = loader._executor
        assert isinstance(owned, concurrent.futures.ThreadPoolExecutor)
        assert owned._max_workers == 3
        assert (await loader.load(jpeg)).image.size == (512, 512)
    finally:
        await loader.aclose()
    with pytest.raises(RuntimeError):
        owned.submit(lambda: None)


async def test_decoded_pixels_held_at_once_stay_within_the_process_and_request_budgets() -> None:
    """Forty small files that each decode to 4 Mpx: never more than the budgets decoded at once
    (the transform runs while the pixels are held, and sees the counts)."""
    side = 2000
    files = []
    for i in range(40):
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (i, 2 * i, 3 * i)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    assert max(len(f) for f in files) < 100_000  # small files, big images
    settings = MediaSettings(
        max_decoded_pixels=3 * side * side, max_request_decoded_pixels=2 * side * side
    )
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    held: list[tuple[int, int]] = []
    async with ImageLoader(settings, executor=executor) as loader:
        windows = [loader.window(), loader.window()]

        def transform(image: Image.Image) -> tuple[int, int]:
            held.append((loader.pixels.used, max(w.used for w in windows)))
            return image.size

        loaded = await asyncio.gather(
            *(
                loader.load(data, transform, window=windows[i % 2], timeout=30.0)
                for i, data in enumerate(files)
            )
        )
    executor.shutdown()
    assert [item.image for item in loaded] == [(side, side)] * 40
    assert max(process for process, _ in held) <= 3 * side * side
    assert max(request for _, request in held) <= 2 * side * side
    assert loader.pixels.peak <= 3 * side * side
    assert loader.pixels.used == 0


async def test_huge_images_decode_on_low_priority_threads_and_small_ones_do_not() -> None:
    settings = MediaSettings(heavy_image_pixels=1_000_000)
    seen: dict[tuple[int, int], tuple[str, int, int | None]] = {}

    def transform(image: Image.Image) -> tuple[int, int]:
        thread, native = threading.current_thread(), threading.get_native_id()
        policy = os.sched_getscheduler(native) if hasattr(os, "sched_getscheduler") else None
        seen[image.size] = (thread.name, os.getpriority(os.PRIO_PROCESS, native), policy)
        return image.size

    big, small = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (1500, 1000), "navy").save(big, format="PNG")
    Image.new("RGB", (64, 64), "red").save(small, format="PNG")
    async with ImageLoader(settings) as loader:
        loaded = await loader.load(big.getvalue(), transform)
        await loader.load(
            "data:image/png;base64," + base64.b64encode(small.getvalue()).decode(), transform
        )
    assert loaded.image == (1500, 1000)
    assert loaded.num_bytes == len(big.getvalue())
    big_thread, big_nice, big_policy = seen[(1500, 1000)]
    small_thread, small_nice, small_policy = seen[(64, 64)]
    assert big_thread.startswith("clipserve-decode-heavy")
    assert not small_thread.startswith("clipserve-decode-heavy")
    assert big_nice >= max(small_nice, HEAVY_NICENESS) > small_nice or small_nice >= HEAVY_NICENESS
    if hasattr(os, "SCHED_IDLE"):  # Linux: only the heavy threads run at idle priority
        assert big_policy == os.SCHED_IDLE
        assert small_policy != os.SCHED_IDLE


async def test_draft_decodes_a_large_jpeg_at_the_smallest_scale_still_covering_the_size(
    photos: dict[str, Any],
) -> None:
    big = photos["astronaut"].resize((2048, 1536))  # 3.1 Mpx
    jpeg, png, small = io.BytesIO(), io.BytesIO(), io.BytesIO()
    big.save(jpeg, format="JPEG", quality=90)
    big.save(png, format="PNG")
    photos["astronaut"].resize((400, 300)).save(small, format="JPEG")
    async with ImageLoader(MediaSettings()) as loader:
        fast = await loader.load(jpeg.getvalue(), draft=224)
        assert fast.image.size == (512, 384)  # 1/4: 1/8 would give 256 x 192, under 224
        assert loader.pixels.peak == 512 * 384  # the budget counts what is really decoded
        exact = await loader.load(jpeg.getvalue())
        assert exact.image.size == (2048, 1536)
        assert (await loader.load(png.getvalue(), draft=224)).image.size == (2048, 1536)
        assert (await loader.load(small.getvalue(), draft=224)).image.size == (400, 300)
        # Both sides stay >= the size, so a shortest-side resize to it only shrinks.
        assert min((await loader.load(jpeg.getvalue(), draft=200)).image.size) >= 200
    # The drafted image is the same picture: its downscale matches the exact one's closely.
    a = np.asarray(exact.image.resize((224, 168), Image.Resampling.BICUBIC), dtype=np.float32)
    b = np.asarray(fast.image.resize((224, 168), Image.Resampling.BICUBIC), dtype=np.float32)
    assert float(np.abs(a - b).mean()) < 3.0  # of 255
