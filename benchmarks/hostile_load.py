"""Hostile input mixed into normal load on loopback, bounded in time: do good requests keep their
throughput, and the server its memory, while about one request in ten is hostile?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/hostile_load.py [--model vit-b-32] [--phase-s 20]
        [--clients 4] [--hostile-share 0.10] [--hostile-classes gzip-bomb,long-word] [--rounds 1]

The normal load is a real model's: ViT-B/32 (random weights) by default. ``--model tiny`` (a 64 px
model whose good request costs ~5 ms of CPU, less than most hostile requests' refusal) measures
the price of refusing, not what a deployment loses: with it, one request in ten costing about
twice a good one takes a larger share of the CPU than 10%.

One ``clipserve serve`` process (random-weight model, ``--max-queue-size`` 64,
``--max-concurrent-requests`` 96, as ``benchmarks/soak.py``), pure Python clients (httpx, one
keep-alive pool). ``--clients`` good clients each send their next request as soon as the last is
answered, cycling through distinct single evaluations (a 128 px JPEG + a caption) and, one request
in four, a distinct ``/v1/embeddings`` text. Phases:

1. ``baseline`` - the good clients alone, ``--phase-s`` seconds;
2. ``hostile``  - the same good clients, plus a hostile sender in a separate process (so that
   building and sending its requests does not slow the good clients' event loop) which keeps its
   count at ``--hostile-share`` of all requests (one hostile request per nine good ones at 0.10),
   cycling through the hostile classes below, each request on its own (at most 16 in flight, of
   them at most 4 of a class that waits out its time-out, ``heavy-png-batch``);
3. ``after``    - the good clients alone again (recovery), once every hostile request has ended.

With ``--rounds`` N > 1, phases 1 and 2 alternate N times before ``after``, and the throughput
ratio is of their sums: on a machine shared with other work (the table shows the CPU that other
processes took in each phase) this cancels slow drift in that work.

Hostile classes (expected statuses; ``rare``: sent one cycle in ten):

* ``gzip-bomb``       ``Content-Encoding: gzip`` body inflating to 256 MiB of JSON (415);
* ``over-max-body``   a body of ``max_body_bytes`` (32 MiB) + 64 KiB (413, rare);
* ``classify-amplify`` a 2 MB label in a classify template of 100 ``{}`` (422);
* ``batch-5000-empty`` a batch evaluation of 5000 empty items (422, or per-item errors);
* ``png-bomb-header`` a data-URI PNG header declaring 100000x100000 pixels, no pixels (400/413);
* ``heavy-png-batch`` a batch of 40 distinct 6000x6000 PNGs of one colour each (4.5 KB
  each, 36 Mpx decoded): legal but heavy (200; about 20 s of CPU each, decoded at background
  priority, so offered at this rate they wait: a time-out is expected, see ``STARVABLE``);
* ``garbage-image``   4 KiB of random bytes as a PNG data URI (400);
* ``malformed-json``  a JSON body cut in the middle (400/422);
* ``long-word``       a 20,000-letter word as a prompt, over ``max_prompt_chars`` (422);
* ``long-word-legal`` a 9,000-letter word as a prompt, under the limit: the tokenizer's work (200);
* ``unknown-model``   an unknown model config name (404).

A hostile request fails if it is answered 5xx other than 503/504, or not answered within
``--hostile-timeout`` (but for ``heavy-png-batch``), or its connection breaks; any good request not
answered 200 fails.
Printed: per phase good requests/s, p50/p99 latency, failures, hostile requests and statuses,
server RSS at the phase's end and its peak (sampled every 0.5 s); per hostile class the statuses
and latencies; then the two figures the hostile-input issue asks for: good throughput under
hostile load / baseline (must be >= 0.8) and the server's RSS growth from the start (after a
warm-up) to the end (must be <= 300 MB). The exit status is 1 if either is missed or any request
failed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import gzip
import json
import multiprocessing as mp
import os
import statistics
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from clipserve.bench import (
    BATCH,
    EMBEDDINGS,
    SINGLE,
    bench_registry,
    jpeg_uri,
    sample_pairs,
    server,
)

CLASSIFY = "/v1/classify"
IMAGE_SIZE = 128
MAX_BODY_BYTES = 32 * 1024 * 1024  # the server's default max_body_bytes
HOSTILE_IN_FLIGHT = 16
STARVABLE_IN_FLIGHT = 4
"""At most this many of a :data:`STARVABLE` class in flight: they wait out their time-out, and
would otherwise take every hostile slot and hold the hostile share under ``--hostile-share``."""
THROUGHPUT_TARGET = 0.8
RSS_GROWTH_LIMIT_MB = 300.0
BUSY_CORES = 0.25
"""Other processes' CPU use in a phase above which the figures are flagged as noisy."""
# The server trusts one proxy (CLIPSERVE_RATE_LIMIT__TRUSTED_PROXIES=1), so each side is its own
# client, as separate tenants are: the hostile one's share of each queue is not the good ones'.
GOOD_CLIENT = {"x-forwarded-for": "198.51.100.10"}
HOSTILE_CLIENT = {"x-forwarded-for": "203.0.113.66"}
JSON_HEADERS = {"content-type": "application/json"}


