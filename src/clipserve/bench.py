"""`clipserve bench`: single-pair vs batched evaluation throughput, through the real engine.

For each model it scores the same N distinct image-text pairs three ways and prints pairs/s:

* ``raw``    - the backend alone: preprocess + tokenize + encode in batches, no engine (the floor);
* ``single`` - N sequential ``Engine.evaluate([pair])`` calls (one forward pass per pair, modality);
* ``batch``  - one ``Engine.evaluate(pairs, batch_size=B)`` call.

It reports ``batch / single`` (what batching buys) and ``raw / batch`` (what the engine costs).
Models: ``tiny`` (a random 2-layer open_clip model built on the fly) and ``vit-b-32`` (open_clip
ViT-B-32 with random weights: real architecture and cost, no download).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from clipserve.config import Settings
from clipserve.engine.engine import Engine, EvalItem
from clipserve.models.base import Backend

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


@dataclass(frozen=True, slots=True)
class BenchResult:
    model: str
    pairs: int
    batch_size: int
    raw_pairs_per_s: float
    single_pairs_per_s: float
    batch_pairs_per_s: float

    @property
    def batching_speedup(self) -> float:
        return self.batch_pairs_per_s / self.single_pairs_per_s

    @property
    def engine_overhead(self) -> float:
        """Fraction of batch time spent outside the raw model work."""
        return 1.0 - self.batch_pairs_per_s / self.raw_pairs_per_s


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


def sample_pairs(n: int) -> list[tuple[Image.Image, str]]:
    images = sample_images(n)
    return [(img, f"{_CAPTIONS[i % len(_CAPTIONS)]} #{i}") for i, img in enumerate(images)]


def _raw_pass(backend: Backend, pairs: Sequence[tuple[Image.Image, str]], batch_size: int) -> None:
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        pixels = torch.stack([backend.preprocess(img) for img, _ in chunk])
        backend.encode_images(pixels)
        backend.encode_texts(backend.tokenize([text for _, text in chunk]))


async def bench_model(
    name: str, settings: Settings, pairs: Sequence[tuple[Image.Image, str]], batch_size: int
) -> BenchResult:
    async with Engine(settings) as engine:
        handle = await engine.registry.get(name)
        # Warm-up: first passes allocate buffers and pick kernels.
        await engine.evaluate([EvalItem(pairs[0][0], "warm up", name)])
        _raw_pass(handle.backend, pairs[: min(len(pairs), batch_size)], batch_size)

        started = time.perf_counter()
        await asyncio.to_thread(_raw_pass, handle.backend, pairs, batch_size)
        raw = time.perf_counter() - started

        items = [EvalItem(img, text, name) for img, text in pairs]
        started = time.perf_counter()
        for item in items:
            (result,) = await engine.evaluate([item])
            assert result.error is None, result.error
        single = time.perf_counter() - started

        started = time.perf_counter()
        results = await engine.evaluate(items, batch_size=batch_size)
        batch = time.perf_counter() - started
        assert all(r.error is None for r in results)
    n = len(pairs)
    return BenchResult(name, n, batch_size, n / raw, n / single, n / batch)


def bench_registry(models: Sequence[str], workdir: Path) -> dict[str, dict[str, object]]:
    from clipserve.testing.tiny import build_tiny_open_clip

    entries: dict[str, dict[str, object]] = {}
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


def run(models: Sequence[str], *, pairs: int, batch_size: int, device: str) -> list[BenchResult]:
    with tempfile.TemporaryDirectory(prefix="clipserve-bench-") as tmp:
        workdir = Path(tmp)
        config = workdir / "models.json"
        config.write_text(json.dumps(bench_registry(models, workdir)))
        settings = Settings(config_path=config, config_reload_interval_s=0, device=device)
        samples = sample_pairs(pairs)
        return [asyncio.run(bench_model(m, settings, samples, batch_size)) for m in models]


def format_results(results: Sequence[BenchResult]) -> list[str]:
    lines = [
        f"{'model':<10} {'pairs':>5} {'bs':>4} {'raw p/s':>9} {'single p/s':>11} "
        f"{'batch p/s':>10} {'batch/single':>13} {'overhead':>9}"
    ]
    for r in results:
        lines.append(
            f"{r.model:<10} {r.pairs:>5} {r.batch_size:>4} {r.raw_pairs_per_s:>9.1f} "
            f"{r.single_pairs_per_s:>11.1f} {r.batch_pairs_per_s:>10.1f} "
            f"{r.batching_speedup:>12.2f}x {r.engine_overhead:>8.1%}"
        )
    if results:
        mean = statistics.fmean(r.batching_speedup for r in results)
        lines.append(f"mean batching speed-up: {mean:.2f}x")
    return lines
