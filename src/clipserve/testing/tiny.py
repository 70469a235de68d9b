"""Tiny, seeded, randomly initialised CLIP/SigLIP models built on the fly, with no downloads.

They load through the same code paths as real checkpoints, so tests (ours and yours) can exercise
every backend offline in a second or two:

* :func:`build_tiny_open_clip` writes an open_clip ``local-dir:`` folder;
* :func:`build_tiny_hf_clip`, :func:`build_tiny_hf_siglip` and :func:`build_tiny_hf_siglip2`
  write transformers folders that ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` (NaFlex)
  and ``AutoProcessor.from_pretrained(folder)`` load, and :func:`build_tiny_hf_chinese_clip` a
  dual encoder of another family (a BERT text tower beside a ViT: ``ChineseCLIPModel``);
* :func:`build_tiny_blip` writes a transformers BLIP folder (captioning, or question answering)
  that ``BlipForConditionalGeneration`` / ``BlipForQuestionAnswering`` and its processor load,
  and :func:`build_tiny_blip2` a BLIP-2 (OPT) one for ``Blip2ForConditionalGeneration``;
* :func:`convert_open_clip_to_hf_clip` turns an open_clip CLIP folder into an equivalent
  transformers folder (same weights, same tokenizer ids), for parity checks between libraries.

Families with other text towers or shapes (multilingual XLM-R CLIPs, TinyCLIP) are built by
:mod:`clipserve.testing.tiny_families`.

The weights are random: embeddings (and captions) are meaningless but deterministic for a given
``seed``.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

__all__ = [
    "build_tiny_blip",
    "build_tiny_blip2",
    "build_tiny_hf_chinese_clip",
    "build_tiny_hf_clip",
    "build_tiny_hf_siglip",
    "build_tiny_hf_siglip2",
    "build_tiny_open_clip",
    "clip_bpe_tokenizer",
    "convert_open_clip_to_hf_clip",
    "open_clip_state_dict_to_hf_clip",
    "save_open_clip_folder",
    "tiny_open_clip_config",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

# A small built-in corpus for the tiny SigLIP sentencepiece model: common caption words plus the
# alphabet and digits, so any ASCII text tokenizes (rare characters become <unk>).
_SIGLIP_CORPUS = (
    "a photo of a cat",
    "a photo of a dog",
    "a photograph of an astronaut in a space suit",
    "a cup of coffee on a table",
    "a rocket launching into the sky",
    "a cat sitting on a sofa next to a window",
    "two dogs playing in the park on a sunny day",
    "the quick brown fox jumps over the lazy dog",
    "an image of a city street at night with cars and lights",
    "a bowl of fruit with apples bananas and oranges",
    "a person riding a bicycle down the road",
    "a red car parked in front of a white house",
    "a bird flying over the ocean and the beach",
    "a plate of food with rice vegetables and meat",
    "a group of people standing around a table",
    "a close up of a flower in a garden",
    "a painting of a mountain landscape with snow",
    "a black and white picture of a train station",
    "a child eating ice cream in summer",
    "a laptop and a phone on a wooden desk",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789",
    "hello world, this is a test. it's fine! (really?) yes: 100% - ok; #1 @home",
)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_open_clip_config(*, siglip: bool = False) -> dict[str, Any]:
    """A fresh copy of the tiny open_clip ``model_cfg``: embed 32; ViT image 64, patch 16, width 64
    (one 64-wide head), 2 layers; text context 77, CLIP BPE vocabulary, width 64, 2 heads, 2 layers.
    ``siglip=True`` adds ``init_logit_bias = -10``."""
    cfg: dict[str, Any] = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }
    if siglip:
        cfg["init_logit_bias"] = -10.0
    return cfg


def build_tiny_open_clip(path: Path, *, siglip: bool = False, seed: int = 0) -> Path:
    """Write a self-contained open_clip folder holding a tiny random CLIP (or SigLIP-style) model.

    The folder has ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) and
    ``open_clip_model.safetensors``; load it with ``model_name=f"local-dir:{path}"``. The model is a
    ViT (image 64, patch 16, width 64, 2 layers) and a text transformer (context 77, CLIP BPE
    vocabulary, width 64, 2 heads, 2 layers), both projecting to 32 dimensions. ``siglip=True`` adds
    a sigmoid ``logit_bias`` (init -10) but keeps CLIP's tokenizer so it still works offline.
    Returns ``path``.
    """
    import open_clip

    with _seeded(seed):
        model = open_clip.CLIP(**tiny_open_clip_config(siglip=siglip))
    return save_open_clip_folder(model, tiny_open_clip_config(siglip=siglip), path)


def save_open_clip_folder(model: Any, model_cfg: Mapping[str, Any], path: Path) -> Path:
    """Write ``model`` as an open_clip ``local-dir:`` folder: ``open_clip_model.safetensors`` and
    ``open_clip_config.json`` (``model_cfg`` and a ``preprocess_cfg`` of OpenAI's mean and std,
    bicubic, shortest-side resize to the config's image size). Returns ``path``."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().contiguous() for key, value in model.state_dict().items()}
    save_file(state, str(path / "open_clip_model.safetensors"))
    preprocess_cfg = {
        "size": model_cfg["vision_cfg"]["image_size"],
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (path / "open_clip_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def clip_bpe_tokenizer(model_max_length: int = 77) -> Any:
    """A transformers ``CLIPTokenizer`` built offline from open_clip's bundled BPE merges.

    Its ids equal open_clip's ``SimpleTokenizer`` ids (byte-to-unicode alphabet, the same words with
    ``</w>``, the first 48,894 merges, then ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(bytes_to_unicode().values())
    words = alphabet + [token + "</w>" for token in alphabet] + ["".join(m) for m in merges]
    words += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {word: index for index, word in enumerate(words)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _clip_image_processor(
    image_size: int, mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD
) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=_BICUBIC,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def save_hf_folder(path: Path, model: Any, processor: Any) -> Path:
    """Save a transformers ``model`` and its ``processor`` side by side in ``path`` (created),
    as a hub repository holds them. Returns ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


def _save_hf_clip(
    model: Any, path: Path, *, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Path:
    from transformers import CLIPProcessor

    context_length = int(model.config.text_config.max_position_embeddings)
    processor = CLIPProcessor(
        image_processor=_clip_image_processor(image_size, mean, std),
        tokenizer=clip_bpe_tokenizer(context_length),
    )
    return save_hf_folder(path, model, processor)


def _hf_clip_config(model_cfg: Mapping[str, Any]) -> Any:
    """The transformers ``CLIPConfig`` of an open_clip ``model_cfg`` (ViT + built-in text tower)."""
    from transformers import CLIPConfig

    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    text_width, vision_width = int(text_cfg.get("width", 512)), int(vision_cfg.get("width", 768))
    text = {
        "vocab_size": int(text_cfg.get("vocab_size", 49408)),
        "hidden_size": text_width,
        "intermediate_size": int(text_width * float(text_cfg.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(text_cfg.get("layers", 12)),
        "num_attention_heads": int(text_cfg.get("heads", 8)),
        "max_position_embeddings": int(text_cfg.get("context_length", 77)),
        "hidden_act": act,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    vision = {
        "hidden_size": vision_width,
        "intermediate_size": int(vision_width * float(vision_cfg.get("mlp_ratio", 4.0))),
        "num_hidden_layers": int(vision_cfg.get("layers", 12)),
        "num_attention_heads": vision_width // int(vision_cfg.get("head_width", 64)),
        "image_size": int(vision_cfg.get("image_size", 224)),
        "patch_size": int(vision_cfg.get("patch_size", 16)),
        "hidden_act": act,
    }
    embed_dim = int(model_cfg["embed_dim"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed_dim)


def build_tiny_hf_clip(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random transformers CLIP folder (model, image processor, CLIP BPE tokenizer).

    ``CLIPModel.from_pretrained(path)`` and ``CLIPProcessor.from_pretrained(path)`` load it offline.
    The architecture is :func:`tiny_open_clip_config` (hidden 64, 2 layers per tower, image 64 /
    patch 16, projection 32, exact GELU), with its own seeded random weights.
    Returns ``path``.
    """
    from transformers import CLIPModel

    with _seeded(seed):
        model = CLIPModel(_hf_clip_config(tiny_open_clip_config()))
    return _save_hf_clip(model, path, image_size=64, mean=OPENAI_MEAN, std=OPENAI_STD)


def _train_sentencepiece() -> bytes:
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SIGLIP_CORPUS),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=256,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return buffer.getvalue()


def build_tiny_hf_siglip(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random transformers SigLIP folder (model, image processor, tokenizer).

    The sentencepiece tokenizer is trained at build time on a small built-in corpus (pad 0, eos 1,
    unk 2, no bos), so ``SiglipModel.from_pretrained(path)`` and
    ``AutoProcessor.from_pretrained(path)`` load offline (needs ``sentencepiece`` and ``protobuf``).
    Hidden size 64, 2 layers per tower, image 64 / patch 16, text context 64;
    ``logit_scale = log(10)`` and ``logit_bias = -10`` as in SigLIP's initialisation.
    Returns ``path``.
    """
    from transformers import (
        SiglipConfig,
        SiglipImageProcessor,
        SiglipModel,
        SiglipProcessor,
        SiglipTokenizer,
    )

    path.mkdir(parents=True, exist_ok=True)
    spiece = path / "spiece.model"
    spiece.write_bytes(_train_sentencepiece())
    tokenizer = SiglipTokenizer(vocab_file=str(spiece), model_max_length=64)
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 1,
        "eos_token_id": 1,
        "bos_token_id": None,
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 64,
        "patch_size": 16,
    }
    with _seeded(seed):
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():
            model.logit_scale.fill_(float(torch.log(torch.tensor(10.0))))
            model.logit_bias.fill_(-10.0)
    image_processor = SiglipImageProcessor(
        do_resize=True,
        size={"height": 64, "width": 64},
        resample=_BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return save_hf_folder(path, model, processor)


def build_tiny_hf_chinese_clip(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random transformers Chinese-CLIP folder: a BERT text tower (word pieces,
    context 64) beside a CLIP ViT (image 32 / patch 8), projection 16, with its processor.
    ``AutoModel`` loads it as ``ChineseCLIPModel``: a dual encoder that is not CLIP's own class,
    as multilingual CLIPs are. Returns ``path``."""
    from transformers import (
        ChineseCLIPConfig,
        ChineseCLIPImageProcessor,
        ChineseCLIPModel,
        ChineseCLIPProcessor,
    )

    tokenizer = _blip_tokenizer()
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = ChineseCLIPConfig(
        text_config={
            **small,
            "num_attention_heads": 2,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 64,
        },
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    with _seeded(seed):
        model = ChineseCLIPModel(config)
    processor = ChineseCLIPProcessor(
        image_processor=ChineseCLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    return save_hf_folder(path, model, processor)


def build_tiny_hf_siglip2(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random transformers SigLIP 2 NaFlex folder: ``Siglip2Model`` (hidden 64, 2
    layers per tower, patch 16, a 4 x 4 position grid), a ``Siglip2ImageProcessor`` of at most
    256 patches (the processor's default) and a character-level ``Siglip2Tokenizer`` (a BPE
    vocabulary of the corpus' characters with byte fallback, lower-cased as Gemma's is), text
    context 64. Returns ``path``."""
    from transformers import (
        Siglip2Config,
        Siglip2ImageProcessor,
        Siglip2Model,
        Siglip2Processor,
        Siglip2Tokenizer,
    )

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    characters = sorted({c for line in _SIGLIP_CORPUS for c in line.lower().replace(" ", "▁")})
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {token: i for i, token in enumerate([*specials, *characters, *bytes_])}
    tokenizer = Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=64)
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
    }
    vision = {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 16,
        "num_patches": 16,
    }
    with _seeded(seed):
        model = Siglip2Model(Siglip2Config(text_config=text, vision_config=vision))
        with torch.no_grad():  # SigLIP's initialisation
            model.logit_scale.fill_(float(torch.log(torch.tensor(10.0))))
            model.logit_bias.fill_(-10.0)
    processor = Siglip2Processor(
        image_processor=Siglip2ImageProcessor(patch_size=16, max_num_patches=256),
        tokenizer=tokenizer,
    )
    return save_hf_folder(path, model, processor)


def _split_blocks(
    state: Mapping[str, torch.Tensor], src: str, dst: str, layers: int
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for part, name in (("weight", "weight"), ("bias", "bias")):
            q, k, v = state[f"{s}.attn.in_proj_{part}"].chunk(3, dim=0)
            out[f"{d}.self_attn.q_proj.{name}"] = q
            out[f"{d}.self_attn.k_proj.{name}"] = k
            out[f"{d}.self_attn.v_proj.{name}"] = v
            out[f"{d}.self_attn.out_proj.{name}"] = state[f"{s}.attn.out_proj.{part}"]
            out[f"{d}.layer_norm1.{name}"] = state[f"{s}.ln_1.{part}"]
            out[f"{d}.layer_norm2.{name}"] = state[f"{s}.ln_2.{part}"]
            out[f"{d}.mlp.fc1.{name}"] = state[f"{s}.mlp.c_fc.{part}"]
            out[f"{d}.mlp.fc2.{name}"] = state[f"{s}.mlp.c_proj.{part}"]
    return out


def _count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(k[len(prefix) :].split(".")[0]) for k in state if k.startswith(prefix)}
    return len(indices)


def open_clip_state_dict_to_hf_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an open_clip ``CLIP`` state dict (ViT + built-in text tower) to ``CLIPModel`` keys.

    Fused attention ``in_proj`` weights are split into ``q/k/v_proj``; ``proj`` matrices are
    transposed into ``nn.Linear`` weights. Timm/HF towers, attentional pooling, layer scale and
    custom blocks are not supported (``KeyError``).
    """
    out: dict[str, torch.Tensor] = {
        "logit_scale": state["logit_scale"].reshape(()),
        "visual_projection.weight": state["visual.proj"].t(),
        "text_projection.weight": state["text_projection"].t(),
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
    }
    for part in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{part}"] = state[f"visual.ln_pre.{part}"]
        out[f"vision_model.post_layernorm.{part}"] = state[f"visual.ln_post.{part}"]
        out[f"text_model.final_layer_norm.{part}"] = state[f"ln_final.{part}"]
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    text_layers = _count_blocks(state, "transformer.resblocks.")
    out |= _split_blocks(
        state, "visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers
    )
    out |= _split_blocks(state, "transformer.resblocks", "text_model.encoder.layers", text_layers)
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


def convert_open_clip_to_hf_clip(open_clip_dir: Path, path: Path) -> Path:
    """Write a transformers CLIP folder equivalent to the open_clip ``local-dir`` folder given.

    Same weights (see :func:`open_clip_state_dict_to_hf_clip`), exact GELU unless the open_clip
    config asks for QuickGELU, the CLIP BPE tokenizer (same ids) and a ``CLIPImageProcessor`` with
    open_clip's size, mean and std. Only plain ViT + built-in text tower configs are supported.
    Returns ``path``.
    """
    import open_clip
    from transformers import CLIPModel

    raw = json.loads((open_clip_dir / "open_clip_config.json").read_text(encoding="utf-8"))
    config = _hf_clip_config(raw["model_cfg"])
    model = open_clip.create_model(f"local-dir:{open_clip_dir}")
    hf_model = CLIPModel(config)
    hf_model.load_state_dict(open_clip_state_dict_to_hf_clip(model.state_dict()), strict=True)
    pp = model.visual.preprocess_cfg
    return _save_hf_clip(
        hf_model,
        path,
        image_size=int(config.vision_config.image_size),
        mean=pp["mean"],
        std=pp["std"],
    )


# A BERT word-piece vocabulary for the tiny BLIP: caption words, then single characters and their
# continuations, so any lowercase ASCII text tokenizes; [DEC] (BLIP's decoder start) is added.
_BLIP_WORDS = (
    "a photo photography of picture image the an in on with and cat dog man woman sky tree car "
    "table red blue what is this color how many there"
)
_BLIP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'"


def build_tiny_blip(
    path: Path, *, seed: int = 0, vqa: bool = False, size: Literal["tiny", "base"] = "tiny"
) -> Path:
    """Write a tiny random transformers BLIP folder: model, ``BlipProcessor`` (a 32 px
    ``BlipImageProcessor`` and a word-piece ``BertTokenizer`` with BLIP's ``[DEC]`` start token).

    ``vqa=False``: ``BlipForConditionalGeneration`` (captions); ``vqa=True``:
    ``BlipForQuestionAnswering``. Hidden size 32, two layers per part, image 32 / patch 8; the
    weights are drawn wider than usual (std 0.3) so that different images give different
    captions. ``size="base"``: the shapes of Salesforce/blip-image-captioning-base instead
    (ViT-B/16 at 384 px, a 12-layer BERT decoder, a 30,524-token vocabulary padded with made-up
    words), random weights, for benchmarks. Returns ``path``."""
    from transformers import (
        BlipConfig,
        BlipForConditionalGeneration,
        BlipForQuestionAnswering,
        BlipImageProcessor,
        BlipProcessor,
    )

    tokenizer = _blip_tokenizer(30524 if size == "base" else None)
    if size == "base":
        config = BlipConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
                "sep_token_id": tokenizer.sep_token_id,
                "eos_token_id": tokenizer.sep_token_id,
            },
            vision_config={"image_size": 384, "patch_size": 16},
        )
        image_size = 384
    else:
        config, image_size = _tiny_blip_config(tokenizer), 32
    model_cls = BlipForQuestionAnswering if vqa else BlipForConditionalGeneration
    with _seeded(seed):
        model = model_cls(config)
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    return save_hf_folder(path, model, processor)


def _blip_tokenizer(vocab_size: int | None = None) -> Any:
    """A word-piece ``BertTokenizer`` of caption words and characters plus BLIP's ``[DEC]``
    start token; ``vocab_size``: padded with made-up words to that many tokens."""
    from transformers import BertTokenizer

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = [*_BLIP_CHARS, *("##" + c for c in _BLIP_CHARS)]
    words = specials + list(dict.fromkeys([*_BLIP_WORDS.split(), *pieces]))
    if vocab_size is not None:  # [DEC] is added below
        words += [f"w{i}" for i in range(vocab_size - 1 - len(words))]
    tokenizer = BertTokenizer(
        vocab={word: index for index, word in enumerate(words)},
        do_lower_case=True,
        model_max_length=64,
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def build_tiny_blip2(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random transformers BLIP-2 folder (``Blip2ForConditionalGeneration`` with a
    2-layer OPT, 4 query tokens, and a ``Blip2Processor``: 32 px images, the tiny BLIP's
    tokenizer with ``<image>`` added). Weights drawn wide (std 0.3), as for the tiny BLIP.
    Returns ``path``."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    tokenizer = _blip_tokenizer()
    processor = Blip2Processor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        num_query_tokens=4,
    )  # adds the <image> token to the tokenizer
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = Blip2Config(
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        qformer_config={
            **small,
            "num_attention_heads": 2,
            "encoder_hidden_size": 32,
            "vocab_size": len(tokenizer),
        },
        text_config={
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "ffn_dim": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 64,
            "word_embed_proj_dim": 32,
            "init_std": 0.3,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    with _seeded(seed):
        model = Blip2ForConditionalGeneration(config)
    return save_hf_folder(path, model, processor)


def _tiny_blip_config(tokenizer: Any) -> Any:
    from transformers import BlipConfig

    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "encoder_hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "initializer_range": 0.3,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "initializer_range": 0.3,
    }
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
