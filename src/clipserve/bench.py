"""`clipserve bench`: what the dynamic batcher buys, measured through a real server.

For each model it measures, on the same N distinct image-text pairs:

* ``raw``       - the backend alone in this process: preprocess + tokenize + encode in batches of
  ``max_batch_size``, no server, no engine (the floor);
* ``batched``   - N concurrent single-pair requests (``/evaluator/v1/evaluation/single``, at most
  ``concurrency`` in flight) against ``clipserve serve`` with batching on;
* ``unbatched`` - the same requests against a server started with ``--max-batch-size 1``;
* ``batch req`` - one ``/evaluator/v1/evaluation/batch`` request holding all N pairs (batched
  server).

It prints pairs/s, p50/p99 latency, ``batched / unbatched`` (what batching buys) and the server
overhead ``batched time / raw time - 1`` (what HTTP, JSON, decoding and queueing cost on top of the
model). Servers are separate processes on 127.0.0.1 with ``--preload``, measured one at a time.

A second table is single-request latency at concurrency 1: the p50 of one text, and of one image
(a JPEG data URI), per ``POST /v1/embeddings`` on the batched server, against the model's own
batch-1 time in this process (tokenize + forward; JPEG decode + preprocess + forward), the two
measured alternately, back to back, after the load tests have warmed the server (no model is
loaded in this process during the load tests: its threads and memory would weigh on the server).
``ratio`` is what the server adds: an idle device must not make a request wait (target at most
1.1). The requests go through a minimal keep-alive HTTP client whose bytes are prepared before the
clock starts, so the figure is the server's, not a client library's.
Models: ``tiny`` (a random 2-layer open_clip model built on the fly) and ``vit-b-32`` (open_clip
ViT-B-32 with random weights: the real architecture and cost, no download).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from PIL import Image

from clipserve.config import MediaSettings
from clipserve.media import decode_image
from clipserve.model_specs import BUILTIN_MODELS, ModelSpec
from clipserve.models.base import Backend
from clipserve.models.loader import load_backend, resolve_device, resolve_dtype
from clipserve.testing.servers import free_port

_CAPTIONS = (
    "a photo of an astronaut",
    "a cat lying on a blanket",
    "a cup of coffee",
    "a rocket on the launch pad",
    "a red car on a street",
    "a bowl of fruit",
    "a mountain landscape at sunset",
    "a dog running on the beach",
)
SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"
EMBEDDINGS = "/v1/embeddings"
LATENCY_SAMPLES = 60
"""Single requests per kind in the concurrency-1 latency measurement (at most ``pairs``)."""


@dataclass(frozen=True, slots=True)
class LoadResult:
    pairs_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int


@dataclass(frozen=True, slots=True)
class Latency:
    """p50 of one input at concurrency 1: through the server, and the model alone."""

    kind: str
    """'text' or 'image'."""
    raw_ms: float
    server_ms: float

    @property
    def ratio(self) -> float:
        return self.server_ms / self.raw_ms


LATENCY_TARGET = 1.1


@dataclass(frozen=True, slots=True)
class BenchResult:
    model: str
    pairs: int
    concurrency: int
    max_batch_size: int
    raw_pairs_per_s: float
    batched: LoadResult
    unbatched: LoadResult
    batch_request_pairs_per_s: float
    latency: tuple[Latency, ...] = ()

    @property
    def batching_speedup(self) -> float:
        return self.batched.pairs_per_s / self.unbatched.pairs_per_s

    @property
    def server_overhead(self) -> float:
        """Extra time the batched server took over the raw model for the same pairs."""
        return self.raw_pairs_per_s / self.batched.pairs_per_s - 1.0


def sample_images(n: int, size: int = 320) -> list[Image.Image]:
    """``n`` distinct real photos (scikit-image's, when installed) cropped and flipped variants."""
    try:
        from skimage import data

        names = ("astronaut", "chelsea", "coffee", "rocket")
        bases = [Image.fromarray(getattr(data, name)()) for name in names]
    except ImportError:  # the package does not depend on scikit-image
        bases = [Image.effect_mandelbrot((512, 512), (-2, -1.5, 1, 1.5), 100).convert("RGB")]
    images = []
    for i in range(n):
        base = bases[i % len(bases)].convert("RGB")
        shift = (i // len(bases)) * 7 % 64
        crop = base.crop((shift, shift, shift + min(base.size) - 64, shift + min(base.size) - 64))
        if (i // len(bases)) % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        images.append(crop.resize((size, size)))
    return images


def sample_pairs(n: int, size: int = 320) -> list[tuple[Image.Image, str]]:
    images = sample_images(n, size)
    return [(img, f"{_CAPTIONS[i % len(_CAPTIONS)]} #{i}") for i, img in enumerate(images)]


def jpeg_bytes(image: Image.Image) -> bytes:
    """``image`` as JPEG (quality 90): the benchmarks' encoded photos."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def jpeg_uri(image: Image.Image) -> str:
    """``image`` as a JPEG data URI: the image input of the benchmarks' requests."""
    return "data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(image)).decode()


def bench_registry(models: Sequence[str], workdir: Path) -> dict[str, dict[str, object]]:
    from clipserve.testing.tiny import build_tiny_open_clip

    # The built-in models are switched off: each bench server preloads only what it measures.
    entries: dict[str, dict[str, object]] = {
        name: {"enabled": False} for name in BUILTIN_MODELS if name not in models
    }
    for model in models:
        if model == "tiny":
            path = build_tiny_open_clip(workdir / "tiny")
            entries["tiny"] = {"model_name": f"local-dir:{path}", "description": "tiny random"}
        elif model == "vit-b-32":
            entries["vit-b-32"] = {
                "model_name": "ViT-B-32",
                "pretrained": None,
                "description": "ViT-B-32, random weights",
            }
        else:
            raise ValueError(f"unknown bench model '{model}' (use tiny, vit-b-32)")
    return entries


# --- raw ---------------------------------------------------------------------------------------


def _raw_pass(backend: Backend, pairs: Sequence[tuple[Image.Image, str]], batch_size: int) -> None:
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        pixels = torch.stack([backend.preprocess(img) for img, _ in chunk])
        backend.encode_images(pixels)
        backend.encode_texts(backend.tokenize([text for _, text in chunk]))


@contextmanager
def _model_alone(spec: ModelSpec, device: str) -> Iterator[Backend]:
    """The backend in this process, without server or engine; its weights are released on exit."""
    resolved = resolve_device(device)
    backend = load_backend(spec, device=resolved, dtype=resolve_dtype(resolved, None, "fp16"))
    try:
        yield backend
    finally:
        backend.close()


def raw_pairs_per_s(
    backend: Backend, pairs: Sequence[tuple[Image.Image, str]], batch_size: int
) -> float:
    _raw_pass(backend, pairs[: min(len(pairs), batch_size)], batch_size)  # warm-up
    started = time.perf_counter()
    _raw_pass(backend, pairs, batch_size)
    return len(pairs) / (time.perf_counter() - started)


# --- servers -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RunningServer:
    url: str
    pid: int


@contextmanager
def server(
    config: Path,
    model: str,
    *,
    max_batch_size: int,
    device: str,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[RunningServer]:
    """A ``clipserve serve`` process on a free loopback port, with ``model`` preloaded and the
    embedding cache off; ``extra`` are more ``serve`` flags, ``env`` more environment variables
    (settings)."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "CLIPSERVE_DEFAULT_MODEL": model,
        # The loads repeat their inputs: with the embedding cache they would measure its hits.
        "CLIPSERVE_CACHE__ENABLED": "false",
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "clipserve",
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--device",
        device,
        "--preload",
        "--max-batch-size",
        str(max_batch_size),
        "--log-level",
        "warning",
        *extra,
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the bench server exited with {process.returncode}")
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the bench server did not become ready within 300 s")
            time.sleep(0.2)
        yield RunningServer(base, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _load(base: str, bodies: Sequence[dict[str, str]], concurrency: int) -> LoadResult:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        for body in bodies[: min(len(bodies), concurrency)]:  # warm-up (and keep-alive)
            (await client.post(SINGLE, json=body)).raise_for_status()
        slots = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        failed = 0

        async def one(body: dict[str, str]) -> None:
            nonlocal failed
            async with slots:
                started = time.perf_counter()
                response = await client.post(SINGLE, json=body)
                latencies.append(time.perf_counter() - started)
                failed += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(one(body) for body in bodies))
        elapsed = time.perf_counter() - started
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return LoadResult(len(bodies) / elapsed, cuts[49] * 1000, cuts[98] * 1000, failed)


class _KeepAliveClient:
    """A minimal HTTP/1.1 keep-alive client for the latency measurement: the request bytes are
    built before the clock starts, so what is timed is the server and loopback, not a client
    library (httpx spends about a millisecond per request on these 2 cores)."""

    def __init__(self, host: str, port: int) -> None:
        self._host, self._port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> _KeepAliveClient:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()

    def request(self, path: str, body: dict[str, object]) -> bytes:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self._host}:{self._port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        return head.encode() + payload

    async def send(self, request: bytes) -> int:
        """Send a prepared request; read the whole response; return its status."""
        assert self._reader is not None
        assert self._writer is not None
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await self._reader.readexactly(length)
        return status


async def _latency(
    base: str,
    model: str,
    backend: Backend,
    texts: Sequence[str],
    jpegs: Sequence[bytes],
    uris: Sequence[str],
) -> tuple[Latency, Latency]:
    """p50 at concurrency 1 of one text and of one image: the model alone in this process
    (tokenize + forward; JPEG decode + preprocess + forward) and a single-input /v1/embeddings
    request, measured alternately (this machine's speed drifts between runs)."""
    media = MediaSettings()
    host, _, port = base.removeprefix("http://").partition(":")
    async with _KeepAliveClient(host, int(port)) as client:

        async def measure(
            alone: Callable[[int], object], bodies: list[dict[str, object]]
        ) -> tuple[float, float]:
            requests = [client.request(EMBEDDINGS, body) for body in bodies]
            own: list[float] = []
            served: list[float] = []
            for i in [0, *range(len(requests))]:  # the first round is a warm-up
                started = time.perf_counter()
                alone(i)
                own.append(time.perf_counter() - started)
                started = time.perf_counter()
                status = await client.send(requests[i])
                served.append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"{EMBEDDINGS} answered {status} during the latency run")
            return statistics.median(own[1:]) * 1000, statistics.median(served[1:]) * 1000

        text = await measure(
            lambda i: backend.encode_texts(backend.tokenize([texts[i]])),
            [{"model": model, "input": [t]} for t in texts],
        )
        image = await measure(
            lambda i: backend.encode_images(
                backend.preprocess(decode_image(jpegs[i], media))[None]
            ),
            [{"model": model, "input": [u], "modality": "image"} for u in uris],
        )
    return Latency("text", *text), Latency("image", *image)


async def _batch_request(base: str, bodies: Sequence[dict[str, str]], batch_size: int) -> float:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        payload = {"evaluations": list(bodies), "batch_size": batch_size, "show_progress": False}
        started = time.perf_counter()
        response = await client.post(BATCH, json=payload)
        elapsed = time.perf_counter() - started
        response.raise_for_status()
    return len(bodies) / elapsed


def bench_model(
    model: str,
    config: Path,
    spec: ModelSpec,
    *,
    pairs: int,
    concurrency: int,
    max_batch_size: int,
    device: str,
) -> BenchResult:
    samples = sample_pairs(pairs)
    jpegs = [jpeg_bytes(img) for img, _ in samples]
    uris = ["data:image/jpeg;base64," + base64.b64encode(data).decode() for data in jpegs]
    bodies = [
        {"image_input": uri, "text_prompt": text, "model_config_name": model}
        for uri, (_, text) in zip(uris, samples, strict=True)
    ]
    texts = [text for _, text in samples][:LATENCY_SAMPLES]
    jpegs, uris = jpegs[:LATENCY_SAMPLES], uris[:LATENCY_SAMPLES]
    with server(config, model, max_batch_size=max_batch_size, device=device) as running:
        # The load tests first, with no model in this process (its threads and memory would
        # weigh on the server); they also warm the server up for the latency run.
        batched = asyncio.run(_load(running.url, bodies, concurrency))
        batch_request = asyncio.run(_batch_request(running.url, bodies, max_batch_size))
        with _model_alone(spec, device) as backend:  # the server idles meanwhile
            raw = raw_pairs_per_s(backend, samples, max_batch_size)
            latency = asyncio.run(_latency(running.url, model, backend, texts, jpegs, uris))
    with server(config, model, max_batch_size=1, device=device) as running:
        unbatched = asyncio.run(_load(running.url, bodies, concurrency))
    return BenchResult(
        model, pairs, concurrency, max_batch_size, raw, batched, unbatched, batch_request, latency
    )


def run(
    models: Sequence[str], *, pairs: int, concurrency: int, max_batch_size: int, device: str
) -> list[BenchResult]:
    with tempfile.TemporaryDirectory(prefix="clipserve-bench-") as tmp:
        workdir = Path(tmp)
        registry = bench_registry(models, workdir)
        config = workdir / "models.json"
        config.write_text(json.dumps(registry))
        return [
            bench_model(
                m,
                config,
                ModelSpec.model_validate(registry[m]),
                pairs=pairs,
                concurrency=concurrency,
                max_batch_size=max_batch_size,
                device=device,
            )
            for m in models
        ]


def format_results(results: Sequence[BenchResult]) -> list[str]:
    lines = [
        f"{'model':<9} {'pairs':>5} {'conc':>4} {'bs':>3} {'raw p/s':>8} "
        f"{'batched p/s':>11} {'p50/p99 ms':>13} {'unbatched p/s':>13} {'p50/p99 ms':>13} "
        f"{'batch req p/s':>13} {'batched/unbatched':>17} {'overhead':>8}"
    ]
    for r in results:
        lines.append(
            f"{r.model:<9} {r.pairs:>5} {r.concurrency:>4} {r.max_batch_size:>3} "
            f"{r.raw_pairs_per_s:>8.1f} {r.batched.pairs_per_s:>11.1f} "
            f"{r.batched.p50_ms:>6.0f}/{r.batched.p99_ms:<6.0f} "
            f"{r.unbatched.pairs_per_s:>13.1f} "
            f"{r.unbatched.p50_ms:>6.0f}/{r.unbatched.p99_ms:<6.0f} "
            f"{r.batch_request_pairs_per_s:>13.1f} {r.batching_speedup:>16.2f}x "
            f"{r.server_overhead:>8.1%}"
        )
        if r.batched.failed or r.unbatched.failed:
            lines.append(
                f"  {r.model}: {r.batched.failed} batched and {r.unbatched.failed} unbatched "
                "requests failed"
            )
    if any(r.latency for r in results):
        lines.append("")
        lines.append(
            f"{'model':<9} {'C=1 latency':<11} {'model alone ms':>14} {'server p50 ms':>13} "
            f"{'ratio':>6}  target <= {LATENCY_TARGET:g}"
        )
        for r in results:
            for lat in r.latency:
                verdict = "met" if lat.ratio <= LATENCY_TARGET else "NOT met"
                lines.append(
                    f"{r.model:<9} {lat.kind:<11} {lat.raw_ms:>14.1f} {lat.server_ms:>13.1f} "
                    f"{lat.ratio:>5.2f}x  {verdict}"
                )
    return lines
