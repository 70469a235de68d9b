"""open_clip models (CLIP and SigLIP-style) behind the ``Backend`` protocol.

Images go through open_clip's own eval transform and texts through ``open_clip.get_tokenizer``,
so the embeddings equal what open_clip itself computes. A ``local-dir:`` folder whose text tower
is a transformers model (open_clip's xlm-roberta configs) may carry that tower's config in a
subfolder named as the config names the tower (:func:`local_text_tower`), so it loads offline.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
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
from clipserve.models.loader import (
    CHECKPOINT_SUFFIXES,
    HF_HUB_PREFIX,
    LOCAL_DIR_PREFIX,
    describe_model,
    dtype_name,
    module_footprint,
)
from clipserve.models.quantize import (
    QUANTIZED_LINEAR,
    compute_dtype,
    is_int8,
    quantization_info,
    quantize_linear_layers,
)
from clipserve.models.slots import TowerSlots

logger = logging.getLogger(__name__)

_MODALITIES: frozenset[Modality] = frozenset({"text", "image"})
_PRECISION: Mapping[torch.dtype, str] = MappingProxyType(
    {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
)


def resolve_open_clip_source(model_name: str, pretrained: str | None) -> tuple[str, str | None]:
    """Normalise ``(model_name, pretrained)`` into what ``open_clip.create_model`` expects.

    * ``pretrained='hf-hub:org/repo'`` becomes ``model_name='hf-hub:org/repo'`` (config and weights
      both come from that repository);
    * ``pretrained`` naming a directory becomes ``model_name='local-dir:<dir>'``;
    * a checkpoint path must exist (``ModelLoadError`` otherwise);
    * ``local-dir:`` folders must exist and hold ``open_clip_config.json``.

    The errors' messages name the config field but not the path (clients see them); the path is in
    their ``technical`` text.
    """
    if pretrained is not None and pretrained.startswith(HF_HUB_PREFIX):
        return pretrained, None
    if pretrained is not None and Path(pretrained).expanduser().is_dir():
        return f"{LOCAL_DIR_PREFIX}{Path(pretrained).expanduser()}", None
    if pretrained is not None and _looks_like_path(pretrained):
        checkpoint = Path(pretrained).expanduser()
        if not checkpoint.is_file():
            what = describe_model("open_clip", model_name)
            raise ModelLoadError(
                f"the checkpoint file set as `pretrained` of {what} does not exist; fix the path, "
                "or use a pretrained tag from open_clip.list_pretrained()",
                technical=f"open_clip checkpoint file not found: {str(checkpoint)!r}",
            )
        return model_name, str(checkpoint)
    if model_name.startswith(LOCAL_DIR_PREFIX):
        folder = Path(model_name[len(LOCAL_DIR_PREFIX) :]).expanduser()
        if not folder.is_dir():
            raise ModelLoadError(
                "the 'local-dir:' directory set as `model_name` of the open_clip backend does not "
                "exist; fix the path in the model config",
                technical=f"open_clip model directory not found: {str(folder)!r}",
            )
        if not (folder / "open_clip_config.json").is_file():
            raise ModelLoadError(
                "the 'local-dir:' directory set as `model_name` of the open_clip backend has no "
                "open_clip_config.json (expected {'model_cfg': ..., 'preprocess_cfg': ...} next "
                "to a weights file)",
                technical=f"no open_clip_config.json in {str(folder)!r}",
            )
        if pretrained is not None:
            logger.warning(
                "pretrained=%r is ignored: %s carries its own weights", pretrained, folder
            )
        return f"{LOCAL_DIR_PREFIX}{folder}", None
    if model_name.startswith(HF_HUB_PREFIX):
        if pretrained is not None:
            logger.warning("pretrained=%r is ignored for %s", pretrained, model_name)
        return model_name, None
    return model_name, pretrained


def local_text_tower(name: str) -> dict[str, Any]:
    """open_clip keywords that find a ``local-dir:`` folder's transformers text tower in it.

    open_clip's configs with a transformers text tower (``xlm-roberta-base-ViT-B-32``,
    ``roberta-ViT-B-32``...) name it by hub id in
    ``text_cfg.hf_model_name`` (``"xlm-roberta-base"``) and build it from that id's config, which
    offline is missing and from a folder is looked up relative to the working directory. When the
    folder has a subfolder of that (relative) name, the ``text_cfg`` is given with its absolute
    path; the subfolder needs only the tower's ``config.json``, since its weights are the folder
    checkpoint's (``hf_model_pretrained: false``). Otherwise (an absolute path, a hub id with no
    such subfolder, another schema): no keywords, and open_clip does as it does."""
    if not name.startswith(LOCAL_DIR_PREFIX):
        return {}
    folder = Path(name[len(LOCAL_DIR_PREFIX) :])
    if not (folder / "open_clip_config.json").is_file():
        return {}  # open_clip says what is missing
    config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    text_cfg = config.get("model_cfg", {}).get("text_cfg", {})
    tower = text_cfg.get("hf_model_name")
    if not isinstance(tower, str) or not tower or Path(tower).is_absolute():
        return {}
    if not (folder / tower).is_dir():
        return {}
    resolved = {**text_cfg, "hf_model_name": str(folder / tower), "hf_model_pretrained": False}
    return {"text_cfg": resolved}


def _looks_like_path(value: str) -> bool:
    return (
        Path(value).suffix.lower() in CHECKPOINT_SUFFIXES
        or value.startswith(("/", "./", "../", "~"))
        or "\\" in value
    )


MAX_TOKEN_CHARS = 34
"""More characters than one token of the CLIP BPE vocabulary spans (32), with a separator."""
MAX_WORD_CHARS = 48
"""Letters (or punctuation marks) in a row that open_clip's BPE sees as one word: its cost is
quadratic in a word's length (a random 2600-letter word takes half a second), and no English word
is this long; longer runs are cut to it."""
_LONG_RUN = re.compile(rf"[^\W\d_]{{{MAX_WORD_CHARS + 1},}}|[^\s\w]{{{MAX_WORD_CHARS + 1},}}")
_CHUNK = re.compile(r"\S+")


def bounded_text(text: str, context_length: int, *, cut_long_words: bool) -> str:
    """What of ``text`` can reach the context: its first ``context_length * MAX_TOKEN_CHARS``
    characters and its first ``context_length`` whitespace-separated chunks (each makes at least
    one token), then, with ``cut_long_words``, runs over ``MAX_WORD_CHARS`` cut to that."""
    text = text[: context_length * MAX_TOKEN_CHARS]
    for count, chunk in enumerate(_CHUNK.finditer(text), start=1):
        if count == context_length:
            text = text[: chunk.end()]
            break
    if cut_long_words:
        text = _LONG_RUN.sub(lambda run: run.group()[:MAX_WORD_CHARS], text)
    return text


BPE_CACHE_ENTRIES = 50_000
"""Words whose BPE open_clip's SimpleTokenizer remembers (its own cache never forgets)."""


