"""Media fetching against a real HTTP server on 127.0.0.1 (retries, redirects, slow bodies)."""

from __future__ import annotations

import gzip
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler

import pytest

from clipserve.config import MediaSettings
from clipserve.errors import (
    MediaAccessDeniedError,
    MediaFetchError,
    MediaTooLargeError,
    MediaUpstreamError,
    UnsupportedMediaTypeError,
)
from clipserve.media import ImageLoader, SourceKind, UrlFetcher
from clipserve.testing import QuietHTTPServer


@dataclass
class Origin:
    """What the test server serves, and what it saw."""

    jpeg: bytes
    bomb: bytes = b""
    base_url: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    client_ports: set[int] = field(default_factory=set)
    host_headers: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def hit(self, path: str, client_port: int, host_header: str) -> int:
        with self.lock:
            self.client_ports.add(client_port)
            self.host_headers.append(host_header)
            self.hits[path] += 1
            return self.hits[path]


def make_handler(origin: Origin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean

        def send_body(self, status: int, body: bytes, content_type: str = "image/jpeg") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_encoded(self, body: bytes, encoding: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            count = origin.hit(self.path, self.client_address[1], self.headers.get("Host", ""))
            if self.path == "/photo.jpg":
                self.send_body(200, origin.jpeg)
            elif self.path == "/flaky.jpg":
                if count == 1:
                    self.send_body(503, b"busy", "text/plain")
                else:
                    self.send_body(200, origin.jpeg)
            elif self.path == "/down.jpg":
                self.send_body(503, b"down", "text/plain")
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/photo.jpg")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/page.html":
                self.send_body(200, b"<html>not an image</html>", "text/html; charset=utf-8")
            elif self.path == "/slow.jpg":
                self.trickle()
            elif self.path == "/gzip.jpg":
                self.send_encoded(gzip.compress(origin.jpeg), "gzip")
            elif self.path == "/nested-gzip.jpg":  # 64 MiB of zeros, gzip twice: a few KB
                self.send_encoded(gzip.compress(gzip.compress(bytes(64 * 2**20))), "gzip, gzip")
            elif self.path == "/gzip-bomb.jpg":  # 256 MiB of zeros in about 250 KB, one layer
                self.send_encoded(origin.bomb, "gzip")
            else:
                self.send_body(404, b"not found", "text/plain")

        def trickle(self) -> None:
            """Headers at once, then one byte every 50 ms: never idle, never done."""
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            try:
                for _ in range(400):  # bounded: 20 s at most even if nobody disconnects
                    self.wfile.write(b"\xff")
                    self.wfile.flush()
                    if origin.stop.wait(0.05):
                        return
            except OSError:
                return  # the client gave up, as it should

    return Handler


@pytest.fixture
def origin(photo_bytes: Callable[..., bytes]) -> Iterator[Origin]:
    origin = Origin(jpeg=photo_bytes("astronaut"))
    server = QuietHTTPServer(("127.0.0.1", 0), make_handler(origin))
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="test-origin", daemon=True
    )
    thread.start()
    origin.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield origin
    finally:
        origin.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


LOCAL = {"allow_private_urls": True, "retry_backoff_s": 0.01, "fetch_timeout_s": 5.0}


async def test_loads_a_real_jpeg(origin: Origin) -> None:
    async with ImageLoader(MediaSettings(**LOCAL)) as loader:
        loaded = await loader.load(f"{origin.base_url}/photo.jpg")
    assert loaded.source is SourceKind.URL
    assert (loaded.image.mode, loaded.image.size) == ("RGB", (512, 512))
    assert loaded.num_bytes == len(origin.jpeg)
    assert origin.hits["/photo.jpg"] == 1


async def test_connections_are_reused(origin: Origin) -> None:
    async with UrlFetcher(MediaSettings(**LOCAL)) as fetcher:
        for _ in range(3):
            assert await fetcher.fetch(f"{origin.base_url}/photo.jpg") == origin.jpeg
    assert origin.hits["/photo.jpg"] == 3
    assert len(origin.client_ports) == 1  # one pooled keep-alive connection


async def test_503_then_200_is_retried(origin: Origin) -> None:
    async with UrlFetcher(MediaSettings(**LOCAL)) as fetcher:
        assert await fetcher.fetch(f"{origin.base_url}/flaky.jpg") == origin.jpeg
    assert origin.hits["/flaky.jpg"] == 2


async def test_persistent_503_gives_up(origin: Origin) -> None:
    url = f"{origin.base_url}/down.jpg"
    async with UrlFetcher(MediaSettings(**LOCAL, fetch_retries=2)) as fetcher:
        with pytest.raises(MediaUpstreamError) as caught:
            await fetcher.fetch(url)
    assert str(caught.value) == (
        f"image could not be fetched: HTTP 503 from {url} (gave up after 3 attempts)"
    )
    assert origin.hits["/down.jpg"] == 3


async def test_404_is_tried_exactly_once(origin: Origin) -> None:
    url = f"{origin.base_url}/missing.jpg"
    async with UrlFetcher(MediaSettings(**LOCAL)) as fetcher:
        with pytest.raises(MediaFetchError) as caught:
            await fetcher.fetch(url)
    assert str(caught.value) == f"image could not be fetched: HTTP 404 from {url}"
    assert caught.value.upstream_status == 404
    assert origin.hits["/missing.jpg"] == 1


async def test_redirect_is_followed(origin: Origin) -> None:
    async with UrlFetcher(MediaSettings(**LOCAL)) as fetcher:
        assert await fetcher.fetch(f"{origin.base_url}/redirect") == origin.jpeg
    assert origin.hits == Counter({"/redirect": 1, "/photo.jpg": 1})


async def test_html_is_refused(origin: Origin) -> None:
    async with ImageLoader(MediaSettings(**LOCAL)) as loader:
        with pytest.raises(UnsupportedMediaTypeError, match=r"content type 'text/html', not an"):
            await loader.load(f"{origin.base_url}/page.html")


async def test_slow_trickle_hits_the_download_deadline(origin: Origin) -> None:
    url = f"{origin.base_url}/slow.jpg"
    settings = MediaSettings(**{**LOCAL, "fetch_timeout_s": 0.5}, fetch_retries=1)
    started = time.perf_counter()
    async with UrlFetcher(settings) as fetcher:
        with pytest.raises(MediaUpstreamError) as caught:
            await fetcher.fetch(url)
    elapsed = time.perf_counter() - started
    assert str(caught.value).endswith(
        f"(deadline, limit 0.5 s) fetching {url} (gave up after 2 attempts)"
    )
    assert origin.hits["/slow.jpg"] == 2
    assert elapsed < 3.0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_default_settings_refuse_the_loopback_server(origin: Origin, host: str) -> None:
    url = f"{origin.base_url}/photo.jpg".replace("127.0.0.1", host)
    async with ImageLoader(MediaSettings()) as loader:
        with pytest.raises(MediaAccessDeniedError) as caught:
            await loader.load(url)
    assert str(caught.value).startswith(f"image URL refused: host '{host}' ")
    assert "a loopback address; set media.allow_private_urls to allow it" in str(caught.value)
    assert origin.hits == Counter()


async def test_allowed_network_is_fetched_at_the_checked_address(origin: Origin) -> None:
    lookups: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.1"]  # `images.test` exists nowhere else

    port = origin.base_url.rsplit(":", 1)[1]
    url = f"http://images.test:{port}/redirect"
    settings = MediaSettings(allowed_networks=("127.0.0.0/8",), retry_backoff_s=0.01)
    async with UrlFetcher(settings, resolver=resolver) as fetcher:
        assert await fetcher.fetch(url) == origin.jpeg
    assert lookups == ["images.test", "images.test"]  # each hop, resolved by us only
    assert origin.host_headers == [f"images.test:{port}"] * 2
    assert origin.hits == Counter({"/redirect": 1, "/photo.jpg": 1})


async def test_a_gzip_body_is_inflated(origin: Origin) -> None:
    async with ImageLoader(MediaSettings(**LOCAL)) as loader:
        loaded = await loader.load(f"{origin.base_url}/gzip.jpg")
    assert loaded.image.size == (512, 512)
    assert loaded.num_bytes == len(origin.jpeg)


async def test_compression_bombs_cost_neither_memory_nor_time(origin: Origin) -> None:
    """Nested gzip is refused before anything is inflated; one layer is inflated only up to the
    byte cap. The process's peak memory hardly moves (ru_maxrss: KiB on Linux)."""
    origin.bomb = gzip.compress(bytes(256 * 2**20), compresslevel=9)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    settings = MediaSettings(**LOCAL, max_image_bytes=20 * 2**20)
    async with ImageLoader(settings) as loader:
        started = time.monotonic()
        with pytest.raises(UnsupportedMediaTypeError, match="Content-Encoding 'gzip, gzip'"):
            await loader.load(f"{origin.base_url}/nested-gzip.jpg")
        with pytest.raises(MediaTooLargeError, match="sent more than 20971520 bytes"):
            await loader.load(f"{origin.base_url}/gzip-bomb.jpg")
        assert time.monotonic() - started < 5
        assert (await loader.load(f"{origin.base_url}/photo.jpg")).image.size == (512, 512)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 100, f"peak memory grew by {grown_mib:.0f} MiB"
