"""transformers ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` behind the
:class:`~clipserve.models.base.Backend` protocol, loaded from a Hub id or a local directory with
their own processor.

transformers 5 notes: ``get_image_features``/``get_text_features`` return a ``ModelOutput`` whose
``pooler_output`` is the projected embedding (older versions return the tensor itself; both work).
SigLIP text must be padded to ``max_length`` (the model pools the last position) and is encoded
without an attention mask, as SigLIP was trained (pad == eos, no masking).

SigLIP 2 comes two ways: the fixed-resolution checkpoints are ``model_type: siglip`` (loaded as
SigLIP), and NaFlex ones (``siglip2``) cut each image into patches at its own aspect ratio, padded
to the processor's ``max_num_patches``, with an attention mask and the patch grid; every image of
a model thus has the same sequence length (the pad is bounded by ``max_num_patches``), so its
batches need no grouping. Their text is padded to ``max_length`` (64) and sent with the attention
mask, as the processor gives it (the reference path the parity tests compare with).

Images are preprocessed by :class:`~clipserve.models.hf_preprocessing.NumpyImageProcessor`, which
reproduces the model's own image processor exactly with PIL and numpy, so no torch operator runs
on the CPU preprocessing threads; a processor configuration it cannot reproduce keeps the
transformers processor (with a warning at load).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from PIL import Image
from torch.nn.functional import normalize

from clipserve.errors import ModelLoadError
from clipserve.models.base import (
    BackendInfo,
    Modality,
    TokenizedTexts,
    Tower,
    TowerName,
)
from clipserve.models.hf_preprocessing import image_pipeline, to_rgb
from clipserve.models.loader import (
    describe_model,
    dtype_name,
    module_footprint,
)
from clipserve.models.quantize import (
    compute_dtype,
    is_int8,
    quantization_info,
    quantize_linear_layers,
)
from clipserve.models.slots import TowerSlots

HfArchitecture = Literal["clip", "siglip", "siglip2"]
_SIGMOID: frozenset[HfArchitecture] = frozenset({"siglip", "siglip2"})
_NAFLEX_EXTRA = 3
"""SigLIP 2 NaFlex images travel as one tensor per image: its patch rows (``max_num_patches`` x
patch values), each followed by its attention mask bit and the image's patch grid (rows,
columns), so they stack like fixed-size images."""
_MODALITIES: frozenset[Modality] = frozenset({"text", "image"})


def _embedding(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_*_features`` (a ModelOutput in transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if not isinstance(pooled, torch.Tensor):
        raise TypeError(f"unexpected output of get_*_features: {type(output).__name__}")
    return pooled


class _ImageTower(torch.nn.Module):
    """``get_image_features`` as a module: pixel values -> the projected embedding."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _embedding(self.model.get_image_features(pixel_values=pixel_values))