class _BoundedCache(dict[str, str]):
    """open_clip's BPE word cache with a bound: the entries it starts with (the special tokens)
    stay; of the rest, the oldest go first."""

    def __init__(self, pinned: dict[str, str], limit: int) -> None:
        super().__init__(pinned)
        self._pinned = frozenset(pinned)
        self._limit = limit
        self._order: deque[str] = deque()

    def __setitem__(self, key: str, value: str) -> None:
        if key not in self:
            self._order.append(key)
            while len(self._order) > self._limit:
                super().__delitem__(self._order.popleft())
        super().__setitem__(key, value)


def _bound_bpe_cache(tokenizer: Any) -> bool:
    """Bound the BPE word cache of open_clip's own tokenizer; whether ``tokenizer`` is that one
    (whose BPE, in Python, is quadratic in a word's length)."""
    from open_clip.tokenizer import SimpleTokenizer

    if not isinstance(tokenizer, SimpleTokenizer):
        return False
    if type(tokenizer.cache) is dict:
        tokenizer.cache = _BoundedCache(tokenizer.cache, BPE_CACHE_ENTRIES)
    return True


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    """How many tokens (special tokens included) ``tokenizer`` makes of a text before truncation."""
    from open_clip.tokenizer import HFTokenizer, SigLipTokenizer, SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        return lambda text: len(tokenizer.encode(text)) + 2  # <start> ... <end>
    if isinstance(tokenizer, HFTokenizer):
        hf = tokenizer.tokenizer
        if tokenizer.tokenizer_mode == "clips":  # bos + text + eos + trailing cls
            return lambda text: (
                len(hf(tokenizer.clean_fn(text), add_special_tokens=False)["input_ids"]) + 3
            )
        return lambda text: len(hf(tokenizer.clean_fn(text), verbose=False)["input_ids"])
    if isinstance(tokenizer, SigLipTokenizer):
        from open_clip.tokenizer import basic_clean, canonicalize_text

        hf = tokenizer.tokenizer
        return lambda text: len(
            hf(canonicalize_text(basic_clean(text)), verbose=False)["input_ids"]
        )

    def fallback(text: str) -> int:  # unknown tokenizer: count what survives a generous context
        ids = tokenizer([text], context_length=4096)[0]
        return int((ids != 0).sum())

    return fallback


