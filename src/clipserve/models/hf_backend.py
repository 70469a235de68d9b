"""transformers ``CLIPModel`` and ``SiglipModel`` behind the :class:`~clipserve.models.base.Backend`
protocol, loaded from a Hub id or a local directory with their own processor.

transformers 5 notes: ``get_image_features``/``get_text_features`` return a ``ModelOutput`` whose
``pooler_output`` is the projected embedding (older versions return the tensor itself; both work).
SigLIP text must be padded to ``max_length`` (the model pools the last position) and is encoded
without an attention mask, as SigLIP was trained (pad == eos, no masking).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torch.nn.functional import normalize

from clipserve.errors import ModelLoadError
from clipserve.models.base import BackendInfo, Modality, TokenizedTexts
from clipserve.models.loader import dtype_name, module_footprint, release_device_memory

HfArchitecture = Literal["clip", "siglip"]
_MODALITIES: frozenset[Modality] = frozenset({"text", "image"})


def _embedding(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_*_features`` (a ModelOutput in transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"unexpected output of get_*_features: {type(output).__name__}")
    return pooled


class HfClipBackend:
    """A transformers CLIP or SigLIP model on one device. Build it with :meth:`load`."""

    def __init__(
        self,
        model: Any,
        image_processor: Any,
        tokenizer: Any,
        *,
        architecture: HfArchitecture,
        device: str,
        dtype: torch.dtype,
        name: str,
    ) -> None:
        self._model: Any = model.eval()
        self._image_processor = image_processor
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._architecture: HfArchitecture = architecture
        self._device = torch.device(device)
        self._dtype = dtype
        config = model.config
        self._context_length = int(config.text_config.max_position_embeddings)
        self._logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        bias = getattr(model, "logit_bias", None) if architecture == "siglip" else None
        self._logit_bias = None if bias is None else float(bias.detach().float().reshape(-1)[0])
        if architecture == "clip":
            embed_dim = int(config.projection_dim)
        else:
            embed_dim = int(config.vision_config.hidden_size)
        params, memory = module_footprint(model)
        self._info = BackendInfo(
            backend="hf",
            architecture=architecture,
            embed_dim=embed_dim,
            context_length=self._context_length,
            modalities=_MODALITIES,
            device=str(self._device),
            dtype=dtype_name(dtype),
            image_size=int(config.vision_config.image_size),
            parameter_count=params,
            memory_bytes=memory,
            extra={"model_name": name, "model_type": str(config.model_type)},
        )

    @classmethod
    def load(cls, model_name: str, *, device: str, dtype: torch.dtype) -> HfClipBackend:
        """Load a CLIP or SigLIP model, its image processor and tokenizer from ``model_name``
        (Hub id or directory). The architecture comes from the config's ``model_type``. Library
        errors propagate (the loader explains them); unsupported model types raise
        ``ModelLoadError``."""
        from transformers import AutoConfig, AutoProcessor, CLIPModel, SiglipModel

        config = AutoConfig.from_pretrained(model_name)
        model_type = str(getattr(config, "model_type", ""))
        architecture: HfArchitecture
        if model_type == "clip":
            architecture, model_cls = "clip", CLIPModel
        elif model_type == "siglip":
            architecture, model_cls = "siglip", SiglipModel
        elif model_type == "siglip2":
            raise ModelLoadError(
                f"'{model_name}' is a SigLIP 2 model, which the hf backend does not support yet "
                "(its NaFlex preprocessing yields patch sequences, not fixed-size images); "
                "use a SigLIP 2 model through open_clip ('hf-hub:timm/...') instead"
            )
        else:
            raise ModelLoadError(
                f"'{model_name}' has model_type '{model_type}'; the hf backend supports 'clip' and "
                "'siglip' (use backend 'sentence-transformers' for text-only models)"
            )
        model = model_cls.from_pretrained(model_name, dtype=dtype)
        model.to(device=device, dtype=dtype)  # transformers < 4.56 ignores `dtype=`
        processor = AutoProcessor.from_pretrained(model_name)
        image_processor = getattr(processor, "image_processor", None)
        tokenizer = getattr(processor, "tokenizer", None)
        if image_processor is None or tokenizer is None:
            raise ModelLoadError(
                f"'{model_name}' has no complete processor (image processor and tokenizer)"
            )
        return cls(
            model,
            image_processor,
            tokenizer,
            architecture=architecture,
            device=device,
            dtype=dtype,
            name=model_name,
        )

    @property
    def info(self) -> BackendInfo:
        return self._info

    @property
    def logit_scale(self) -> float:
        return self._logit_scale

    @property
    def logit_bias(self) -> float | None:
        return self._logit_bias

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        rgb = image.convert("RGB") if image.mode != "RGB" else image
        pixels: torch.Tensor = self._image_processor(images=rgb, return_tensors="pt")[
            "pixel_values"
        ]
        return pixels[0].float()

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        texts = list(texts)
        if not texts:
            empty = torch.zeros((0, self._context_length), dtype=torch.long)
            return TokenizedTexts(inputs={"input_ids": empty}, token_counts=(), truncated=())
        padding = "max_length" if self._architecture == "siglip" else "longest"
        with self._tokenizer_lock:  # fast tokenizers keep truncation/padding state per call
            encoded = self._tokenizer(
                texts,
                padding=padding,
                truncation=True,
                max_length=self._context_length,
                return_tensors="pt",
            )
            full = self._tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        counts = tuple(len(ids) for ids in full)
        keys = ("input_ids",) if self._architecture == "siglip" else ("input_ids", "attention_mask")
        inputs = {k: encoded[k] for k in keys if k in encoded}
        return TokenizedTexts(
            inputs=inputs,
            token_counts=counts,
            truncated=tuple(count > self._context_length for count in counts),
        )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] == 0:
            return torch.zeros((0, self._info.embed_dim))
        with torch.inference_mode():
            output = self._live_model().get_image_features(
                pixel_values=pixels.to(self._device, self._dtype)
            )
            return normalize(_embedding(output).float(), dim=-1).cpu()

    def encode_texts(self, tokens: TokenizedTexts) -> torch.Tensor:
        if len(tokens) == 0:
            return torch.zeros((0, self._info.embed_dim))
        inputs = {k: v.to(self._device) for k, v in tokens.inputs.items()}
        with torch.inference_mode():
            output = self._live_model().get_text_features(**inputs)
            return normalize(_embedding(output).float(), dim=-1).cpu()

    def _live_model(self) -> Any:
        if self._model is None:
            raise RuntimeError(f"backend for {self._info.extra['model_name']} was closed")
        return self._model

    def close(self) -> None:
        self._model = None
        release_device_memory(self._device)