class _TextTower(torch.nn.Module):
    """``get_text_features`` as a module: the ids (and attention mask, but for SigLIP) -> the
    projected embedding."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return _embedding(self.model.get_text_features(**inputs))


_DUAL_ENCODER_METHODS = ("get_image_features", "get_text_features")


def _dual_encoder_class(config: Any, model_name: str) -> Any:
    """transformers' ``AutoModel`` class for ``config`` when it is a dual encoder (it has
    ``get_image_features`` and ``get_text_features``, like CLIPModel); else ModelLoadError naming
    what is missing. Nothing is loaded to find out."""
    from transformers import MODEL_MAPPING

    model_type = str(getattr(config, "model_type", ""))
    try:
        model_cls = MODEL_MAPPING[type(config)]
    except KeyError:
        model_cls = None
    missing = [m for m in _DUAL_ENCODER_METHODS if not hasattr(model_cls, m)]
    if model_cls is None or missing:
        what = "no AutoModel class" if model_cls is None else f"{model_cls.__name__} has no "
        raise ModelLoadError(
            f"{describe_model('hf', model_name)} has model_type '{model_type}' "
            f"({what}{', '.join(missing)}); the hf backend serves image-text dual encoders "
            "with get_image_features and get_text_features ('clip', 'siglip', 'siglip2', "
            "'chinese_clip', 'altclip'...); use backend 'sentence-transformers' for text-only "
            "models",
            technical=f"model_type {model_type!r} in the config of {model_name!r}",
        )
    return model_cls


def _text_positions(model: Any) -> int:
    """How many tokens the text tower's position table holds: ``max_position_embeddings``, less
    the offset of RoBERTa-style towers (XLM-R: AltCLIP), which number positions from
    ``padding_idx + 1`` (their position embedding has a ``padding_idx``): 514 rows, 512 tokens,
    even when the tokenizer sets no limit."""
    positions = int(model.config.text_config.max_position_embeddings)
    text_model = getattr(model, "text_model", None)
    if not isinstance(text_model, torch.nn.Module):
        return positions
    for name, module in text_model.named_modules():
        if name.rpartition(".")[2] == "position_embeddings" and isinstance(
            module, torch.nn.Embedding
        ):
            if module.padding_idx is not None:
                return positions - (int(module.padding_idx) + 1)
            break
    return positions


def _naflex_pipeline(image_processor: Any) -> Callable[[Image.Image], torch.Tensor]:
    """SigLIP 2 NaFlex preprocessing (transformers' own processor: patches of the image at its
    aspect ratio, padded to ``max_num_patches``), packed into one tensor (see
    :data:`_NAFLEX_EXTRA`)."""

    def naflex(image: Image.Image) -> torch.Tensor:
        out = image_processor(images=[to_rgb(image)], return_tensors="pt")
        patches = out["pixel_values"][0].float()
        mask = out["pixel_attention_mask"][0].float().unsqueeze(-1)
        grid = out["spatial_shapes"][0].float().expand(patches.shape[0], 2)
        return torch.cat([patches, mask, grid], dim=-1)

    return naflex


def _unpack_naflex(packed: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": packed[..., :-_NAFLEX_EXTRA],
        "pixel_attention_mask": packed[..., -_NAFLEX_EXTRA].long(),
        "spatial_shapes": packed[:, 0, -2:].long(),
    }


def load_processor(model_name: str) -> Any:
    """The model's ``AutoProcessor``, refused (ModelLoadError) unless it has both an image
    processor and a tokenizer."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name)
    if getattr(processor, "image_processor", None) is None or (
        getattr(processor, "tokenizer", None) is None
    ):
        raise ModelLoadError(
            f"{describe_model('hf', model_name)} has no complete processor (it needs an "
            "image processor and a tokenizer: save both with the model)",
            technical=f"processor of {model_name!r}: {type(processor).__name__}",
        )
    return processor