class _PilThenNumpy:
    """open_clip's eval transform with its tensor tail (``ToTensor`` + ``Normalize``) done in numpy.

    The PIL stages (resize, crop, mode) run as they are; the last two steps are the same float32
    arithmetic (``x / 255``, ``(x - mean) / std``), so the result is bit-identical. The point: no
    torch op runs on the preprocessing threads, so they start no OpenMP teams that would fight the
    encoder's threads for the cores (on a 2-core CPU that contention cost ~40% of throughput).
    """

    def __init__(self, head: Callable[[Image.Image], Image.Image], mean: Any, std: Any) -> None:
        self._head = head
        self._mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self._std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)

    @classmethod
    def wrap(cls, preprocess: Callable[[Image.Image], torch.Tensor]) -> _PilThenNumpy | None:
        """The split transform, or None when ``preprocess`` does not end in ToTensor+Normalize."""
        from torchvision import transforms as tv

        steps = getattr(preprocess, "transforms", None)
        if not isinstance(steps, list) or len(steps) < 2:
            return None
        *head, to_tensor, norm = steps
        if not isinstance(norm, tv.Normalize) or type(to_tensor).__name__ not in (
            "ToTensor",
            "MaybeToTensor",
        ):
            return None
        return cls(tv.Compose(head), norm.mean, norm.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        staged = self._head(image)
        if not isinstance(staged, Image.Image):  # a tensor-producing head: nothing to gain
            raise TypeError("the PIL stage did not return a PIL image")
        array = np.asarray(staged, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        chw = array.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return torch.from_numpy((chw - self._mean) / self._std)


def _can_trim_text(model: Any) -> bool:
    """Whether the text tower may run on the batch's used length instead of the full context.

    True for open_clip's own CLIP text tower with a causal mask, pooled at the end-of-text token:
    each position attends only to earlier ones, so the padding after the longest text's EOT cannot
    change the pooled feature, and cutting it off is exact (and several times cheaper for short
    prompts). SigLIP-style towers (no causal mask, last-token pooling) and HF towers keep the full
    context."""
    import open_clip

    return (
        isinstance(model, open_clip.CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
    )


def _trim_text(model: Any, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids[:, :used], ends)``: the ids cut after the batch's last end-of-text token (``used``
    = its position + 1) and each row's end-of-text position, the trimmed tower's inputs."""
    if model.text_pool_type == "eos":
        ends = (ids == model.text_eos_id).int().argmax(dim=-1)
    else:
        ends = ids.argmax(dim=-1)
    used = int(ends.max()) + 1
    return ids[:, :used].contiguous(), ends  # contiguous: one compiled graph for every length


class _ImageTower(torch.nn.Module):
    """open_clip's ``encode_image`` as a module: pixels -> features."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.model.encode_image(pixels)
        return features


class _TextTower(torch.nn.Module):
    """open_clip's ``encode_text`` as a module: the full context's ids -> features."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.model.encode_text(ids)
        return features


class _TrimmedTextTower(torch.nn.Module):
    """open_clip's ``CLIP.encode_text`` on ids cut to the batch's used length
    (:func:`_trim_text`): ``(ids, ends)`` -> features. Exact for the towers
    :func:`_can_trim_text` accepts."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        model = self.model
        used = ids.shape[1]
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(ids).to(cast_dtype)
        x = x + model.positional_embedding[:used].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:used, :used])
        x = model.ln_final(x)
        rows = torch.arange(x.shape[0], device=x.device)
        pooled: torch.Tensor = x[rows, ends]
        projection = model.text_projection
        if projection is None:
            return pooled
        projected: torch.Tensor = (
            projection(pooled) if isinstance(projection, torch.nn.Module) else pooled @ projection
        )
        return projected


