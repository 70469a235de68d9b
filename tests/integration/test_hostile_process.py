"""Hostile input against a real `clipserve serve` process: status, error text, time, and the
process's memory (RSS from /proc, and its peak since the case started) before and after."""

from __future__ import annotations

import base64
import gzip
import http.server
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from clipserve.api.security import hash_key
from clipserve.bench import server
from clipserve.testing import QuietHTTPServer

KEY = "hostile-suite-key"
MB = 1024 * 1024


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _ico_embedding(png: bytes, claimed: int = 16) -> bytes:
    """An ICO whose directory claims a ``claimed``-pixel square and embeds ``png``."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def _gzip_bomb(size: int, layers: int = 1) -> bytes:
    data = b"\x00" * size
    for _ in range(layers):
        data = gzip.compress(data, compresslevel=9)
    return data


class _Upstream(http.server.BaseHTTPRequestHandler):
    """Serves ``/<name>`` from ``bodies``: (content-encoding, body)."""

    bodies: dict[str, tuple[str | None, bytes]] = {}

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        encoding, body = self.bodies.get(self.path.lstrip("/"), (None, b""))
        self.send_response(200 if body else 404)
        self.send_header("Content-Type", "image/png")
        if encoding:
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@dataclass
class Server:
    base: str
    pid: int
    upstream: str

    def rss_mb(self) -> float:
        return self._status("VmRSS")

    def peak_mb(self) -> float:
        return self._status("VmHWM")

    def reset_peak(self) -> None:
        # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def _status(self, field: str) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    _Upstream.bodies = {
        "bomb-gzip-gzip": ("gzip, gzip", _gzip_bomb(256 * MB, layers=2)),
        "bomb-gzip": ("gzip", _gzip_bomb(200 * MB)),
        "bomb-deflate": ("deflate", zlib.compress(b"\x00" * 200 * MB, 9)),
        "bomb-br": ("br", b"\x00" * 64),
    }
    httpd = QuietHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.fixture(scope="module")
def real_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_registry: dict[str, Any], upstream: str
) -> Iterator[Server]:
    config = tmp_path_factory.mktemp("hostile-process") / "models.json"
    config.write_text(json.dumps({"models": {"tiny": tiny_registry["tiny"]}}))
    env = {
        "CLIPSERVE_AUTH__API_KEYS": json.dumps([hash_key(KEY)]),
        "CLIPSERVE_MEDIA__ALLOWED_NETWORKS": '["127.0.0.0/8"]',
        # More decode threads (big images use the low-priority ones) than the budget lets work.
        "CLIPSERVE_MEDIA__DECODE_WORKERS": "8",
        "CLIPSERVE_MEDIA__HEAVY_DECODE_WORKERS": "8",
        "CLIPSERVE_MEDIA__MAX_DECODED_PIXELS": str(2 * 4000 * 4000),
        "CLIPSERVE_MEDIA__MAX_REQUEST_DECODED_PIXELS": str(2 * 4000 * 4000),
    }
    with server(config, "tiny", max_batch_size=32, device="cpu", env=env) as running:
        real = Server(running.url, running.pid, upstream)
        _good(real)  # the model loaded and warm: later growth is the case's, not start-up's
        yield real


def _good(server: Server) -> None:
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    response = httpx.post(
        f"{server.base}/evaluator/v1/evaluation/single",
        json={"image_input": _uri(_png(image)), "text_prompt": "a red square"},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert 0.0 <= response.json()["clip_score"] <= 100.0


@dataclass(frozen=True)
class MemoryCase:
    id: str
    send: Callable[[Server], httpx.Response]
    status: int
    message: str
    max_seconds: float = 5.0
    max_peak_growth_mb: float = 60.0
    max_body_bytes: int = 4096
    """Bound on the answer's size (errors never echo big input)."""


