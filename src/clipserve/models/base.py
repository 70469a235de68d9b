"""The one small interface every model backend implements.

A backend owns a loaded model on one device. The engine calls it from worker threads:

* ``preprocess`` and ``tokenize`` are CPU work (any thread, concurrently);
* ``encode_images`` and ``encode_texts`` run on the device's single executor thread, one batch at a
time.

Encoders return L2-normalised float32 CPU tensors of shape ``(n, embed_dim)``.

Generative image-to-text models (captioners, visual question answering) are
:class:`CaptionBackend` instances: they satisfy the same protocol (so the registry, the executors
and the batcher treat them like any model) but their modalities are ``caption`` and/or
``answer``, their encoders refuse, and :meth:`CaptionBackend.generate` turns preprocessed
images (with a prompt or a question each) into text, on the device thread, one batch at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Literal, Protocol, get_args, runtime_checkable

import numpy as np
import torch
from numpy.typing import ArrayLike
from PIL import Image

from clipserve.model_specs import Runtime

Modality = Literal["text", "image", "caption", "answer"]
"""What a model's queues do: encode ``text`` or ``image`` inputs (embedding models), or generate a
``caption`` of an image or an ``answer`` to a question about one (:class:`CaptionBackend`)."""
GenerativeTask = Literal["caption", "answer"]


@dataclass(frozen=True, slots=True)
class TokenizedTexts:
    """Texts tokenized for one forward pass. ``inputs`` are backend-specific CPU tensors."""

    inputs: Mapping[str, torch.Tensor]
    token_counts: tuple[int, ...]
    """Tokens per text before truncation, special tokens included."""
    truncated: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.token_counts)


_RUNTIMES: Mapping[str, Runtime] = MappingProxyType({name: name for name in get_args(Runtime)})


@dataclass(frozen=True, slots=True)
class BackendInfo:
    backend: str
    """'open_clip', 'hf', 'sentence-transformers' or 'openai-vision'."""
    architecture: str
    """'clip', 'siglip', 'text', or a generative model's ('blip', 'blip-2', 'remote'...)."""
    embed_dim: int
    context_length: int
    modalities: frozenset[Modality]
    device: str
    dtype: str
    image_size: int | None = None
    parameter_count: int = 0
    memory_bytes: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def runtime(self) -> RuntimeInUse:
        """What runs the encoders, as :mod:`clipserve.models.runtimes` left it in ``extra``
        (``eager`` for a backend no runtime touched)."""
        towers = self.extra.get("runtime_towers", "")
        load_s = self.extra.get("runtime_load_s")
        return RuntimeInUse(
            name=_RUNTIMES.get(self.extra.get("runtime", "eager"), "eager"),
            towers=tuple(towers.split(",")) if towers else (),
            load_s=float(load_s) if load_s is not None else None,
            fallback=self.extra.get("runtime_fallback"),
        )


@dataclass(frozen=True, slots=True)
class RuntimeInUse:
    name: Runtime
    """``eager``, ``compile`` or ``onnx``."""
    towers: tuple[str, ...]
    """The towers the runtime took (``image``, ``text``); the others run eager."""
    load_s: float | None
    """Compile or export (or cache read) and check time at load."""
    fallback: str | None
    """Why a tower stayed eager, when one did."""


@runtime_checkable
class Backend(Protocol):
    @property
    def info(self) -> BackendInfo: ...

    @property
    def logit_scale(self) -> float:
        """Multiplier of cosine similarity in logits (already exponentiated)."""
        ...

    @property
    def logit_bias(self) -> float | None:
        """SigLIP's sigmoid bias; None for softmax (CLIP) models."""
        ...

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> a CPU pixel tensor (C, H, W) ready to stack."""
        ...

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        """Texts -> model inputs, truncated to the context length (never raising on long text)."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, C, H, W) -> (n, d) L2-normalised float32 on the CPU."""
        ...

    def encode_texts(self, tokens: TokenizedTexts) -> torch.Tensor:
        """Tokenized texts -> (n, d) L2-normalised float32 on the CPU."""
        ...

    def close(self) -> None:
        """Release weights (and device memory)."""
        ...


# --- the encoders as modules (what the `compile` and `onnx` runtimes work on) ---------------------

TowerName = Literal["image", "text"]
TowerForward = Callable[..., torch.Tensor]
"""A tower's forward: its inputs (CPU or device tensors, in :attr:`Tower.input_names` order) ->
``(n, d)`` features, not normalised."""


@dataclass(frozen=True, slots=True)
class Tower:
    """One encoder of a backend as a ``torch.nn.Module`` that :mod:`clipserve.models.runtimes`
    compiles or exports: ``module(*inputs)`` -> ``(n, d)`` features, not normalised."""

    module: torch.nn.Module
    input_names: tuple[str, ...]
    length_inputs: frozenset[str] = frozenset()
    """The inputs whose dim 1 is a token count that varies between batches (dim 0, the batch,
    always varies)."""
    max_length: int = 1
    """The largest such token count (the context length)."""
    examples: tuple[tuple[torch.Tensor, ...], ...] = ()
    """Inputs of every shape class the tower meets (batch 1, several items, short and long texts),
    built by the backend's own preprocessing and tokenizer: the warm-up and the check against
    eager run on these."""


