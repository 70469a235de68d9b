"""One-shot GPU benchmark: ViT-B/32 (random weights) limits, and ``clipserve serve`` against them.

    bash benchmarks/gpu.sh                                     # on a lent H200 (see its header)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gpu_bench.py --quick --device cpu   # smoke run

It prints one markdown table, a row per cell as it finishes (so a run cut short keeps what it
measured), with the issue's targets beside the figures:

* raw image encoder: ``encode_image`` on ready tensors, batch 256, fp16 on CUDA (fp32 on CPU);
* raw text encoder: ``encode_text`` at batch 1024, padded to the 77-token context, and the same
  batch run only up to its longest prompt (what the server does: exact for CLIP's causal tower);
* JPEG decode: ``torchvision.io.decode_jpeg`` of a list of 512 px JPEGs, on the GPU (nvJPEG) or
  on the CPU;
* the server: one ``clipserve serve`` process on 127.0.0.1 (``clipserve.bench.server``, model on
  ``--device``), fed by ``--client-procs`` processes of ``httpx.AsyncClient``: ``POST
  /v1/embeddings`` with many 512 px JPEG data URIs per request (``"modality": "image"``), with
  many texts per request, 256 concurrent single-image requests (img/s, p50/p99), and the p50 of
  one image and one text request at concurrency 1 (``clipserve.bench``'s keep-alive client, its
  bytes prepared before the clock starts).

Every request asks ``"encoding_format": "base64"`` (as the OpenAI SDK does by default), so the
client does not spend its time parsing JSON floats. Each cell runs for ``--seconds`` (after a
warm-up) and the whole run stops starting cells once ``--budget`` seconds have passed. Targets
(the issue's, for the H200): batch endpoint >= 10,000 img/s; texts >= 30,000/s; 256 concurrent
>= 5,000 img/s with p99 <= 100 ms; single-request p50 <= 10 ms.

Only the standard library and httpx are imported at module level: the client processes are
spawned and import this file, and must not load torch or the model.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

    import torch

MODEL = "vit-b-32"
EMBEDDINGS = "/v1/embeddings"
IMAGE_SIZE = 512
DISTINCT_IMAGES = 256
"""``clipserve.bench.sample_images`` gives 256 distinct crops; a request never repeats one (the
engine deduplicates inputs within a request, which would flatter the figure)."""

TARGET_BATCH_IMG_S = 10_000.0
TARGET_TEXTS_S = 30_000.0
TARGET_CONCURRENT_IMG_S = 5_000.0
TARGET_CONCURRENT_P99_MS = 100.0
TARGET_SINGLE_P50_MS = 10.0


# --- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    cell: str
    measured: str
    target: str
    verdict: str
    details: str


class Table:
    """A markdown table printed a row at a time, also rewritten to ``path`` after each row."""

    HEADER = ("cell", "measured", "target", "verdict", "details")

    def __init__(self, path: Path | None) -> None:
        self.rows: list[Row] = []
        self.path = path
        print(self._line(self.HEADER))
        print(self._line(tuple("---" for _ in self.HEADER)), flush=True)

    @staticmethod
    def _line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    def _row_line(self, row: Row) -> str:
        return self._line((row.cell, row.measured, row.target, row.verdict, row.details))

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(self._row_line(row), flush=True)
        if self.path is not None:
            lines = [self._line(self.HEADER), self._line(tuple("---" for _ in self.HEADER))]
            lines += [self._row_line(r) for r in self.rows]
            self.path.write_text("\n".join(lines) + "\n")


def _verdict(ok: bool, on_gpu: bool) -> str:
    if not on_gpu:
        return "n/a (cpu)"
    return "met" if ok else "NOT met"


def _headroom(value: float, target: float, on_gpu: bool) -> str:
    if not on_gpu:
        return "n/a (cpu)"
    return f"{value / target:.2f}x the target"


# --- timing ------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed_rate(
    step: Callable[[], object], device: str, seconds: float, items: int, warmup: int = 3
) -> tuple[float, int, float]:
    """Items/s of ``step`` (``items`` per call) run for about ``seconds`` after ``warmup`` calls;
    the device is synchronised per chunk of calls, chunks growing to about 0.2 s. Returns
    (rate, calls, elapsed)."""
    for _ in range(warmup):
        step()
    _sync(device)
    calls, chunk = 0, 1
    started = time.perf_counter()
    while True:
        chunk_started = time.perf_counter()
        for _ in range(chunk):
            step()
        _sync(device)
        calls += chunk
        now = time.perf_counter()
        if now - started >= seconds:
            break
        if now - chunk_started < 0.2:
            chunk *= 2
    elapsed = time.perf_counter() - started
    return calls * items / elapsed, calls, elapsed


# --- raw cells ---------------------------------------------------------------------------------


def _captions(n: int) -> list[str]:
    subjects = ("an astronaut", "a cat on a blanket", "a cup of coffee", "a rocket", "a red car")
    return [f"a photo of {subjects[i % len(subjects)]}, number {i}" for i in range(n)]


def raw_cells(args: argparse.Namespace, table: Table, deadline: float) -> None:
    import open_clip
    import torch

    on_gpu = args.device.startswith("cuda")
    dtype = torch.float16 if on_gpu else torch.float32
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model = model.eval().to(device=args.device, dtype=dtype)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    dtype_name = str(dtype).removeprefix("torch.")
    try:
        with torch.inference_mode():
            if _left(deadline, table, "raw image encoder"):
                pixels = torch.randn(args.image_batch, 3, 224, 224, device=args.device, dtype=dtype)
                rate, calls, elapsed = timed_rate(
                    lambda: model.encode_image(pixels), args.device, args.seconds, args.image_batch
                )
                table.add(
                    Row(
                        "raw image encoder (ready tensors)",
                        f"{rate:,.0f} img/s",
                        f"ceiling for >= {TARGET_BATCH_IMG_S:,.0f} img/s",
                        _headroom(rate, TARGET_BATCH_IMG_S, on_gpu),
                        f"{dtype_name}, batch {args.image_batch}, "
                        f"{calls} batches in {elapsed:.1f} s",
                    )
                )
                del pixels
            ids = tokenizer(_captions(args.text_batch)).to(args.device)
            if _left(deadline, table, "raw text encoder"):
                rate, calls, elapsed = timed_rate(
                    lambda: model.encode_text(ids), args.device, args.seconds, args.text_batch
                )
                table.add(
                    Row(
                        "raw text encoder (77-token context)",
                        f"{rate:,.0f} texts/s",
                        f"ceiling for >= {TARGET_TEXTS_S:,.0f} texts/s",
                        _headroom(rate, TARGET_TEXTS_S, on_gpu),
                        f"{dtype_name}, batch {args.text_batch}, "
                        f"{calls} batches in {elapsed:.1f} s",
                    )
                )
            if _left(deadline, table, "raw text encoder, trimmed"):
                _trimmed_text_cell(args, table, model, ids, dtype_name)
    finally:
        model.cpu()  # frees its GPU memory for the server
        if on_gpu:
            torch.cuda.empty_cache()


def _trimmed_text_cell(
    args: argparse.Namespace, table: Table, model: Any, ids: torch.Tensor, dtype_name: str
) -> None:
    """The server's own trimmed text pass (clipserve's open_clip backend), on the same batch."""
    on_gpu = args.device.startswith("cuda")
    try:
        from clipserve.models.open_clip_backend import _encode_text_trimmed
    except ImportError as exc:  # a private helper: it may move
        table.add(Row("raw text encoder (trimmed)", "-", "-", "skipped", f"{exc}"))
        return
    used = int(ids.argmax(dim=-1).max()) + 1
    rate, calls, elapsed = timed_rate(
        lambda: _encode_text_trimmed(model, ids), args.device, args.seconds, args.text_batch
    )
    table.add(
        Row(
            "raw text encoder (trimmed, as the server runs it)",
            f"{rate:,.0f} texts/s",
            f"ceiling for >= {TARGET_TEXTS_S:,.0f} texts/s",
            _headroom(rate, TARGET_TEXTS_S, on_gpu),
            f"{dtype_name}, batch {args.text_batch} run to {used} of 77 tokens, "
            f"{calls} batches in {elapsed:.1f} s",
        )
    )


def decode_cell(args: argparse.Namespace, table: Table, jpegs: Sequence[bytes]) -> None:
    import torch
    from torchvision.io import decode_jpeg

    on_gpu = args.device.startswith("cuda")
    batch = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    batch = (batch * (args.decode_batch // len(batch) + 1))[: args.decode_batch]
    where = "cuda" if on_gpu else "cpu"
    rate, calls, elapsed = timed_rate(
        lambda: decode_jpeg(batch, device=where), args.device, args.seconds, len(batch)
    )
    mean_kb = statistics.fmean(len(j) for j in jpegs) / 1024
    name = "nvJPEG decode (torchvision decode_jpeg)" if on_gpu else "JPEG decode (CPU decode_jpeg)"
    table.add(
        Row(
            name,
            f"{rate:,.0f} img/s",
            f"ceiling for >= {TARGET_BATCH_IMG_S:,.0f} img/s (GPU decoding)",
            _headroom(rate, TARGET_BATCH_IMG_S, on_gpu),
            f"{IMAGE_SIZE} px JPEGs (q90, {mean_kb:.0f} KiB mean), lists of {len(batch)} on "
            f"{where}, {calls} lists in {elapsed:.1f} s",
        )
    )


# --- load generation (spawned processes) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadJob:
    url: str
    bodies: tuple[str, ...]
    """Files of prepared JSON request bodies; each connection cycles through them."""
    items_per_request: int
    connections: int
    seconds: float
    warmup_requests: int


@dataclass(slots=True)
class LoadOutcome:
    items: int = 0
    requests: int = 0
    failed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    first_error: str = ""
    elapsed_s: float = 0.0
    """From the window's start to the last answer (the requests in flight at its end drain)."""