def _post(path: str, body: Any = None, *, key: bool = True, **kw: Any) -> Callable[..., Any]:
    def send(server: Server) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}"} if key else {}
        headers.update(kw.pop("headers", {}))
        if body is not None:
            kw["content"] = json.dumps(body).encode() if not isinstance(body, bytes) else body
            headers.setdefault("Content-Type", "application/json")
        return httpx.post(server.base + path, headers=headers, timeout=60, **kw)

    return send


def _fetch(name: str) -> Callable[[Server], httpx.Response]:
    def send(server: Server) -> httpx.Response:
        body = {"image_input": f"{server.upstream}/{name}", "text_prompt": "a bomb"}
        return _post("/evaluator/v1/evaluation/single", body)(server)

    return send


def _big_images(count: int, side: int) -> dict[str, Any]:
    """``count`` distinct images of ``side``² pixels, each a PNG of a few KB."""
    items = []
    for i in range(count):
        image = Image.new("RGB", (side, side), (i * 7 % 256, i * 13 % 256, i * 29 % 256))
        items.append({"image_input": _uri(_png(image)), "text_prompt": f"colour {i}"})
    return {"evaluations": items}


def _sixteen_bit(side: int) -> dict[str, Any]:
    gradient = Image.linear_gradient("L").resize((side, side)).convert("I")
    pixels = Image.eval(gradient, lambda v: v * 257).convert("I;16")
    return {"image_input": _uri(_png(pixels)), "text_prompt": "a 16-bit gradient"}


def _float_tiff(side: int) -> dict[str, Any]:
    """A 32-bit float TIFF (mode F) of values far outside [0, 255]: min-max stretched."""
    gradient = Image.linear_gradient("L").resize((side, side)).convert("F")
    buffer = io.BytesIO()
    Image.eval(gradient, lambda v: v * 1e6 - 3e7).save(
        buffer, format="TIFF", compression="tiff_deflate"
    )
    return {"image_input": _uri(buffer.getvalue(), "image/tiff"), "text_prompt": "a float image"}


def _big_uploads(count: int, side: int) -> dict[str, Any]:
    files = [
        ("files", (f"{i}.png", _png(Image.new("RGB", (side, side), (i, 90, 200 - i))), "image/png"))
        for i in range(count)
    ]
    return {"files": files}