def _quantize(model: Any) -> Any:
    """``precision: int8`` for an open_clip model (float32, on the CPU): its Linear layers
    quantized, but for ``text_projection`` layers (open_clip calls them only when they are an
    ``nn.Linear``, else multiplies by them). Each quantized layer gets open_clip's own
    ``int8_original_dtype`` (its bitsandbytes hook), which ``get_cast_dtype`` reads instead of
    the weight's dtype (a quantized layer's ``weight`` is a method)."""
    keep = [
        name
        for name, module in model.named_modules()
        if name.rpartition(".")[2] == "text_projection" and type(module) is torch.nn.Linear
    ]
    quantize_linear_layers(model, keep=keep)
    for module in model.modules():
        if isinstance(module, QUANTIZED_LINEAR):
            layer: Any = module  # an attribute torch.nn.Module's typing does not know
            layer.int8_original_dtype = torch.float32
    return model


class OpenClipBackend(TowerSlots):
    """An open_clip model on one device. Build it with :meth:`load`."""

    def __init__(
        self,
        model: Any,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Any,
        *,
        device: str,
        dtype: torch.dtype,
        name: str,
    ) -> None:
        self._model: Any = model.eval()
        self._preprocess = _PilThenNumpy.wrap(preprocess) or preprocess
        self._tokenizer = tokenizer
        self._cut_long_words = _bound_bpe_cache(tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._count_tokens = _token_counter(tokenizer)
        self._device = torch.device(device)
        self._dtype = compute_dtype(dtype)
        self._context_length = int(getattr(tokenizer, "context_length", None) or 77)
        bias = getattr(model, "logit_bias", None)
        self._logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
        self._logit_bias = None if bias is None else float(bias.detach().float().reshape(-1)[0])
        image_size = getattr(model.visual, "image_size", None)
        if isinstance(image_size, tuple | list):
            image_size = image_size[0]
        params, memory = module_footprint(model)
        self._trimmable = _can_trim_text(model)
        self._init_towers(
            {
                "image": _ImageTower(self._model),
                "text": _TrimmedTextTower(self._model)
                if self._trimmable
                else _TextTower(self._model),
            }
        )
        self._info = BackendInfo(
            backend="open_clip",
            architecture="siglip" if self._logit_bias is not None else "clip",
            embed_dim=self._probe_embed_dim(),
            context_length=self._context_length,
            modalities=_MODALITIES,
            device=str(self._device),
            dtype=dtype_name(dtype),
            image_size=None if image_size is None else int(image_size),
            parameter_count=params,
            memory_bytes=memory,
            extra={
                "model_name": name,
                "tokenizer": type(tokenizer).__name__,
                **quantization_info(dtype),
            },
        )

    def _probe_embed_dim(self) -> int:
        dim = getattr(self._model.visual, "output_dim", None)
        if isinstance(dim, int) and dim > 0:
            return dim
        with torch.inference_mode():  # timm / HF towers: ask the model
            ids = self._tokenizer(["a"], context_length=self._context_length).to(self._device)
            return int(self._live_model().encode_text(ids).shape[-1])

    @classmethod
    def load(
        cls, model_name: str, pretrained: str | None, *, device: str, dtype: torch.dtype
    ) -> OpenClipBackend:
        """Create the model (config, weights, transforms, tokenizer) on ``device`` in ``dtype``;
        :data:`~clipserve.models.quantize.INT8` loads float32 weights and quantizes the Linear
        layers (CPU only: the loader's ``resolve_dtype`` sees to that).

        ``model_name``: an open_clip architecture (``ViT-B-32``), ``hf-hub:org/repo`` or
        ``local-dir:/path``. ``pretrained``: an open_clip tag, a checkpoint file,
        ``hf-hub:org/repo``, a directory, or None for random weights. Library errors propagate
        unchanged (the loader turns them into :class:`ModelLoadError`); bad local paths raise
        ``ModelLoadError`` here.
        """
        import open_clip

        name, weights = resolve_open_clip_source(model_name, pretrained)
        precision = _PRECISION.get(compute_dtype(dtype))
        if precision is None:
            raise ModelLoadError(
                f"unsupported dtype {dtype} (use float32, float16, bfloat16 or int8)"
            )
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=weights, precision=precision, device=device, **local_text_tower(name)
        )
        if is_int8(dtype):
            model = _quantize(model.eval())
        tokenizer = open_clip.get_tokenizer(name)
        if weights is None and not name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX)):
            logger.warning(
                "open_clip model %s has no pretrained weights: randomly initialised "
                "(embeddings are meaningless; use only for tests and benchmarks)",
                name,
            )
        return cls(model, preprocess, tokenizer, device=device, dtype=dtype, name=name)

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
        pixels = self._preprocess(image.convert("RGB") if image.mode != "RGB" else image)
        return pixels.float()

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        """Texts cut to what can reach the context first (:func:`bounded_text`): the tokens that
        fit it are the same (but for words over ``MAX_WORD_CHARS`` letters), and a hostile text
        cannot make open_clip's BPE (quadratic in a word's length) run for seconds. Token counts
        of cut texts are then those of the cut text (still over the context: ``truncated``)."""
        context, long_words = self._context_length, self._cut_long_words
        cut = [bounded_text(text, context, cut_long_words=long_words) for text in texts]
        if not cut:
            empty = torch.zeros((0, self._context_length), dtype=torch.long)
            return TokenizedTexts(inputs={"input_ids": empty}, token_counts=(), truncated=())
        with self._tokenizer_lock:  # HF-based tokenizers keep truncation state per call
            ids = self._tokenizer(cut, context_length=self._context_length)
            counts = tuple(self._count_tokens(text) for text in cut)
        truncated = tuple(
            count > context or len(kept) < len(text)
            for count, kept, text in zip(counts, cut, texts, strict=True)
        )
        return TokenizedTexts(inputs={"input_ids": ids}, token_counts=counts, truncated=truncated)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[0] == 0:
            return torch.zeros((0, self._info.embed_dim))
        forward = self._forward("image")
        with torch.inference_mode():
            features = forward(pixels.to(self._device, self._dtype))
            return normalize(features.float(), dim=-1).cpu()

    def encode_texts(self, tokens: TokenizedTexts) -> torch.Tensor:
        if len(tokens) == 0:
            return torch.zeros((0, self._info.embed_dim))
        forward = self._forward("text")
        with torch.inference_mode():
            features = forward(*self._text_inputs(tokens))
            return normalize(features.float(), dim=-1).cpu()

    def _text_inputs(self, tokens: TokenizedTexts) -> tuple[torch.Tensor, ...]:
        ids = tokens.inputs["input_ids"].to(self._device)
        return _trim_text(self._live_model(), ids) if self._trimmable else (ids,)

    # --- TowerBackend: the runtimes (clipserve.models.runtimes) -----------------------------------

    def towers(self) -> Mapping[TowerName, Tower]:
        names = ("ids", "ends") if self._trimmable else ("ids",)
        lengths = frozenset({"ids"}) if self._trimmable else frozenset()
        return {"image": self._image_tower("pixels"), "text": self._text_tower(names, lengths)}
