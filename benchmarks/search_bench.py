"""Collections through the engine: ingest items/s with the embedding cache cold and warm, query
latency by text, and the cache's hit ratio on a repeated (Zipf) query workload.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_bench.py                  # vit-b-32
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_bench.py --model tiny --images 64

Items are real photos (scikit-image's, JPEG bytes, each made distinct by a one-pixel mark) and
captions. "cold" adds them to a first collection with an empty cache; "warm" adds the same
inputs to a second collection: the cache answers, no forward pass runs. The query workload draws
``--queries`` texts from ``--distinct`` captions with Zipf weights (s = 1.1), as a search box's
traffic repeats; the hit ratio is read from the service's own cache metrics. Index latency at
100k vectors per index kind is ``benchmarks/index_bench.py``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from clipserve.bench import bench_registry, sample_images
from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.engine.tasks.embed import Content
from clipserve.engine.tasks.search import Item


def _photos(n: int, size: int) -> list[bytes]:
    out = []
    for i, photo in enumerate(sample_images(n, size)):
        image = photo.convert("RGB").resize((size, size))
        image.putpixel((i % size, (i // size) % size), (i % 256, 7, 7))  # distinct bytes
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _hits(engine: Engine) -> tuple[float, float]:
    registry = engine.metrics.registry
    hits = sum(
        registry.get_sample_value(
            "clipserve_cache_hits_total", {"model": m, "modality": "text", "tier": t}
        )
        or 0.0
        for m in engine.registry.names()
        for t in ("memory", "inflight")
    )
    misses = sum(
        registry.get_sample_value(
            "clipserve_cache_misses_total", {"model": m, "modality": "text", "tier": "memory"}
        )
        or 0.0
        for m in engine.registry.names()
    )
    return hits, misses


async def bench(args: argparse.Namespace, workdir: Path) -> None:
    config = workdir / "models.json"
    config.write_text(json.dumps({"models": bench_registry([args.model], workdir)}))
    settings = Settings(
        config_path=config,
        default_model=args.model,
        config_reload_interval_s=0,
        collections={"data_dir": workdir / "collections", "save_interval_s": 3600},
    )
    photos = _photos(args.images, args.size)
    captions = [f"photo number {i} of a scene with things in it" for i in range(args.texts)]
    items = [Item(f"img-{i}", Content.image(b)) for i, b in enumerate(photos)]
    items += [Item(f"txt-{i}", Content.text(t)) for i, t in enumerate(captions)]
    async with Engine(settings) as engine:
        await engine.registry.get(args.model)
        await engine.embed_texts(args.model, ["warm-up"])
        rows = []
        for name in ("cold", "warm"):
            await engine.collections.create(name, model=args.model, index=args.index)
            started = time.perf_counter()
            for first in range(0, len(items), args.request):
                await engine.collections.add(name, items[first : first + args.request])
            elapsed = time.perf_counter() - started
            rows.append((name, len(items), elapsed, len(items) / elapsed))
        rng = np.random.default_rng(0)
        weights = 1.0 / np.arange(1, args.distinct + 1) ** 1.1
        draws = rng.choice(args.distinct, size=args.queries, p=weights / weights.sum())
        queries = [f"query {d}: something to look for" for d in draws]
        hits0, misses0 = _hits(engine)
        latencies = []
        for query in queries:
            started = time.perf_counter()
            await engine.collections.search("cold", text=query, top_k=10)
            latencies.append((time.perf_counter() - started) * 1000)
        hits, misses = _hits(engine)
    print(f"model {args.model}, index {args.index}, {args.images} photos + {args.texts} captions")
    print("| ingest | items | seconds | items/s |")
    print("|---|---|---|---|")
    for name, n, elapsed, rate in rows:
        print(f"| {name} cache | {n} | {elapsed:.2f} | {rate:.1f} |")
    print(f"warm / cold: {rows[1][3] / rows[0][3]:.1f}x")
    hit_ratio = (hits - hits0) / max(1.0, (hits - hits0) + (misses - misses0))
    quantiles = statistics.quantiles(latencies, n=100)
    print(
        f"text queries: {args.queries} of {args.distinct} distinct (Zipf 1.1): p50 "
        f"{statistics.median(latencies):.2f} ms, p99 {quantiles[98]:.2f} ms, cache hit ratio "
        f"{hit_ratio:.2f} (distinct drawn: {len(set(draws.tolist()))})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit-b-32", choices=["vit-b-32", "tiny"])
    parser.add_argument("--index", default="hnsw")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--size", type=int, default=512, help="photo side in pixels")
    parser.add_argument("--request", type=int, default=64, help="items per add call")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        asyncio.run(bench(args, Path(workdir)))


if __name__ == "__main__":
    main()
