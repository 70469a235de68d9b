"""The one small interface every model backend implements.

A backend owns a loaded model on one device. The engine calls it from worker threads:

* ``preprocess`` and ``tokenize`` are CPU work (any thread, concurrently);
* ``encode_images`` and ``encode_texts`` run on the device's single executor thread, one batch at a
time.

Encoders return L2-normalised float32 CPU tensors of shape ``(n, embed_dim)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import ArrayLike
from PIL import Image

Modality = Literal["text", "image"]


@dataclass(frozen=True, slots=True)
class TokenizedTexts:
    """Texts tokenized for one forward pass. ``inputs`` are backend-specific CPU tensors."""

    inputs: Mapping[str, torch.Tensor]
    token_counts: tuple[int, ...]
    """Tokens per text before truncation, special tokens included."""
    truncated: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.token_counts)


@dataclass(frozen=True, slots=True)
class BackendInfo:
    backend: str
    """'open_clip', 'hf' or 'sentence-transformers'."""
    architecture: str
    """'clip', 'siglip' or 'text'."""
    embed_dim: int
    context_length: int
    modalities: frozenset[Modality]
    device: str
    dtype: str
    image_size: int | None = None
    parameter_count: int = 0
    memory_bytes: int = 0
    extra: Mapping[str, str] = field(default_factory=dict)


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
