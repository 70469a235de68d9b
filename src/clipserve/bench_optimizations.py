"""`clipserve bench --optimizations`: what each opt-in speed-up buys, and what it costs in accuracy.

In this process (no server, no engine), for each model, one row per method:

* ``fp32``  - float32 weights, exact preprocessing: the reference (the service's CPU default);
* ``bf16``  - ``precision: bf16`` (on a CPU without bf16 kernels it is slow, or fails: the row
  then says why);
* ``int8``  - ``precision: int8``: float32 weights, Linear layers dynamically quantized
  (:mod:`clipserve.models.quantize`; on CUDA it falls back to fp16, which the dtype column shows);
* ``fast``  - float32 weights with ``preprocess: fast``: JPEGs decoded at the smallest DCT scale
  still at least the model's input size (``ImageLoader.load(..., draft=image_size)``);
* ``compile`` - float32 with ``runtime: compile`` (:mod:`clipserve.models.runtimes`): its load
  time includes compiling and warming every shape bucket;
* ``onnx``  - float32 with ``runtime: onnx``: its load time includes the export (into a fresh
  cache; a later load reads it from there) and the check against eager.

A runtime that falls back keeps its row, with the ``runtime`` column saying what ran (``eager``)
and the reason after the figures.

Columns: the weight dtype the backend reports, the runtime that ran, the load time, the weights'
memory (``BackendInfo.memory_bytes``), images/s and texts/s at batch 1 and at ``batch`` (images:
JPEG bytes of ``size``-pixel photos -> decode -> preprocess -> forward; texts: tokenize -> forward;
the median call of ``seconds`` of calls, after one warm-up call), and the deviation from ``fp32``
on ``photos`` real photos (scikit-image's, cropped and flipped, as JPEGs) and their captions:

* ``max|dS|`` - the largest change of a CLIP score, ``100 * cos`` before the clamp at 0, over every
  photo with every caption (an upper bound of the clamped score's change);
* ``img cos`` / ``txt cos`` - the smallest cosine between a photo's (a text's) embedding and the
  reference's;
* ``top-1`` - the fraction of photos whose zero-shot label (the best of ``len(LABELS)`` prompts
  ``"a photo of a <label>"``) is the reference's.

With random weights (``vit-b-32``, ``tiny``; drawn once and saved, so that every method loads the
same ones) the deviations measure numerical drift, not accuracy on a task: a trained model's may
differ.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, TypeVar

import torch

from clipserve.bench import bench_registry, jpeg_bytes, sample_images
from clipserve.config import MediaSettings
from clipserve.media import ImageLoader
from clipserve.model_specs import ModelSpec, Precision, Runtime
from clipserve.models.base import Backend
from clipserve.models.loader import load_backend, resolve_device, resolve_dtype

Preprocess = Literal["exact", "fast"]
T = TypeVar("T")

PHOTO_CAPTIONS = (
    "a photo of an astronaut",
    "a cat lying on a blanket",
    "a cup of coffee",
    "a rocket on the launch pad",
)
"""The caption of each of :func:`~clipserve.bench.sample_images`' photos, in their order."""
LABELS = (
    "astronaut",
    "cat",
    "cup of coffee",
    "rocket",
    "dog",
    "car",
    "mountain",
    "bowl of fruit",
    "beach",
    "city street",
)
"""The zero-shot labels each photo is classified among."""


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    precision: Precision
    preprocess: Preprocess
    runtime: Runtime = "eager"


METHODS = (
    Method("fp32", "fp32", "exact"),
    Method("bf16", "bf16", "exact"),
    Method("int8", "int8", "exact"),
    Method("fast", "fp32", "fast"),
    Method("compile", "fp32", "exact", "compile"),
    Method("onnx", "fp32", "exact", "onnx"),
)
"""The methods in the order they are measured; the first is the reference."""


@dataclass(frozen=True, slots=True)
class Deviation:
    """How far a method's outputs are from the reference's (see the module's docstring)."""

    max_score_delta: float
    min_image_cosine: float
    min_text_cosine: float
    top1_agreement: float


@dataclass(frozen=True, slots=True)
class Figures:
    """What one method measured on one model."""

    dtype: str
    """The weights' dtype as the backend reports it (``int8`` when quantized)."""
    runtime: Runtime
    """What ran the towers (``eager`` where the method's runtime fell back)."""
    runtime_fallback: str | None
    """Why it fell back, when it did."""
    load_s: float
    memory_mb: float
    """The weights' and buffers' memory (``BackendInfo.memory_bytes``)."""
    images_per_s: tuple[float, float]
    """At batch 1 and at the bench's batch size."""
    texts_per_s: tuple[float, float]
    deviation: Deviation


