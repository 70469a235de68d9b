"""A deterministic fake backend for engine and API tests (no torch model, no weights).

Text embeddings are seeded by the text; image embeddings are a fixed random projection of a small
thumbnail, so equal images give equal vectors and different photos give different ones. It records
every forward pass so tests can assert batching and deduplication.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from clipserve.model_specs import ModelSpec
from clipserve.models.base import (
    Backend,
    BackendInfo,
    CaptionBackend,
    CaptionInput,
    FailedGeneration,
    Modality,
    TokenizedTexts,
)

_THUMB = 8


def _seed(text: str) -> int:
    return int(hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()[:8], 16)


@dataclass
class FakeBackend:
    """Implements :class:`clipserve.models.base.Backend`.

    ``fail_texts``: texts whose encoding raises RuntimeError (a model failure).
    ``before_forward``: called on the device thread before each forward pass (e.g. to block on an
    event, letting a test hold a batch in flight without sleeping).
    """

    embed_dim: int = 16
    context_length: int = 8
    modalities: frozenset[Modality] = frozenset({"text", "image"})
    device: str = "cpu"
    fail_texts: frozenset[str] = frozenset()
    before_forward: Callable[[str, int], None] | None = None
    seed: int = 0
    logit_bias_value: float | None = None
    forward_calls: list[tuple[str, int]] = field(default_factory=list)
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self._projection = torch.from_numpy(
            rng.standard_normal((3 * _THUMB * _THUMB, self.embed_dim)).astype(np.float32)
        )

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            backend="fake",
            architecture="siglip" if self.logit_bias_value is not None else "clip",
            embed_dim=self.embed_dim,
            context_length=self.context_length,
            modalities=self.modalities,
            device=self.device,
            dtype="float32",
            image_size=_THUMB if "image" in self.modalities else None,
            parameter_count=int(self._projection.numel()),
            memory_bytes=int(self._projection.numel() * 4),
        )

    @property
    def logit_scale(self) -> float:
        return 100.0

    @property
    def logit_bias(self) -> float | None:
        return self.logit_bias_value

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        thumb = image.convert("RGB").resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
        array = np.asarray(thumb, dtype=np.float32) / 255.0 - 0.5
        return torch.from_numpy(array.transpose(2, 0, 1).copy())

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        counts = tuple(len(t.split()) + 2 for t in texts)
        seeds = torch.tensor([_seed(t) for t in texts], dtype=torch.int64)
        return TokenizedTexts(
            inputs={"seeds": seeds},
            token_counts=counts,
            truncated=tuple(c > self.context_length for c in counts),
        )

    def _record(self, modality: str, n: int) -> None:
        if self.before_forward is not None:
            self.before_forward(modality, n)
        with self._lock:
            self.forward_calls.append((modality, n))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self._record("image", len(pixels))
        vectors = pixels.reshape(len(pixels), -1).float() @ self._projection
        return torch.nn.functional.normalize(vectors, dim=-1)

    def encode_texts(self, tokens: TokenizedTexts) -> torch.Tensor:
        seeds = tokens.inputs["seeds"].tolist()
        if {_seed(t) for t in self.fail_texts}.intersection(seeds):
            raise RuntimeError("simulated model failure")
        self._record("text", len(tokens))
        rows = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(int(seed))
            rows.append(torch.randn(self.embed_dim, generator=generator))
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    def close(self) -> None:
        self.closed = True

    def forwards(self, modality: str) -> list[int]:
        """Sizes of the forward passes run so far for one modality."""
        with self._lock:
            return [n for m, n in self.forward_calls if m == modality]


class FakeCaptionBackend(CaptionBackend):
    """A deterministic fake generative model (captions and answers): each text names the
    image's mean colour, so equal images give equal captions; records every batch's size."""

    def __init__(
        self,
        device: str = "cpu",
        *,
        fail_prompts: frozenset[str] = frozenset(),
        before_generate: Callable[[int], None] | None = None,
    ) -> None:
        self._device = device
        self.fail_prompts = fail_prompts
        """Prompts whose batch raises RuntimeError (a model failure the batcher must isolate)."""
        self.before_generate = before_generate
        """Called on the device thread before each batch, with its size (to hold it)."""
        self.batches: list[int] = []
        self.closed = False

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            backend="fake",
            architecture="fake-caption",
            embed_dim=0,
            context_length=64,
            modalities=frozenset({"caption", "answer"}),
            device=self._device,
            dtype="float32",
            image_size=_THUMB,
            memory_bytes=1024,
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        thumb = image.convert("RGB").resize((_THUMB, _THUMB), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(thumb, dtype=np.float32).transpose(2, 0, 1).copy())

    def generate(self, inputs: Sequence[CaptionInput]) -> list[str | FailedGeneration]:
        if self.before_generate is not None:
            self.before_generate(len(inputs))
        if any(item.prompt in self.fail_prompts for item in inputs):
            raise RuntimeError("simulated model failure")
        self.batches.append(len(inputs))
        out: list[str | FailedGeneration] = []
        for item in inputs:
            r, g, b = (int(v) for v in item.pixels.mean(dim=(1, 2)).tolist())
            colour = f"a picture of colour ({r}, {g}, {b})"
            if item.task == "answer":
                out.append(f"{colour}, asked {item.prompt}")
            else:
                out.append(f"{item.prompt} {colour}" if item.prompt else colour)
        return out

    def close(self) -> None:
        self.closed = True


class DeviceGate:
    """A ``before_forward`` hook that holds forward passes on the device thread while closed, so a
    test can keep a batch in flight (and requests queued behind it) without sleeping."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._open = threading.Event()
        self._open.set()
        self._entered = threading.Event()
        self._timeout_s = timeout_s
        self.passes = 0

    def close(self) -> None:
        self._entered.clear()
        self._open.clear()

    def open(self) -> None:
        self._open.set()

    def __call__(self, modality: str, n: int) -> None:
        self.passes += 1
        self._entered.set()
        if not self._open.wait(self._timeout_s):
            raise RuntimeError("DeviceGate was never opened")

    async def entered(self) -> None:
        """Wait until a forward pass reached the (closed) gate."""
        if not await asyncio.to_thread(self._entered.wait, self._timeout_s):
            raise TimeoutError("no forward pass reached the gate")