class HfClipBackend(TowerSlots):
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
        if architecture == "siglip2":
            self._preprocess_image, preprocessing = _naflex_pipeline(image_processor), "naflex"
        else:
            self._preprocess_image, preprocessing = image_pipeline(image_processor, name)
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._architecture: HfArchitecture = architecture
        self._device = torch.device(device)
        self._dtype = compute_dtype(dtype)
        config = model.config
        self._context_length = _text_positions(model)
        tokenizer_limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
        if 0 < tokenizer_limit < self._context_length:
            self._context_length = tokenizer_limit
        scale = getattr(model, "logit_scale", None)
        self._logit_scale = (
            float(scale.detach().float().exp().reshape(-1)[0]) if scale is not None else 100.0
        )
        bias = getattr(model, "logit_bias", None) if architecture in _SIGMOID else None
        self._logit_bias = None if bias is None else float(bias.detach().float().reshape(-1)[0])
        vision = config.vision_config
        if architecture == "clip":
            embed_dim = int(getattr(config, "projection_dim", 0) or vision.hidden_size)
        else:
            embed_dim = int(vision.hidden_size)
        if architecture == "siglip2":  # the side of the square image that fills its patches
            image_size = math.isqrt(int(vision.num_patches)) * int(vision.patch_size)
        else:
            image_size = int(vision.image_size)
        params, memory = module_footprint(model)
        self._text_keys = (
            ("input_ids",) if architecture == "siglip" else ("input_ids", "attention_mask")
        )
        modules: dict[TowerName, torch.nn.Module] = {"text": _TextTower(self._model)}
        if architecture != "siglip2":  # NaFlex images: patches, mask and grid stay eager
            modules["image"] = _ImageTower(self._model)
        self._init_towers(modules)
        self._info = BackendInfo(
            backend="hf",
            architecture=architecture,
            embed_dim=embed_dim,
            context_length=self._context_length,
            modalities=_MODALITIES,
            device=str(self._device),
            dtype=dtype_name(dtype),
            image_size=image_size,
            parameter_count=params,
            memory_bytes=memory,
            extra={
                "model_name": name,
                "model_type": str(config.model_type),
                "image_preprocessing": preprocessing,
                **quantization_info(dtype),
            },
        )

    @classmethod
    def load(cls, model_name: str, *, device: str, dtype: torch.dtype) -> HfClipBackend:
        """Load a CLIP or SigLIP model, its image processor and tokenizer from ``model_name``
        (Hub id or directory). The architecture comes from the config's ``model_type``.
        :data:`~clipserve.models.quantize.INT8` loads float32 weights and quantizes the Linear
        layers (CPU only: the loader's ``resolve_dtype`` sees to that). Library errors propagate
        (the loader explains them); unsupported model types and incomplete processors raise
        ``ModelLoadError`` (naming the source by kind, not by path)."""
        from transformers import AutoConfig, CLIPModel, Siglip2Model, SiglipModel

        config = AutoConfig.from_pretrained(model_name)
        model_type = str(getattr(config, "model_type", ""))
        architecture: HfArchitecture
        if model_type == "clip":
            architecture, model_cls = "clip", CLIPModel
        elif model_type == "siglip":
            architecture, model_cls = "siglip", SiglipModel
        elif model_type == "siglip2":  # NaFlex; fixed-resolution SigLIP 2 is model_type 'siglip'
            architecture, model_cls = "siglip2", Siglip2Model
        else:  # any other dual encoder transformers' AutoModel knows (ChineseCLIP, AltCLIP...)
            architecture, model_cls = "clip", _dual_encoder_class(config, model_name)
        weights = compute_dtype(dtype)
        model = model_cls.from_pretrained(model_name, dtype=weights)
        model.to(device=device, dtype=weights)  # transformers < 4.56 ignores `dtype=`
        if is_int8(dtype):
            quantize_linear_layers(model.eval())
        processor = load_processor(model_name)
        image_processor, tokenizer = processor.image_processor, processor.tokenizer
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
        return self._preprocess_image(image)

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        texts = list(texts)
        if not texts:
            empty = torch.zeros((0, self._context_length), dtype=torch.long)
            return TokenizedTexts(inputs={"input_ids": empty}, token_counts=(), truncated=())
        padding = "max_length" if self._architecture in _SIGMOID else "longest"
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
        inputs = {k: encoded[k] for k in self._text_keys}
        return TokenizedTexts(
            inputs=inputs,
            token_counts=counts,
            truncated=tuple(count > self._context_length for count in counts),
        )

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] == 0:
            return torch.zeros((0, self._info.embed_dim))
        with torch.inference_mode():
            if self._architecture == "siglip2":
                inputs = {k: v.to(self._device) for k, v in _unpack_naflex(pixels).items()}
                inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
                features = _embedding(self._live_model().get_image_features(**inputs))
            else:
                features = self._forward("image")(pixels.to(self._device, self._dtype))
            return normalize(features.float(), dim=-1).cpu()

    def encode_texts(self, tokens: TokenizedTexts) -> torch.Tensor:
        if len(tokens) == 0:
            return torch.zeros((0, self._info.embed_dim))
        forward = self._forward("text")
        with torch.inference_mode():
            features = forward(*self._text_inputs(tokens))
            return normalize(features.float(), dim=-1).cpu()

    def _text_inputs(self, tokens: TokenizedTexts) -> tuple[torch.Tensor, ...]:
        return tuple(tokens.inputs[key].to(self._device) for key in self._text_keys)

    # --- TowerBackend: the runtimes (clipserve.models.runtimes) -----------------------------------

    def towers(self) -> Mapping[TowerName, Tower]:
        towers: dict[TowerName, Tower] = {}
        if "image" in self._tower_modules:
            towers["image"] = self._image_tower("pixel_values")
        padded = self._architecture in _SIGMOID  # to max_length: no length varies
        towers["text"] = self._text_tower(
            self._text_keys, frozenset() if padded else frozenset(self._text_keys)
        )
        return towers