async def _run_job(job: LoadJob, barrier: Barrier | None) -> LoadOutcome:
    payloads = [Path(path).read_bytes() for path in job.bodies]
    headers = {"Content-Type": "application/json"}
    outcome = LoadOutcome()
    limits = httpx.Limits(
        max_connections=job.connections, max_keepalive_connections=job.connections
    )
    async with httpx.AsyncClient(base_url=job.url, timeout=120, limits=limits) as client:

        async def post(payload: bytes) -> httpx.Response:
            return await client.post(EMBEDDINGS, content=payload, headers=headers)

        # Warm-up: opens the connections (and warms the server) before the clock starts.
        warm = [payloads[i % len(payloads)] for i in range(job.warmup_requests)]
        for response in await asyncio.gather(*(post(p) for p in warm)):
            if response.status_code != 200 and not outcome.first_error:
                outcome.first_error = f"warm-up {response.status_code}: {response.text[:200]}"
        if barrier is not None:
            await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        started = time.perf_counter()
        end = started + job.seconds

        async def connection(k: int) -> None:
            i = k
            while time.perf_counter() < end:  # requests sent in the window all count
                payload = payloads[i % len(payloads)]
                i += job.connections
                sent = time.perf_counter()
                try:
                    response = await post(payload)
                except httpx.HTTPError as exc:
                    outcome.failed += 1
                    outcome.first_error = outcome.first_error or f"{type(exc).__name__}: {exc}"
                    continue
                outcome.requests += 1
                outcome.latencies_s.append(time.perf_counter() - sent)
                if response.status_code == 200:
                    outcome.items += job.items_per_request
                else:
                    outcome.failed += 1
                    if not outcome.first_error:
                        outcome.first_error = f"{response.status_code}: {response.text[:200]}"

        await asyncio.gather(*(connection(k) for k in range(job.connections)))
        outcome.elapsed_s = time.perf_counter() - started
    return outcome