@dataclass(frozen=True, slots=True)
class OptimizationResult:
    """One row: a method on a model, with its ``figures``, or the ``error`` that stopped it."""

    model: str
    method: str
    figures: Figures | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Outputs:
    images: torch.Tensor
    """(photos, d) embeddings."""
    texts: torch.Tensor
    """(captions + labels, d) embeddings, the captions first."""


@dataclass(frozen=True, slots=True)
class _Inputs:
    jpegs: tuple[bytes, ...]
    texts: tuple[str, ...]
    """Captions then label prompts: the deviation's texts."""
    throughput_texts: tuple[str, ...]


def _inputs(photos: int, size: int) -> _Inputs:
    jpegs = [jpeg_bytes(image) for image in sample_images(photos, size)]
    prompts = tuple(f"a photo of a {label}" for label in LABELS)
    captions = (*PHOTO_CAPTIONS, *prompts)
    throughput = tuple(f"{text} #{i}" for i, text in enumerate(captions * 4))
    return _Inputs(tuple(jpegs), captions, throughput)


def _cycle(values: Sequence[T], call: int, size: int) -> list[T]:
    """The ``call``-th run of ``size`` values, round the sequence."""
    return [values[(call * size + i) % len(values)] for i in range(size)]


async def _pixels(
    loader: ImageLoader, backend: Backend, jpegs: Sequence[bytes], draft: int | None
) -> torch.Tensor:
    loaded = await asyncio.gather(
        *(loader.load(data, backend.preprocess, draft=draft) for data in jpegs)
    )
    return torch.stack([item.image for item in loaded])


async def _outputs(
    loader: ImageLoader, backend: Backend, inputs: _Inputs, draft: int | None, batch: int
) -> _Outputs:
    images = [
        backend.encode_images(await _pixels(loader, backend, inputs.jpegs[i : i + batch], draft))
        for i in range(0, len(inputs.jpegs), batch)
    ]
    texts = backend.encode_texts(backend.tokenize(inputs.texts))
    return _Outputs(torch.cat(images), texts)


def deviation(reference: _Outputs, outputs: _Outputs, captions: int) -> Deviation:
    """``outputs`` against ``reference``: the first ``captions`` texts are the photos' captions,
    the rest the zero-shot label prompts."""
    scores = 100 * outputs.images @ outputs.texts[:captions].T
    reference_scores = 100 * reference.images @ reference.texts[:captions].T
    top = (outputs.images @ outputs.texts[captions:].T).argmax(dim=-1)
    reference_top = (reference.images @ reference.texts[captions:].T).argmax(dim=-1)
    return Deviation(
        max_score_delta=float((scores - reference_scores).abs().max()),
        min_image_cosine=float((outputs.images * reference.images).sum(dim=-1).min()),
        min_text_cosine=float((outputs.texts * reference.texts).sum(dim=-1).min()),
        top1_agreement=float((top == reference_top).float().mean()),
    )


async def _rate(step: Callable[[int], Awaitable[None]], items: int, seconds: float) -> float:
    """Items per second of ``step`` (``items`` each call; the argument counts the calls): one
    warm-up call, then calls until ``seconds`` have passed (at least one); ``items`` over the
    median call's time, which other load on the machine moves less than the mean."""
    await step(0)
    started = time.perf_counter()
    durations: list[float] = []
    for call in itertools.count(1):
        begun = time.perf_counter()
        await step(call)
        durations.append(time.perf_counter() - begun)
        if time.perf_counter() - started >= seconds:
            break
    return items / statistics.median(durations)


async def _throughput(
    loader: ImageLoader,
    backend: Backend,
    inputs: _Inputs,
    draft: int | None,
    *,
    batch: int,
    seconds: float,
) -> tuple[tuple[float, float], tuple[float, float]]:
    async def images(size: int, call: int) -> None:
        pixels = await _pixels(loader, backend, _cycle(inputs.jpegs, call, size), draft)
        backend.encode_images(pixels)

    async def texts(size: int, call: int) -> None:
        backend.encode_texts(backend.tokenize(_cycle(inputs.throughput_texts, call, size)))

    image_rates = [await _rate(partial(images, n), n, seconds) for n in (1, batch)]
    text_rates = [await _rate(partial(texts, n), n, seconds) for n in (1, batch)]
    return (image_rates[0], image_rates[1]), (text_rates[0], text_rates[1])