# --- measurements ------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """The process's resident memory in MB (10^6 bytes), from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the process has used; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (every process)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(values) - values[3] - values[4]) / _TICK  # less idle and iowait


@dataclass
class CpuWindow:
    """Cores used during a phase by the server, and by processes other than the server and this
    benchmark (other work on the machine makes the figures noisy: it is shown so)."""

    server_pid: int
    our_pids: tuple[int, ...]
    server_cores: float = 0.0
    our_cores: float = 0.0
    other_cores: float = 0.0

    def _snapshot(self) -> tuple[float, float, float, float]:
        ours = sum(cpu_s(pid) for pid in self.our_pids)
        return time.perf_counter(), cpu_s(self.server_pid), ours, machine_busy_s()

    def __enter__(self) -> CpuWindow:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, server, ours, busy = (
            b - a for a, b in zip(self._start, self._snapshot(), strict=True)
        )
        self.server_cores = server / wall
        self.our_cores = ours / wall
        self.other_cores = max(0.0, busy - server - ours) / wall


class RssSampler(threading.Thread):
    """Samples the server's RSS every ``interval`` seconds; ``mark()`` starts a new phase's peak."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = 0.0
        self.phase_peak = 0.0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                value = rss_mb(self.pid)
            except OSError:  # the server is gone: the good requests will say so
                return
            self.peak = max(self.peak, value)
            self.phase_peak = max(self.phase_peak, value)

    def mark(self) -> None:
        self.phase_peak = rss_mb(self.pid)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    if len(latencies) < 2:
        return (latencies[0] * 1000, latencies[0] * 1000) if latencies else (0.0, 0.0)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


@dataclass
class Phase:
    name: str
    kind: str = "baseline"
    """baseline, hostile or after."""
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    good_failures: Counter[str] = field(default_factory=Counter)
    hostile: list[tuple[str, str, float]] = field(default_factory=list)
    """(class, status or error name, seconds) per hostile request."""
    rss_end: float = 0.0
    cpu: CpuWindow | None = None
    rss_peak: float = 0.0

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return sum(self.good_failures.values())

    @property
    def hostile_statuses(self) -> Counter[str]:
        return Counter(status for _, status, _ in self.hostile)

    @property
    def share(self) -> float:
        total = len(self.latencies) + self.failed + len(self.hostile)
        return len(self.hostile) / total if total else 0.0


def rate(phases: Iterable[Phase]) -> float:
    """Good requests per second over ``phases`` together."""
    chosen = list(phases)
    seconds = sum(p.seconds for p in chosen)
    return sum(len(p.latencies) for p in chosen) / seconds if seconds else 0.0


STARVABLE = frozenset({"heavy-png-batch"})
"""Legal work the server does at background priority (images over ``heavy_image_pixels`` decode on
low-priority threads): offered faster than the CPU left over can serve it, it waits, and a client
time-out is the expected outcome, not a hang."""


def _release(counts: Counter[str], name: str, _: object) -> None:
    counts[name] -= 1


def hostile_failed(name: str, status: str) -> bool:
    """5xx other than 503/504, a time-out (but for :data:`STARVABLE` classes) or a broken
    connection."""
    if status.isdigit():
        return int(status) >= 500 and int(status) not in (503, 504)
    return not (status == "timeout" and name in STARVABLE)


# --- good load ---------------------------------------------------------------------------------


def good_requests(model: str, pairs: int) -> list[tuple[str, bytes]]:
    """Distinct good requests, prepared as bytes: single evaluations, and a text embedding every
    fourth."""
    requests: list[tuple[str, bytes]] = []
    for i, (image, text) in enumerate(sample_pairs(pairs, size=IMAGE_SIZE)):
        uri = jpeg_uri(image)
        body = {"image_input": uri, "text_prompt": text, "model_config_name": model}
        requests.append((SINGLE, json.dumps(body).encode()))
        if i % 3 == 2:
            body = {"model": model, "input": [f"{text}, seen from afar"]}
            requests.append((EMBEDDINGS, json.dumps(body).encode()))
    return requests


async def good_load(
    url: str,
    requests: list[tuple[str, bytes]],
    clients: int,
    seconds: float,
    phase: Phase,
    on_answer: Callable[[], None] = lambda: None,
) -> None:
    """``clients`` closed-loop clients for ``seconds``; each starts at its own offset."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        deadline = time.perf_counter() + seconds

        async def one_client(offset: int) -> None:
            i = offset
            while time.perf_counter() < deadline:
                path, body = requests[i % len(requests)]
                i += clients
                started = time.perf_counter()
                try:
                    response = await client.post(
                        path, content=body, headers={**JSON_HEADERS, **GOOD_CLIENT}
                    )
                except httpx.HTTPError as exc:
                    phase.good_failures[type(exc).__name__] += 1
                    continue
                finally:
                    on_answer()
                if response.status_code == 200:
                    phase.latencies.append(time.perf_counter() - started)
                else:
                    phase.good_failures[str(response.status_code)] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client(k * len(requests) // clients) for k in range(clients)))
        phase.seconds = time.perf_counter() - started


# --- hostile requests --------------------------------------------------------------------------


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png(width: int, height: int, idat: bytes | None = None, colour: int = 0) -> bytes:
    """A PNG declaring ``width`` x ``height``: header-only (RGB, no pixels) without ``idat``; else
    a 1-bit palette image whose two palette entries are ``colour`` (24-bit RGB), whose pixels
    ``idat`` holds (all index 0: one colour)."""
    signature = b"\x89PNG\r\n\x1a\n"
    if idat is None:
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return signature + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 3, 0, 0, 0)
    plte = colour.to_bytes(3, "big") * 2
    return (
        signature
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"PLTE", plte)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@dataclass(frozen=True)
class Hostile:
    name: str
    expected: str
    build: Callable[[int], tuple[str, bytes, dict[str, str]]]
    """n (how many of this class were sent before) -> (path, body, headers)."""
    every: int = 1
    """Sent in one cycle out of ``every``."""


