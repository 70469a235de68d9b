"""Captions per second: the raw BLIP model against the engine, at batch 1 and at bigger batches.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/caption_bench.py                # BLIP-base shapes
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/caption_bench.py --size tiny --quick   # smoke
    .venv/bin/python benchmarks/caption_bench.py --model Salesforce/blip-image-captioning-base

Without ``--model`` it builds a random BLIP with the shapes of blip-image-captioning-base (ViT-B/16
at 384 px, a 12-layer BERT decoder; :func:`clipserve.testing.tiny.build_tiny_blip`), so the
compute is a real BLIP's and the captions are noise. Photos come from ``skimage.data``.

It prints one markdown table, in one run:

* ``raw``: ``BlipForConditionalGeneration.generate`` on ready pixel tensors (no decode, no
  queue), greedy, ``--max-new-tokens``, at each batch size;
* ``engine``: ``Engine.caption`` on PIL images: one request of ``n`` images (the seed's "batch
  of 25"), and ``n`` concurrent one-image requests (the dynamic batcher groups them), with the
  ratio of its captions/s to the raw model's at the same batch size;
* the best batch (captions/s through the engine) against batch 1;
* the mean number of tokens generated per caption (a random model may stop early: compare rows
  of equal length only), and the seed's target beside the 25-image batch (< 15 s; set on a GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

SEED_TARGET_S = 15.0
"""Seed 001: a BLIP batch of 25 images in under 15 seconds."""


def _photos(n: int) -> list[Image.Image]:
    from skimage import data

    names = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "camera"]
    base = [Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB") for name in names]
    return [base[i % len(base)].copy() for i in range(n)]  # distinct: not deduplicated


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def _raw(
    model_dir: str, images: list[Image.Image], batches: list[int], args: Any
) -> dict[int, Any]:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(model_dir)
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    out: dict[int, Any] = {}
    for n in batches:
        pixels = processor(images=images[:n], return_tensors="pt")["pixel_values"]

        def run(pixels: torch.Tensor = pixels) -> torch.Tensor:
            with torch.inference_mode():
                generated: torch.Tensor = model.generate(
                    pixel_values=pixels, max_new_tokens=args.max_new_tokens, num_beams=1
                )
            return generated

        seconds, ids = _timed(run, args.repeats)
        tokens = float((ids[:, 1:] != processor.tokenizer.pad_token_id).sum()) / n
        out[n] = (seconds, tokens)
    return out


async def _engine(model_dir: str, images: list[Image.Image], batches: list[int], args: Any) -> Any:
    from clipserve.config import Settings
    from clipserve.engine.engine import Engine

    models = {"blip": {"model_name": model_dir, "backend": "hf", "task": "caption"}}
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "models.json"
        config.write_text(json.dumps(models))
        settings = Settings(
            config_path=config,
            config_reload_interval_s=0,
            batching={"max_batch_size": max(batches), "request_timeout": 3600},
            captions={"max_new_tokens": args.max_new_tokens},
        )
        async with Engine(settings) as engine:
            await engine.caption("blip", images[:1])  # load and warm
            out: dict[int, Any] = {}
            for n in batches:
                one: list[float] = []
                many: list[float] = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    await engine.caption("blip", images[:n])
                    one.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await asyncio.gather(*(engine.caption("blip", [im]) for im in images[:n]))
                    many.append(time.perf_counter() - started)
                out[n] = (statistics.median(one), statistics.median(many))
            return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="A BLIP hub id or folder (default: random BLIP-base).")
    parser.add_argument("--size", choices=["tiny", "base"], default="base")
    parser.add_argument("--batches", default="1,4,8,25", help="Batch sizes, comma-separated.")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="Batches 1,4 and one repeat.")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.repeats = "1,4", 1
    batches = sorted({int(b) for b in args.batches.split(",")})
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = args.model
        if model_dir is None:
            from clipserve.testing.tiny import build_tiny_blip

            model_dir = str(build_tiny_blip(Path(scratch) / "blip", size=args.size))
        images = _photos(max(batches))
        raw = _raw(model_dir, images, batches, args)
        served = asyncio.run(_engine(model_dir, images, batches, args))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"\nBLIP ({args.model or 'random ' + args.size}), {device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, greedy, max_new_tokens "
        f"{args.max_new_tokens}, median of {args.repeats}\n"
    )
    print(
        "| batch | tokens/caption | raw captions/s | engine, one request: captions/s (s) "
        "| engine, n concurrent requests: captions/s | engine/raw | seed target |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in batches:
        raw_s, tokens = raw[n]
        one_s, many_s = served[n]
        target = (
            f"< {SEED_TARGET_S:g} s: {'met' if one_s < SEED_TARGET_S else 'missed'}"
            if n == 25
            else ""
        )
        print(
            f"| {n} | {tokens:.1f} | {n / raw_s:.2f} | {n / one_s:.2f} ({one_s:.2f} s) "
            f"| {n / many_s:.2f} | {raw_s / one_s:.2f} | {target} |"
        )
    best = max(batches, key=lambda n: n / served[n][0])
    rate, single = best / served[best][0], 1 / served[batches[0]][0]
    print(
        f"\nbest: batch {best}, {rate:.2f} captions/s through the engine "
        f"({rate / single:.1f}x batch {batches[0]}'s {single:.2f})"
    )


if __name__ == "__main__":
    main()