async def _bench_model(
    model: str,
    spec: ModelSpec,
    inputs: _Inputs,
    *,
    device: str,
    seconds: float,
    batch: int,
    runtime_cache_dir: Path,
) -> list[OptimizationResult]:
    rows: list[OptimizationResult] = []
    reference: _Outputs | None = None
    async with ImageLoader(MediaSettings()) as loader:
        for method in METHODS:
            variant = spec.model_copy(
                update={
                    "precision": method.precision,
                    "preprocess": method.preprocess,
                    "runtime": method.runtime,
                }
            )
            try:
                started = time.perf_counter()
                backend = load_backend(
                    variant,
                    device=device,
                    dtype=resolve_dtype(device, method.precision, "fp16"),
                    runtime_cache_dir=runtime_cache_dir,
                )
                load_s = time.perf_counter() - started
                draft = backend.info.image_size if method.preprocess == "fast" else None
                try:
                    outputs = await _outputs(loader, backend, inputs, draft, batch)
                    image_rates, text_rates = await _throughput(
                        loader, backend, inputs, draft, batch=batch, seconds=seconds
                    )
                finally:
                    backend.close()
            except Exception as exc:
                if reference is None:  # the reference must run
                    raise
                rows.append(OptimizationResult(model, method.name, error=_describe(exc)))
                continue
            if reference is None:
                reference = outputs
            rows.append(
                OptimizationResult(
                    model,
                    method.name,
                    Figures(
                        dtype=backend.info.dtype,
                        runtime=backend.info.runtime.name,
                        runtime_fallback=backend.info.runtime.fallback,
                        load_s=load_s,
                        memory_mb=backend.info.memory_bytes / 2**20,
                        images_per_s=image_rates,
                        texts_per_s=text_rates,
                        deviation=deviation(reference, outputs, len(PHOTO_CAPTIONS)),
                    ),
                )
            )
    return rows


def with_fixed_weights(spec: ModelSpec, workdir: Path) -> ModelSpec:
    """``spec`` with its random weights (an open_clip architecture, ``pretrained: null``) drawn
    once and saved to a checkpoint in ``workdir``: each load of a random spec draws new ones, and
    every method must run the same weights. Other specs are returned as they are."""
    if (
        spec.backend != "open_clip"
        or spec.pretrained is not None
        or spec.model_name.startswith(("local-dir:", "hf-hub:"))
    ):
        return spec
    import open_clip
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(spec.model_name, pretrained=None)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    path = workdir / f"{spec.model_name}-random.safetensors"
    save_file(state, str(path))
    return spec.model_copy(update={"pretrained": str(path)})


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"


def run_optimizations(
    models: Sequence[str],
    *,
    device: str = "auto",
    seconds: float = 2.0,
    batch: int = 32,
    photos: int = 16,
    size: int = 1024,
) -> list[OptimizationResult]:
    """Measure every method of :data:`METHODS` on each of ``models`` (``tiny``, ``vit-b-32``;
    random weights, no download): one row per model and method, the reference first. Each
    throughput cell runs about ``seconds`` (after a warm-up call); ``photos`` JPEGs of ``size``
    pixels a side are the deviation's images and the throughput's inputs. A method that fails
    gives a row with its ``error``; the reference failing raises."""
    resolved = resolve_device(device)
    inputs = _inputs(photos, size)
    results: list[OptimizationResult] = []
    with tempfile.TemporaryDirectory(prefix="clipserve-bench-") as tmp:
        registry = bench_registry(models, Path(tmp))
        for model in models:
            spec = with_fixed_weights(ModelSpec.model_validate(registry[model]), Path(tmp))
            results += asyncio.run(
                _bench_model(
                    model,
                    spec,
                    inputs,
                    device=resolved,
                    seconds=seconds,
                    batch=batch,
                    runtime_cache_dir=Path(tmp) / "runtime-cache",
                )
            )
    return results


def format_optimizations(results: Sequence[OptimizationResult], batch: int = 32) -> list[str]:
    """The table of :func:`run_optimizations`' rows, one line each."""
    bs = f"b{batch}"
    lines = [
        f"{'model':<9} {'method':<7} {'dtype':<8} {'runtime':<7} {'load s':>6} {'MB':>7} "
        f"{'img/s b1':>8} {'img/s ' + bs:>9} {'txt/s b1':>8} {'txt/s ' + bs:>9} "
        f"{'max|dS|':>7} {'img cos':>7} {'txt cos':>7} {'top-1':>5}"
    ]
    for r in results:
        head = f"{r.model:<9} {r.method:<7} "
        f = r.figures
        if f is None:
            lines.append(f"{head}not run: {r.error}")
            continue
        d = f.deviation
        fallback = f"  (eager: {f.runtime_fallback})" if f.runtime_fallback else ""
        lines.append(
            f"{head}{f.dtype:<8} {f.runtime:<7} {f.load_s:>6.2f} {f.memory_mb:>7.1f} "
            f"{f.images_per_s[0]:>8.1f} {f.images_per_s[1]:>9.1f} "
            f"{f.texts_per_s[0]:>8.1f} {f.texts_per_s[1]:>9.1f} "
            f"{d.max_score_delta:>7.3f} {d.min_image_cosine:>7.4f} {d.min_text_cosine:>7.4f} "
            f"{d.top1_agreement:>5.2f}{fallback}"
        )
    return lines