def hostile_classes(model: str, good_uri: str) -> list[Hostile]:
    """The hostile classes. Their large bodies are built on first use, once (the heavy PNG batch
    and the random ones per request: distinct each time)."""

    def post_json(path: str, body: object) -> tuple[str, bytes, dict[str, str]]:
        return path, json.dumps(body).encode(), JSON_HEADERS

    @functools.cache
    def gzip_body() -> bytes:
        bomb = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
        head = json.dumps({"model": model, "input": "#"})[:-3].encode()  # to the string's quote
        parts = [bomb.compress(head)]
        block = b"a" * (1 << 20)
        parts += [bomb.compress(block) for _ in range(256)]
        parts += [bomb.compress(b'"}'), bomb.flush()]
        body = b"".join(parts)
        assert gzip.decompress(body)[-4:] == b'aa"}'
        return body

    gzip_headers = {**JSON_HEADERS, "content-encoding": "gzip"}

    @functools.cache
    def over_body() -> bytes:
        filler = MAX_BODY_BYTES + 64 * 1024 - len(b'{"input": ""}')
        return b'{"input": "' + b"x" * filler + b'"}'

    @functools.cache
    def classify() -> bytes:
        labels = ["y" * 2_000_000]
        body = {"model": model, "input": good_uri, "labels": labels, "template": "{}" * 100}
        return json.dumps(body).encode()

    @functools.cache
    def empty_batch() -> bytes:
        return json.dumps({"evaluations": [{}] * 5000}).encode()

    header_bomb = _uri(png(100_000, 100_000))
    # 6000 rows of 750 bytes of zero bits (palette index 0), each with filter byte 0.
    heavy_idat = zlib.compress((b"\x00" + bytes(6000 // 8)) * 6000, 9)

    def heavy_batch(n: int) -> tuple[str, bytes, dict[str, str]]:
        evaluations = [
            {
                "image_input": _uri(png(6000, 6000, heavy_idat, colour=(n * 40 + i) * 9973 + 1)),
                "text_prompt": f"a plain coloured square #{n}.{i}",
                "model_config_name": model,
            }
            for i in range(40)
        ]
        return post_json(BATCH, {"evaluations": evaluations, "show_progress": False})

    def header_bomb_request(n: int) -> tuple[str, bytes, dict[str, str]]:
        if n % 2:
            return post_json(
                EMBEDDINGS, {"model": model, "input": [header_bomb], "modality": "image"}
            )
        body = {"image_input": header_bomb, "text_prompt": "x", "model_config_name": model}
        return post_json(SINGLE, body)

    def word(n: int, length: int) -> str:
        letters = "abcdefghijklmnopqrstuvwxyz"
        return "".join(letters[(i * 7 + n) % 26] for i in range(length))

    def long_word(n: int, length: int) -> tuple[str, bytes, dict[str, str]]:
        if n % 2:
            return post_json(EMBEDDINGS, {"model": model, "input": [word(n, length)]})
        body = {"image_input": good_uri, "text_prompt": word(n, length), "model_config_name": model}
        return post_json(SINGLE, body)

    return [
        Hostile("gzip-bomb", "415", lambda n: (EMBEDDINGS, gzip_body(), gzip_headers)),
        Hostile(
            "over-max-body", "413", lambda n: (EMBEDDINGS, over_body(), JSON_HEADERS), every=10
        ),
        Hostile("classify-amplify", "422", lambda n: (CLASSIFY, classify(), JSON_HEADERS)),
        Hostile("batch-5000-empty", "422/200", lambda n: (BATCH, empty_batch(), JSON_HEADERS)),
        Hostile("png-bomb-header", "400/413", header_bomb_request),
        Hostile("heavy-png-batch", "200", heavy_batch),
        Hostile(
            "garbage-image",
            "400",
            lambda n: post_json(
                SINGLE,
                {
                    "image_input": _uri(os.urandom(4096)),
                    "text_prompt": "x",
                    "model_config_name": model,
                },
            ),
        ),
        Hostile(
            "malformed-json",
            "400/422",
            lambda n: (
                SINGLE,
                f'{{"image_input": "{good_uri[: 40 + n % 40]}'.encode(),
                JSON_HEADERS,
            ),
        ),
        Hostile("long-word", "422", lambda n: long_word(n, 20_000)),
        Hostile("long-word-legal", "200", lambda n: long_word(n, 9_000)),
        Hostile(
            "unknown-model",
            "404",
            lambda n: post_json(
                SINGLE,
                {"image_input": good_uri, "text_prompt": "x", "model_config_name": f"nope-{n}"},
            ),
        ),
    ]


def schedule(classes: list[Hostile]) -> list[Hostile]:
    """Ten cycles through the classes; a class with ``every`` k is in one of k cycles."""
    return [c for cycle in range(10) for c in classes if cycle % c.every == 0]


async def hostile_sender(
    url: str,
    classes: list[Hostile],
    share: float,
    timeout: float,
    good_answers: Any,
    go: Any,
    stop: Any,
    out: Any,
) -> None:
    """For each hostile phase (``go`` set, ``stop`` clear): keeps hostile requests at ``share``
    of all (``good_answers`` counts the good ones); at ``stop``, waits for those in flight and
    puts their results in ``out``. ``go`` with ``stop`` set: the end."""
    order = schedule(classes)
    sent: Counter[str] = Counter()
    starved: Counter[str] = Counter()  # in flight, per STARVABLE class
    count = 0
    ratio = share / (1 - share)
    limits = httpx.Limits(max_connections=HOSTILE_IN_FLIGHT, max_keepalive_connections=4)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def one(hostile: Hostile, n: int, results: list[tuple[str, str, float]]) -> None:
            path, body, headers = hostile.build(n)
            started = time.perf_counter()
            try:
                response = await client.post(
                    path, content=body, headers={**headers, **HOSTILE_CLIENT}
                )
                status = str(response.status_code)
            except httpx.TimeoutException:
                status = "timeout"
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            results.append((hostile.name, status, time.perf_counter() - started))

        while True:
            await asyncio.to_thread(go.wait)
            if stop.is_set():
                return
            results: list[tuple[str, str, float]] = []
            in_flight: set[asyncio.Task[None]] = set()
            base, this_phase = good_answers.value, 0
            while not stop.is_set():
                behind = this_phase < (good_answers.value - base) * ratio
                if behind and len(in_flight) < HOSTILE_IN_FLIGHT:
                    hostile = order[count % len(order)]
                    if hostile.name in STARVABLE and starved[hostile.name] >= STARVABLE_IN_FLIGHT:
                        count += 1  # its slots are taken: this turn goes to the next class
                        continue
                    task = asyncio.create_task(one(hostile, sent[hostile.name], results))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                    if hostile.name in STARVABLE:
                        starved[hostile.name] += 1
                        task.add_done_callback(functools.partial(_release, starved, hostile.name))
                    sent[hostile.name] += 1
                    count += 1
                    this_phase += 1
                    await asyncio.sleep(0)
                else:
                    await asyncio.sleep(0.005)
            if in_flight:
                await asyncio.wait(set(in_flight))
            out.put(results)


def hostile_process(
    url: str,
    model: str,
    names: list[str],
    share: float,
    timeout: float,
    good_answers: Any,
    ready: Any,
    go: Any,
    stop: Any,
    out: Any,
) -> None:
    """The hostile sender's process: builds its requests, says it is ready, then sends in each
    hostile phase (:func:`hostile_sender`)."""
    ((image, _),) = sample_pairs(1, size=IMAGE_SIZE)
    good_uri = jpeg_uri(image)
    classes = [c for c in hostile_classes(model, good_uri) if c.name in names]
    for hostile in classes:  # the large bodies are built now, before the phases
        hostile.build(0)
    ready.set()
    asyncio.run(hostile_sender(url, classes, share, timeout, good_answers, go, stop, out))


# --- report ------------------------------------------------------------------------------------


def _statuses(counts: Counter[str]) -> str:
    return " ".join(f"{status}x{n}" for status, n in sorted(counts.items())) or "-"


def report(
    phases: list[Phase],
    classes: list[Hostile],
    start_rss: float,
    ready_rss: float,
    peak_rss: float,
) -> list[str]:
    lines = [
        f"{'phase':<9} {'secs':>5} {'good ok':>7} {'good/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'failed':>6} {'hostile':>7} {'share':>6} {'RSS end':>8} {'RSS peak':>8} "
        f"{'server':>6} {'bench':>5} {'others':>6}  "
        "hostile statuses"
    ]
    for p in phases:
        p50, p99 = _percentiles(p.latencies)
        cpu = p.cpu or CpuWindow(0, ())
        lines.append(
            f"{p.name:<9} {p.seconds:>5.1f} {len(p.latencies):>7} {p.rate:>7.1f} {p50:>7.1f} "
            f"{p99:>7.1f} {p.failed:>6} {len(p.hostile):>7} {p.share:>6.1%} "
            f"{p.rss_end:>8.1f} {p.rss_peak:>8.1f} {cpu.server_cores:>6.2f} {cpu.our_cores:>5.2f} "
            f"{cpu.other_cores:>6.2f}"
            f"  {_statuses(p.hostile_statuses)}"
        )
        if p.good_failures:
            lines.append(f"  good failures: {_statuses(p.good_failures)}")
    lines.append(
        "(server, bench, others: CPU cores used by the server, by this benchmark's two processes "
        "and by everything else on the machine)"
    )
    busy = max((p.cpu.other_cores for p in phases if p.cpu), default=0.0)
    if busy > BUSY_CORES:
        lines.append(
            f"WARNING: other processes used up to {busy:.2f} cores during a phase: the machine was "
            "shared, the throughput figures are noisy"
        )
    lines.append("")
    lines.append(
        f"{'hostile class':<17} {'expected':>8} {'sent':>5} {'failed':>6} {'p50 ms':>8} "
        f"{'max ms':>8}  statuses"
    )
    hostile = [h for p in phases for h in p.hostile]
    for c in classes:
        mine = [(status, seconds) for name, status, seconds in hostile if name == c.name]
        seconds = [s for _, s in mine]
        p50 = statistics.median(seconds) * 1000 if seconds else 0.0
        worst = max(seconds) * 1000 if seconds else 0.0
        failed = sum(hostile_failed(c.name, status) for status, _ in mine)
        lines.append(
            f"{c.name:<17} {c.expected:>8} {len(mine):>5} {failed:>6} {p50:>8.1f} {worst:>8.1f}  "
            f"{_statuses(Counter(status for status, _ in mine))}"
        )
    lines.append("")
    lines.append(
        f"server RSS (MB): {ready_rss:.1f} when ready, {start_rss:.1f} at start (after warm-up), "
        f"{phases[-1].rss_end:.1f} at end, peak {peak_rss:.1f}"
    )
    return lines


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit-b-32", choices=["vit-b-32", "tiny"])
    parser.add_argument("--phase-s", type=float, default=20.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=4, help="good clients (closed loop)")
    parser.add_argument(
        "--hostile-share", type=float, default=0.10, help="hostile share of all requests"
    )
    parser.add_argument(
        "--hostile-timeout", type=float, default=60.0, help="seconds before a hostile one hangs"
    )
    parser.add_argument("--hostile-classes", default="", help="comma-separated; default: all")
    parser.add_argument("--pairs", type=int, default=64, help="distinct good evaluations")
    parser.add_argument("--max-queue-size", type=int, default=64)
    parser.add_argument("--max-concurrent-requests", type=int, default=96, help="0: no limit")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="baseline + hostile phase pairs before 'after' (more than 1 on a shared machine: "
        "the ratio is then of the sums, which cancels slow drift in the machine's other load)",
    )
    args = parser.parse_args()
    if not 0 < args.hostile_share < 1:
        parser.error("--hostile-share must be between 0 and 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    all_names = [c.name for c in hostile_classes(args.model, "data:,")]
    names = [n.strip() for n in args.hostile_classes.split(",") if n.strip()] or all_names
    unknown = set(names) - set(all_names)
    if unknown:
        parser.error(f"unknown hostile classes {sorted(unknown)}; known: {', '.join(all_names)}")

    context = mp.get_context("spawn")
    good_answers = context.Value("q", 0, lock=False)

    def answered() -> None:
        good_answers.value += 1  # one writer (this event loop); the sender only reads

    os.environ["CLIPSERVE_RATE_LIMIT__TRUSTED_PROXIES"] = "1"  # the server reads its env
    with tempfile.TemporaryDirectory(prefix="clipserve-hostile-") as tmp:
        workdir = Path(tmp)
        config = workdir / "models.json"
        config.write_text(json.dumps(bench_registry([args.model], workdir)))
        requests = good_requests(args.model, args.pairs)
        extra = ["--max-queue-size", str(args.max_queue_size)]
        if args.max_concurrent_requests:
            extra += ["--max-concurrent-requests", str(args.max_concurrent_requests)]
        with server(config, args.model, max_batch_size=32, device="cpu", extra=extra) as running:
            ready_rss = rss_mb(running.pid)
            ready, go, stop = context.Event(), context.Event(), context.Event()
            out = context.Queue()
            sender = context.Process(
                target=hostile_process,
                args=(
                    running.url,
                    args.model,
                    names,
                    args.hostile_share,
                    args.hostile_timeout,
                    good_answers,
                    ready,
                    go,
                    stop,
                    out,
                ),
                daemon=True,
            )
            sender.start()
            if not ready.wait(120):
                raise RuntimeError("the hostile sender did not get ready within 120 s")
            # Warm-up: 3 s of good load, then the memory the phases start from.
            warm = Phase("warm-up")
            asyncio.run(good_load(running.url, requests, args.clients, 3.0, warm))
            time.sleep(1.0)
            start_rss = rss_mb(running.pid)
            sampler = RssSampler(running.pid)
            sampler.start()
            phases = [
                Phase(f"{kind}{n if n > 1 else ''}", kind)
                for n in range(1, args.rounds + 1)
                for kind in ("baseline", "hostile")
            ] + [Phase("after", "after")]
            for phase in phases:
                sampler.mark()
                if phase.kind == "hostile":
                    stop.clear()
                    go.set()
                with CpuWindow(running.pid, (os.getpid(), sender.pid or 0)) as phase.cpu:
                    asyncio.run(
                        good_load(
                            running.url, requests, args.clients, args.phase_s, phase, answered
                        )
                    )
                if phase.kind == "hostile":
                    go.clear()
                    stop.set()  # the sender waits for its requests in flight, then reports
                    phase.hostile = out.get(timeout=args.hostile_timeout + 60)
                time.sleep(1.0)  # let the queues drain before reading memory
                phase.rss_end = rss_mb(running.pid)
                phase.rss_peak = max(sampler.phase_peak, phase.rss_end)
                print(
                    f"{phase.name}: {phase.rate:.1f} good/s, {len(phase.hostile)} hostile, "
                    f"RSS {phase.rss_end:.1f} MB",
                    file=sys.stderr,
                    flush=True,
                )
            go.set()  # with stop set: the sender's end
            sender.join(30)
            sampler.stop()
            health = httpx.get(running.url + "/health", timeout=10).json()

    classes = [c for c in hostile_classes(args.model, "data:,") if c.name in names]
    print(
        f"model {args.model}, {args.phase_s:g} s per phase, {args.clients} good clients, "
        f"hostile share {args.hostile_share:.0%}, {args.rounds} round(s), "
        f"max_queue_size {args.max_queue_size}, "
        f"max_concurrent_requests {args.max_concurrent_requests or 'none'}"
    )
    for line in report(phases, classes, start_rss, ready_rss, sampler.peak):
        print(line)
    print(
        f"after: status {health.get('status')}, queue {health.get('queue_size')}, "
        f"in flight {health.get('inflight_batches')}"
    )
    baseline = rate(p for p in phases if p.kind == "baseline")
    hostile = rate(p for p in phases if p.kind == "hostile")
    after = phases[-1].rate
    ratio = hostile / baseline if baseline else 0.0
    growth = phases[-1].rss_end - start_rss
    good_failed = sum(p.failed for p in phases)
    hostile_fails = sum(
        hostile_failed(name, status) for p in phases for name, status, _ in p.hostile
    )
    checks = [
        (
            ratio >= THROUGHPUT_TARGET,
            f"good throughput hostile/baseline: {ratio:.2f} (target >= {THROUGHPUT_TARGET}); "
            f"after/baseline {after / baseline if baseline else 0:.2f}",
        ),
        (
            growth <= RSS_GROWTH_LIMIT_MB,
            f"server RSS growth end - start: {growth:+.1f} MB (limit {RSS_GROWTH_LIMIT_MB:g}); "
            f"peak {sampler.peak - start_rss:+.1f} MB",
        ),
        (good_failed == 0, f"good requests failed: {good_failed}"),
        (hostile_fails == 0, f"hostile requests failed (5xx but 503/504, hung): {hostile_fails}"),
    ]
    for ok, line in checks:
        print(f"{'ok  ' if ok else 'FAIL'} {line}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