def example_texts(context_length: int) -> tuple[tuple[str, ...], ...]:
    """Batches of texts that reach every shape class of a text tower: one short text; two of
    different lengths; three, one of them past the context (``context_length`` tokens)."""
    long = " ".join(["word"] * (context_length + 8))
    return (
        ("a photo of a cat",),
        ("a dog", "two dogs playing in the snow beside a red wooden fence"),
        ("a", "a photo of a bird on a branch", long),
    )


@runtime_checkable
class TowerBackend(Backend, Protocol):
    """A :class:`Backend` whose encoders are :class:`Tower` modules that another runtime may take
    over: ``encode_images`` / ``encode_texts`` call the forward of :meth:`use_tower` (the module
    itself until then) and keep their own input preparation and normalisation."""

    def towers(self) -> Mapping[TowerName, Tower]:
        """The towers a runtime may replace (empty when none: SigLIP 2 NaFlex...)."""
        ...

    def use_tower(self, name: TowerName, forward: TowerForward) -> None:
        """Run tower ``name`` through ``forward`` from now on (same inputs, same outputs)."""
        ...

    def note_runtime(self, fields: Mapping[str, str]) -> None:
        """Add ``fields`` (the runtime in use, its load time, why it fell back) to
        ``info.extra``."""
        ...


def clip_scores(image_embeddings: ArrayLike, text_embeddings: ArrayLike) -> np.ndarray:
    """Pairwise CLIP score of row i with row i: ``max(100 * cos, 0)`` (inputs L2-normalised,
    ``(n, d)``). numpy without BLAS, so that it adds no thread pool of its own (see
    :mod:`clipserve.engine.executor`)."""
    image = np.asarray(image_embeddings, dtype=np.float32)
    text = np.asarray(text_embeddings, dtype=np.float32)
    cos: np.ndarray = np.einsum("ij,ij->i", image, text)
    return np.maximum(np.float32(100.0) * cos, np.float32(0.0))


def sigmoid_probabilities(cos: torch.Tensor, logit_scale: float, logit_bias: float) -> torch.Tensor:
    """SigLIP's match probability: ``sigmoid(logit_scale * cos + logit_bias)``."""
    return torch.sigmoid(cos * logit_scale + logit_bias)


# --- generative models (captions, visual question answering) -------------------------------------


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """How to decode: greedy (``num_beams == 1``) or beam search, and the generated length."""

    max_new_tokens: int = 30
    num_beams: int = 1


@dataclass(frozen=True, slots=True)
class CaptionInput:
    """One image to describe or ask about, preprocessed by the backend's ``preprocess``."""

    pixels: torch.Tensor
    task: GenerativeTask = "caption"
    prompt: str | None = None
    """``caption``: an optional text the caption continues ("a photography of"); ``answer``: the
    question (required)."""
    options: GenerationOptions = GenerationOptions()

    @property
    def group(self) -> tuple[GenerativeTask, str | None, GenerationOptions]:
        """Inputs with equal groups run as one ``generate`` call (same prompt: no padding, so a
        batch decodes exactly what each input would alone)."""
        return (self.task, self.prompt, self.options)


@dataclass(frozen=True, slots=True)
class FailedGeneration:
    """One input's generation failed (a remote call refused, a prompt the model cannot take) while
    the rest of its batch stands: ``error`` (a ClipServeError) is what that input is answered."""

    error: Exception


class CaptionBackend(ABC):
    """A generative image-to-text model behind the :class:`Backend` protocol.

    ``info.modalities`` says what it does (``caption``, ``answer``); the embedding half of the
    protocol refuses. ``generate`` gets a batch of inputs, runs each :attr:`CaptionInput.group`
    as one call and returns one text (or a :class:`FailedGeneration`) per input, in order."""

    local: ClassVar[bool] = True
    """Whether ``generate`` runs a model here (False: a remote service, which warm-up and batch
    size probes leave alone)."""

    @property
    @abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    def logit_scale(self) -> float:
        raise TypeError(f"{type(self).__name__} is a generative model: it has no logit scale")

    @property
    def logit_bias(self) -> float | None:
        return None

    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB PIL image -> the tensor ``generate`` takes for it."""

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        raise TypeError(f"{type(self).__name__} is a generative model: it does not embed texts")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a generative model: it does not embed images")

    def encode_texts(self, tokens: TokenizedTexts) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a generative model: it does not embed texts")

    @abstractmethod
    def generate(self, inputs: Sequence[CaptionInput]) -> list[str | FailedGeneration]:
        """One text per input, in order; an input that failed alone is its ``FailedGeneration``.
        Raising fails the whole batch (the batcher then splits it to isolate the cause)."""

    @abstractmethod
    def close(self) -> None: ...
