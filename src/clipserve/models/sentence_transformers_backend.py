"""Text-only sentence-transformers models behind the ``Backend`` protocol.

Images are refused with :class:`~clipserve.errors.UnsupportedModalityError`. Texts longer than the
model's ``max_seq_length`` are truncated (and reported as such).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.nn.functional import normalize

from clipserve.errors import UnsupportedModalityError
from clipserve.models.base import BackendInfo, Modality, TokenizedTexts
from clipserve.models.loader import dtype_name, module_footprint
from clipserve.models.quantize import (
    compute_dtype,
    is_int8,
    quantization_info,
    quantize_linear_layers,
)
from clipserve.models.slots import ModelSlot

_MODALITIES: frozenset[Modality] = frozenset({"text"})
TEXT_LOGIT_SCALE = 20.0
"""Cosine multiplier reported as ``logit_scale``: sentence-transformers models have no learned
temperature; 20 is the scale of the MultipleNegativesRankingLoss most of them are trained with."""


class SentenceTransformersBackend(ModelSlot):
    """A sentence-transformers text model on one device. Build it with :meth:`load`."""

    def __init__(self, model: Any, *, device: str, dtype: torch.dtype, name: str) -> None:
        self._model: Any = model.eval()
        self._device = torch.device(device)
        self._dtype = compute_dtype(dtype)
        self._name = name
        self._tokenizer_lock = threading.Lock()
        self._context_length = int(model.max_seq_length)
        get_dim = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:
            with torch.inference_mode():
                dim = int(self._forward(self._features(["a"])).shape[-1])
        params, memory = module_footprint(model)
        self._info = BackendInfo(
            backend="sentence-transformers",
            architecture="text",
            embed_dim=int(dim),
            context_length=self._context_length,
            modalities=_MODALITIES,
            device=str(self._device),
            dtype=dtype_name(dtype),
            image_size=None,
            parameter_count=params,
            memory_bytes=memory,
            extra={
                "model_name": name,
                **quantization_info(dtype),
            },
        )

    @classmethod
    def load(
        cls, model_name: str, *, device: str, dtype: torch.dtype
    ) -> SentenceTransformersBackend:
        """Load a sentence-transformers model (Hub id or directory) on ``device`` in ``dtype``;
        :data:`~clipserve.models.quantize.INT8` keeps the float32 weights and quantizes the
        Linear layers (CPU only: the loader's ``resolve_dtype`` sees to that).

        Library errors propagate unchanged (the loader explains them).
        """
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(model_name, device=device)
        if is_int8(dtype):
            quantize_linear_layers(model.eval())
        elif dtype != torch.float32:
            model.to(dtype=dtype)
        return cls(model, device=device, dtype=dtype, name=model_name)

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def logit_scale(self) -> float:
        return TEXT_LOGIT_SCALE

    @property
    def logit_bias(self) -> float | None:
        return None

    def _refuse_images(self) -> UnsupportedModalityError:
        return UnsupportedModalityError(
            f"model '{self._name}' is a text-only sentence-transformers model; it cannot embed "
            "images (use a CLIP or SigLIP model for images)",
            detail={"model_name": self._name, "modalities": ["text"]},
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise self._refuse_images()

    def _features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        model = self._live_model()
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        features = preprocess(texts)
        return {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}

    def _forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.to(self._device) for k, v in features.items()}
        embedding: torch.Tensor = self._live_model()(inputs)["sentence_embedding"]
        return embedding

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        texts = list(texts)
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.long)
            return TokenizedTexts(inputs={"input_ids": empty}, token_counts=(), truncated=())
        with self._tokenizer_lock:  # fast tokenizers keep truncation/padding state per call
            features = self._features(texts)
            full = self._live_model().tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        counts = tuple(len(ids) for ids in full)
        return TokenizedTexts(
            inputs=features,
            token_counts=counts,
            truncated=tuple(count > self._context_length for count in counts),
        )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise self._refuse_images()

    def encode_texts(self, tokens: TokenizedTexts) -> torch.Tensor:
        if len(tokens) == 0:
            return torch.zeros((0, self._info.embed_dim))
        with torch.inference_mode():
            return normalize(self._forward(dict(tokens.inputs)).float(), dim=-1).cpu()