def _client_process(job: LoadJob, barrier: Barrier, results: Queue[LoadOutcome | str]) -> None:
    try:
        results.put(asyncio.run(_run_job(job, barrier)))
    except BaseException:  # reported to the parent, which must not wait for it forever
        barrier.abort()
        results.put(traceback.format_exc(limit=3))


def run_load(job: LoadJob, procs: int) -> LoadOutcome:
    """``job`` in ``procs`` spawned client processes (the connections split between them), all
    starting their measured window together; their outcomes added up."""
    if procs <= 1:
        return asyncio.run(_run_job(job, None))
    ctx = mp.get_context("spawn")
    per_proc = [job.connections // procs + (k < job.connections % procs) for k in range(procs)]
    per_proc = [c for c in per_proc if c > 0]
    barrier = ctx.Barrier(len(per_proc))
    results: Queue[LoadOutcome | str] = ctx.Queue()
    workers = []
    for k, connections in enumerate(per_proc):
        share = LoadJob(
            job.url,
            job.bodies[k:] + job.bodies[:k],
            job.items_per_request,
            connections,
            job.seconds,
            max(1, job.warmup_requests * connections // job.connections),
        )
        worker = ctx.Process(target=_client_process, args=(share, barrier, results), daemon=True)
        worker.start()
        workers.append(worker)
    total = LoadOutcome()
    errors: list[str] = []
    try:
        for _ in workers:
            got = results.get(timeout=job.seconds + 300)
            if isinstance(got, str):
                errors.append(got)
                continue
            total.items += got.items
            total.requests += got.requests
            total.failed += got.failed
            total.latencies_s += got.latencies_s
            total.elapsed_s = max(total.elapsed_s, got.elapsed_s)
            total.first_error = total.first_error or got.first_error
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
    if errors:
        raise RuntimeError("a client process failed:\n" + errors[0])
    return total


def _quantile_ms(latencies: Sequence[float], q: int) -> float:
    if len(latencies) < 2:
        return latencies[0] * 1000 if latencies else float("nan")
    return statistics.quantiles(latencies, n=100, method="inclusive")[q - 1] * 1000


# --- server cells ------------------------------------------------------------------------------


def _write_bodies(folder: Path, name: str, bodies: Sequence[dict[str, object]]) -> tuple[str, ...]:
    paths = []
    for i, body in enumerate(bodies):
        path = folder / f"{name}-{i}.json"
        path.write_text(json.dumps(body))
        paths.append(str(path))
    return tuple(paths)


def _rotations(items: Sequence[str], per_request: int, count: int) -> list[list[str]]:
    """``count`` lists of ``per_request`` distinct items, each starting further along ``items``."""
    step = max(1, len(items) // max(1, count))
    return [[items[(k * step + j) % len(items)] for j in range(per_request)] for k in range(count)]


def _embeddings_body(inputs: Sequence[str], modality: str) -> dict[str, object]:
    return {
        "model": MODEL,
        "input": list(inputs),
        "modality": modality,
        "encoding_format": "base64",
    }


def _load_row(
    cell: str,
    outcome: LoadOutcome,
    unit: str,
    target: str,
    ok: Callable[[float, float], bool],
    on_gpu: bool,
    details: str,
) -> Row:
    rate = outcome.items / outcome.elapsed_s if outcome.elapsed_s else 0.0
    p50, p99 = _quantile_ms(outcome.latencies_s, 50), _quantile_ms(outcome.latencies_s, 99)
    verdict = _verdict(ok(rate, p99), on_gpu)
    if outcome.failed:
        verdict = f"FAILED ({outcome.failed} errors)"
        details += f"; first error: {outcome.first_error}"
    return Row(
        cell,
        f"{rate:,.0f} {unit} (p50 {p50:.1f} / p99 {p99:.1f} ms)",
        target,
        verdict,
        f"{details}; {outcome.requests} requests in {outcome.elapsed_s:.1f} s",
    )


async def _sequential_p50(
    url: str, bodies: Sequence[dict[str, object]], seconds: float
) -> tuple[float, float, int]:
    """p50 and p99 (ms) of one request at a time, cycling through ``bodies`` for ``seconds``."""
    from clipserve.bench import _KeepAliveClient

    host, _, port = url.removeprefix("http://").partition(":")
    async with _KeepAliveClient(host, int(port)) as client:
        requests = [client.request(EMBEDDINGS, body) for body in bodies]
        for request in requests[:5]:  # warm-up
            await client.send(request)
        latencies: list[float] = []
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end and len(latencies) < 5000:
            started = time.perf_counter()
            status = await client.send(requests[i % len(requests)])
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"{EMBEDDINGS} answered {status} during the latency run")
            i += 1
    return _quantile_ms(latencies, 50), _quantile_ms(latencies, 99), len(latencies)


def server_cells(
    args: argparse.Namespace, table: Table, deadline: float, uris: Sequence[str]
) -> None:
    from clipserve.bench import bench_registry, server

    on_gpu = args.device.startswith("cuda")
    texts = _captions(max(args.texts_per_request * 2, 64))
    with tempfile.TemporaryDirectory(prefix="clipserve-gpu-bench-") as tmp:
        workdir = Path(tmp)
        config = workdir / "models.json"
        config.write_text(json.dumps(bench_registry([MODEL], workdir)))
        image_bodies = _write_bodies(
            workdir,
            "images",
            [
                _embeddings_body(chunk, "image")
                for chunk in _rotations(uris, args.images_per_request, 4)
            ],
        )
        text_bodies = _write_bodies(
            workdir,
            "texts",
            [
                _embeddings_body(chunk, "text")
                for chunk in _rotations(texts, args.texts_per_request, 4)
            ],
        )
        single_bodies = _write_bodies(
            workdir, "single", [_embeddings_body([uri], "image") for uri in uris]
        )
        queue = str(max(16_384, 4 * args.concurrency))
        started = time.perf_counter()
        with server(
            config,
            MODEL,
            max_batch_size=args.server_batch,
            device=args.device,
            extra=["--queue-overflow-action", "wait", "--max-queue-size", queue],
            # One loopback client sends everything: it may fill the whole queue.
            env={"CLIPSERVE_BATCHING__CLIENT_QUEUE_SHARE": "1"},
        ) as running:
            print(
                f"<!-- server ready in {time.perf_counter() - started:.1f} s at {running.url}, "
                f"max batch {args.server_batch} -->",
                flush=True,
            )
            _capabilities(running.url)

            def load(name: str, job: LoadJob, make_row: Callable[[LoadOutcome], Row]) -> None:
                if not _left(deadline, table, name, job.seconds + 20):
                    return
                try:
                    table.add(make_row(run_load(job, args.client_procs)))
                except Exception as exc:  # one cell's failure must not lose the others
                    table.add(Row(name, "-", "-", "ERROR", f"{type(exc).__name__}: {exc}"[:500]))

            seconds = args.seconds
            load(
                "server: batch endpoint, images",
                LoadJob(
                    running.url,
                    image_bodies,
                    args.images_per_request,
                    args.batch_requests,
                    seconds,
                    args.batch_requests,
                ),
                lambda o: _load_row(
                    "server: batch endpoint, images",
                    o,
                    "img/s",
                    f">= {TARGET_BATCH_IMG_S:,.0f} img/s",
                    lambda rate, _: rate >= TARGET_BATCH_IMG_S,
                    on_gpu,
                    f"{args.images_per_request} {IMAGE_SIZE} px JPEG data URIs per request, "
                    f"{args.batch_requests} requests in flight",
                ),
            )
            load(
                "server: batch endpoint, texts",
                LoadJob(
                    running.url,
                    text_bodies,
                    args.texts_per_request,
                    args.batch_requests,
                    seconds,
                    args.batch_requests,
                ),
                lambda o: _load_row(
                    "server: batch endpoint, texts",
                    o,
                    "texts/s",
                    f">= {TARGET_TEXTS_S:,.0f} texts/s",
                    lambda rate, _: rate >= TARGET_TEXTS_S,
                    on_gpu,
                    f"{args.texts_per_request} texts per request, "
                    f"{args.batch_requests} requests in flight",
                ),
            )
            load(
                f"server: {args.concurrency} concurrent single-image requests",
                LoadJob(running.url, single_bodies, 1, args.concurrency, seconds, args.concurrency),
                lambda o: _load_row(
                    f"server: {args.concurrency} concurrent single-image requests",
                    o,
                    "img/s",
                    f">= {TARGET_CONCURRENT_IMG_S:,.0f} img/s, p99 <= "
                    f"{TARGET_CONCURRENT_P99_MS:.0f} ms",
                    lambda rate, p99: (
                        rate >= TARGET_CONCURRENT_IMG_S and p99 <= TARGET_CONCURRENT_P99_MS
                    ),
                    on_gpu,
                    f"one {IMAGE_SIZE} px JPEG per request",
                ),
            )
            singles: list[tuple[str, list[dict[str, object]]]] = [
                ("image", [_embeddings_body([uri], "image") for uri in uris[:64]]),
                ("text", [_embeddings_body([t], "text") for t in texts[:64]]),
            ]
            for kind, bodies in singles:
                name = f"server: single {kind} request, concurrency 1"
                if not _left(deadline, table, name, args.seconds / 2 + 5):
                    continue
                try:
                    p50, p99, n = asyncio.run(
                        _sequential_p50(running.url, bodies, args.seconds / 2)
                    )
                except Exception as exc:
                    table.add(Row(name, "-", "-", "ERROR", f"{type(exc).__name__}: {exc}"[:500]))
                    continue
                table.add(
                    Row(
                        name,
                        f"p50 {p50:.2f} ms (p99 {p99:.2f} ms)",
                        f"p50 <= {TARGET_SINGLE_P50_MS:.0f} ms",
                        _verdict(p50 <= TARGET_SINGLE_P50_MS, on_gpu),
                        f"{n} sequential requests, one keep-alive connection"
                        + (f", one {IMAGE_SIZE} px JPEG" if kind == "image" else ""),
                    )
                )


def _capabilities(url: str) -> None:
    """The server's own account of its device, dtype, decoder and batch sizes (an HTML comment)."""
    try:
        response = httpx.get(url + "/api/v1/capabilities", timeout=10)
        if response.status_code == 200:
            print(f"<!-- capabilities: {json.dumps(response.json())[:1500]} -->", flush=True)
    except httpx.HTTPError:
        pass


# --- main --------------------------------------------------------------------------------------


def _left(deadline: float, table: Table, cell: str, needed: float = 5.0) -> bool:
    """Whether ``needed`` seconds remain before ``deadline``; else the cell is listed as skipped."""
    if time.monotonic() + needed <= deadline:
        return True
    table.add(Row(cell, "-", "-", "skipped", "the run's --budget is spent"))
    return False


@contextmanager
def _cell(table: Table, name: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:  # one cell's failure must not lose the others
        traceback.print_exc()
        table.add(Row(name, "-", "-", "ERROR", f"{type(exc).__name__}: {exc}"[:500]))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per cell")
    parser.add_argument("--budget", type=float, default=330.0, help="no cell starts after this")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run")
    parser.add_argument("--image-batch", type=int, default=None, help="raw image batch (256)")
    parser.add_argument("--text-batch", type=int, default=None, help="raw text batch (1024)")
    parser.add_argument("--decode-batch", type=int, default=None, help="JPEGs per decode (256)")
    parser.add_argument("--server-batch", type=int, default=None, help="--max-batch-size (256)")
    parser.add_argument("--images-per-request", type=int, default=None, help="batch cell (256)")
    parser.add_argument("--texts-per-request", type=int, default=None, help="text cell (1000)")
    parser.add_argument("--batch-requests", type=int, default=None, help="batch requests (8)")
    parser.add_argument("--concurrency", type=int, default=256, help="single-image requests")
    parser.add_argument("--client-procs", type=int, default=None, help="client processes (4)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument("--skip-server", action="store_true", help="only the raw cells")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults: dict[str, object] = {
        "seconds": 2.0 if quick else 12.0,
        "image_batch": 8 if quick else 256,
        "text_batch": 64 if quick else 1024,
        "decode_batch": 32 if quick else 256,
        "server_batch": 8 if quick else 256,
        "images_per_request": 8 if quick else 256,
        "texts_per_request": 16 if quick else 1000,
        "batch_requests": 2 if quick else 8,
        "client_procs": 2 if quick else max(1, min(4, (os.cpu_count() or 1) // 4)),
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if quick and args.concurrency == 256:
        args.concurrency = 16
    if args.images_per_request > DISTINCT_IMAGES:
        parser.error(f"--images-per-request must be at most {DISTINCT_IMAGES} (distinct images)")
    if args.texts_per_request > 1000:
        parser.error("--texts-per-request must be at most 1000 (the server's max_batch_items)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (gpu.sh's `timeout`) unwinds, so the server process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    deadline = time.monotonic() + args.budget
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    from clipserve.bench import jpeg_uri, sample_images

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "no GPU"
    print(f"## clipserve GPU benchmark: ViT-B-32, random weights, on {args.device} ({gpu})\n")
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.version.cuda}, "
        f"{os.cpu_count()} CPUs; {args.seconds:g} s per cell"
        + (" (--quick: tiny sizes, not the issue's)" if args.quick else "")
        + f"; {args.client_procs} client process(es)\n",
        flush=True,
    )
    table = Table(args.markdown)
    with _cell(table, "raw encoders"):
        raw_cells(args, table, deadline)
    uris = [jpeg_uri(image) for image in sample_images(DISTINCT_IMAGES, size=IMAGE_SIZE)]
    if len(set(uris)) != len(uris):
        raise RuntimeError("sample_images gave repeated images")
    jpegs = [base64.b64decode(uri.partition(",")[2]) for uri in uris]
    if _left(deadline, table, "JPEG decode"):
        with _cell(table, "JPEG decode"):
            decode_cell(args, table, jpegs)
    if not args.skip_server and _left(deadline, table, "server", 60):
        with _cell(table, "server"):
            server_cells(args, table, deadline, uris)
    failed = [r.cell for r in table.rows if r.verdict in ("ERROR",) or r.verdict.startswith("FAIL")]
    print(f"\n{len(table.rows)} rows; {len(failed)} errors" + (f": {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