class FakeLoader:
    """A backend loader for tests: specs whose ``model_name`` starts with ``fake`` get a
    :class:`FakeBackend` (``fake-text`` is text-only, ``fake-broken`` fails to load; ``task:
    caption`` specs a :class:`FakeCaptionBackend`); other specs go to ``fallback`` (e.g. the
    real :func:`clipserve.models.loader.load_backend`), or fail."""

    def __init__(
        self,
        fallback: Callable[..., Backend] | None = None,
        *,
        before_load: Callable[[ModelSpec], None] | None = None,
        caption: FakeCaptionBackend | None = None,
        **backend_options: object,
    ) -> None:
        self.fallback = fallback
        self.caption = caption
        """What ``task: caption`` specs load (default: a new :class:`FakeCaptionBackend`)."""
        self.before_load = before_load
        """Called on the loading thread first (e.g. to hold a load on an event)."""
        self.backend_options = backend_options
        self.loaded: dict[str, FakeBackend] = {}
        self.load_count = 0

    def __call__(self, spec: ModelSpec, *, device: str, dtype: torch.dtype) -> Backend:
        from clipserve.errors import ModelLoadError

        if not spec.model_name.startswith("fake"):
            if self.fallback is None:
                raise ModelLoadError(f"no weights for '{spec.model_name}' in this test")
            return self.fallback(spec, device=device, dtype=dtype)
        if self.before_load is not None:
            self.before_load(spec)
        self.load_count += 1
        if spec.model_name == "fake-broken":
            raise ModelLoadError("simulated load failure: weights not found")
        if spec.task == "caption":
            return self.caption or FakeCaptionBackend()
        modalities: frozenset[Modality] = (
            frozenset({"text"}) if spec.model_name == "fake-text" else frozenset({"text", "image"})
        )
        backend = FakeBackend(modalities=modalities, **self.backend_options)  # type: ignore[arg-type]
        self.loaded[spec.model_name] = backend
        return backend