SINGLE = "/evaluator/v1/evaluation/single"
MEMORY_CASES = [
    MemoryCase(
        "no-key-60mb-json",
        _post("/v1/embeddings", b'{"input": ["' + b"a" * (60 * MB) + b'"]}', key=False),
        401,
        "API key",
        max_peak_growth_mb=30,
    ),
    MemoryCase(
        "gzip-request-body-bomb",
        _post(SINGLE, _gzip_bomb(512 * MB), headers={"Content-Encoding": "gzip"}),
        415,
        "Content-Encoding",
        max_peak_growth_mb=30,
    ),
    MemoryCase(
        "oversized-body",
        _post(SINGLE, b'{"image_input": "' + b"A" * (40 * MB) + b'", "text_prompt": "x"}'),
        413,
        "max_body_bytes",
        max_peak_growth_mb=40,
    ),
    MemoryCase("upstream-gzip-gzip-256mib", _fetch("bomb-gzip-gzip"), 415, "Content-Encoding"),
    MemoryCase("upstream-br", _fetch("bomb-br"), 415, "Content-Encoding"),
    MemoryCase("upstream-gzip-200mb", _fetch("bomb-gzip"), 413, "image is too large"),
    MemoryCase("upstream-deflate-200mb", _fetch("bomb-deflate"), 413, "image is too large"),
    MemoryCase(
        "classify-2mb-label-x100-template",
        _post(
            "/v1/classify",
            {
                "input": _uri(_png(Image.new("RGB", (8, 8)))),
                "labels": ["x" * (2 * MB)],
                "template": "{}" * 100,
            },
        ),
        422,
        "its prompt would be",
    ),
    MemoryCase(
        "batch-5000-empty-items",
        _post(
            "/evaluator/v1/evaluation/batch",
            {"evaluations": [{"image_input": "", "text_prompt": ""}] * 5000},
        ),
        422,
        "the limit is 1000",
    ),
    MemoryCase(
        "png-header-100000x100000",
        _post(
            SINGLE, {"image_input": _uri(_png_header_only(100_000, 100_000)), "text_prompt": "x"}
        ),
        413,
        "image is too large",
    ),
    MemoryCase(
        "ico-embedding-a-20000x20000-png",
        _post(
            SINGLE,
            {
                "image_input": _uri(
                    _ico_embedding(_png_header_only(20_000, 20_000)), "image/x-icon"
                ),
                "text_prompt": "x",
            },
        ),
        413,
        "image is too large",
    ),
    MemoryCase(
        "20000-letter-word",
        _post("/v1/embeddings", {"model": "tiny", "input": "a" * 20_000}),
        422,
        "",
    ),
    MemoryCase(
        "20-distinct-16mpx-pngs-in-one-batch",
        _post("/evaluator/v1/evaluation/batch", _big_images(20, 4000)),
        200,
        "",
        max_seconds=60,
        # Two images decoded at once (48 MB each as RGB, plus conversions); 8 decode threads
        # without the pixel budget would hold eight.
        max_peak_growth_mb=450,
        max_body_bytes=64 * 1024,
    ),
    MemoryCase(
        "embeddings-of-12-distinct-16mpx-pngs",
        _post(
            "/v1/embeddings",
            {
                "model": "tiny",
                "modality": "image",
                "input": [e["image_input"] for e in _big_images(12, 4000)["evaluations"]],
            },
        ),
        200,
        "",
        max_seconds=60,
        max_peak_growth_mb=450,
        max_body_bytes=256 * 1024,
    ),
    MemoryCase(
        "multipart-upload-of-8-distinct-16mpx-pngs",
        _post("/v1/embeddings/images", **_big_uploads(8, 4000)),
        200,
        "",
        max_seconds=60,
        max_peak_growth_mb=450,
        max_body_bytes=256 * 1024,
    ),
    MemoryCase(
        "float32-tiff-3000x3000",
        _post(SINGLE, _float_tiff(3000)),
        200,
        "",
        max_seconds=20,
        max_peak_growth_mb=250,  # a float64 copy of the frame alone would be 72 MB, and temporaries
    ),
    MemoryCase(
        "16-bit-4000x4000-png",
        _post(SINGLE, _sixteen_bit(4000)),
        200,
        "",
        max_seconds=20,
        max_peak_growth_mb=250,  # an int64 copy of the frame alone would be 128 MB
    ),
]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=[c.id for c in MEMORY_CASES])
def test_hostile_input_costs_a_real_server_little(real_server: Server, case: MemoryCase) -> None:
    before = real_server.rss_mb()
    real_server.reset_peak()
    started = time.perf_counter()
    response = case.send(real_server)
    elapsed = time.perf_counter() - started
    peak, after = real_server.peak_mb(), real_server.rss_mb()
    assert response.status_code == case.status, response.text[:500]
    if case.status >= 400:
        body = response.json()
        error = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
        assert case.message in error + json.dumps(body.get("detail")), body
    else:
        body = response.json()
        results = body.get("results") or body.get("data") or [body]
        assert all(r.get("error") is None for r in results), str(body)[:500]
    assert elapsed < case.max_seconds, f"{case.id} took {elapsed:.1f} s"
    assert len(response.content) <= case.max_body_bytes, len(response.content)
    assert peak - before < case.max_peak_growth_mb, f"peak RSS {before:.0f} -> {peak:.0f} MB"
    assert after - before < min(case.max_peak_growth_mb, 100), f"RSS {before:.0f} -> {after:.0f} MB"
    _good(real_server)
