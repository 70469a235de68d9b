"""Tiny, seeded models of the families whose text tower or shape differs from plain CLIP's, built
on the fly with no downloads (the plain CLIP/SigLIP ones are in :mod:`clipserve.testing.tiny`):

* multilingual CLIPs, an XLM-R text tower beside a CLIP ViT: :func:`build_tiny_hf_altclip`
  (transformers' ``AltCLIPModel``) and :func:`build_tiny_open_clip_xlm_roberta` (open_clip's
  ``xlm-roberta-base-ViT-B-32`` layout: an HF text tower in a ``local-dir:`` folder), both with
  :func:`xlm_roberta_tokenizer`, trained at build time;
* TinyCLIP: :func:`build_tinyclip`, TinyCLIP-ViT-8M/16 Text-3M's architecture at its real size
  (an open_clip folder; :func:`~clipserve.testing.tiny.convert_open_clip_to_hf_clip` gives the
  transformers ``CLIPModel`` format the hub's TinyCLIP checkpoints use).

The weights are random: embeddings are meaningless but deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from clipserve.testing.tiny import _SIGLIP_CORPUS, _seeded, save_hf_folder, save_open_clip_folder

__all__ = [
    "XLM_ROBERTA_TEXT_CFG",
    "build_tiny_hf_altclip",
    "build_tiny_open_clip_xlm_roberta",
    "build_tinyclip",
    "tinyclip_config",
    "xlm_roberta_tokenizer",
]

_MULTILINGUAL_CORPUS = (
    *_SIGLIP_CORPUS,
    "ein Foto einer Katze auf dem Sofa",
    "une photo d'un chat sur la table",
    "una foto de un perro en el parque",
    "一只猫的照片",
    "桌子上的一杯咖啡",
    "äöüß éèêàç ñ",
)
_XLM_R_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as XLM-R's; <mask> comes last
_XLM_R_POSITIONS = 514
"""XLM-R's position table: positions are numbered from ``pad_token_id + 1`` (2), so it holds 512
tokens."""

XLM_ROBERTA_TEXT_CFG: Mapping[str, str] = MappingProxyType(
    {
        "hf_model_name": "xlm-roberta-base",
        "hf_tokenizer_name": "xlm-roberta-base",
        "hf_pooler_type": "mean_pooler",
    }
)
"""The ``text_cfg`` of open_clip's ``xlm-roberta-base-ViT-B-32`` (its HF text tower)."""


def tinyclip_config() -> dict[str, Any]:
    """A fresh copy of TinyCLIP-ViT-8M/16 Text-3M's open_clip ``model_cfg`` (TinyCLIP's own
    configuration, in microsoft/Cream ``TinyCLIP/src/open_clip/model_configs``): 256-wide towers
    with 64-wide heads, 10 image and 3 text layers, projected up to 512; the architecture of the
    hub's ``wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M``. open_clip 3.3 ships no TinyCLIP config."""
    return {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 10, "width": 256, "patch_size": 16},
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 256,
            "heads": 4,
            "layers": 3,
        },
    }


def xlm_roberta_tokenizer(model_max_length: int | None = 512) -> Any:
    """A transformers ``XLMRobertaTokenizer`` trained now on a small built-in corpus (English,
    German, French, Spanish and Chinese captions, the alphabet): a sentencepiece-style Unigram
    model (tokenizers' ``UnigramTrainer``, no sentencepiece or protobuf needed) behind XLM-R's
    pre-tokenizer and specials (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last).
    About 230 pieces; unseen characters become ``<unk>``. ``model_max_length=None``: no limit,
    as a ``tokenizer_config.json`` that does not set one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import XLMRobertaTokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=400, special_tokens=list(_XLM_R_SPECIALS), unk_token="<unk>"
    )
    unigram.train_from_iterator(_MULTILINGUAL_CORPUS, trainer)
    return XLMRobertaTokenizer(vocab=_stable_vocab(unigram), model_max_length=model_max_length)


def _stable_vocab(unigram: Any) -> list[tuple[str, float]]:
    """The trained pieces with XLM-R's specials first, then by score and piece, scores rounded
    to 1e-6: the trainer sums in parallel, so its scores differ run to run in the last bits
    (~1e-14) and its order of equal scores varies; rounded and sorted, ids are reproducible."""
    trained = json.loads(unigram.to_str())["model"]["vocab"]
    pieces = sorted(
        (
            (str(piece), round(float(score), 6))
            for piece, score in trained
            if piece not in _XLM_R_SPECIALS
        ),
        key=lambda item: (-item[1], item[0]),
    )
    return [(token, 0.0) for token in _XLM_R_SPECIALS] + pieces


def _xlm_roberta_text(tokenizer: Any, **fields: Any) -> dict[str, Any]:
    """A tiny XLM-R text config (hidden 32, 2 layers, 2 heads) with XLM-R's ids and positions."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": _XLM_R_POSITIONS,
        "type_vocab_size": 1,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **fields,
    }


def build_tiny_hf_altclip(path: Path, *, seed: int = 0, model_max_length: int | None = 512) -> Path:
    """Write a tiny random transformers AltCLIP folder: ``AltCLIPModel`` (an XLM-R text tower,
    hidden 32, 2 layers, 514 positions as XLM-R's, pooled and projected 32 -> 24 -> 16, beside a
    CLIP ViT: image 32 / patch 8, hidden 32) and an ``AltCLIPProcessor`` (a 32 px
    ``CLIPImageProcessor`` and :func:`xlm_roberta_tokenizer` with ``model_max_length``).
    ``AutoModel`` loads it: a multilingual dual encoder that is not CLIP's own class.
    Returns ``path``."""
    from transformers import AltCLIPConfig, AltCLIPModel, AltCLIPProcessor, CLIPImageProcessor

    tokenizer = xlm_roberta_tokenizer(model_max_length)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = AltCLIPConfig(
        text_config=_xlm_roberta_text(tokenizer, project_dim=24),
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    with _seeded(seed):
        model = AltCLIPModel(config)
    processor = AltCLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
    )
    return save_hf_folder(path, model, processor)


def build_tiny_open_clip_xlm_roberta(path: Path, *, seed: int = 0) -> Path:
    """Write a tiny random open_clip folder in the layout of ``xlm-roberta-base-ViT-B-32``: a
    ``CustomTextCLIP`` whose text tower is a transformers XLM-R (hidden 32, 2 layers, mean
    pooled, open_clip's MLP projection 32 -> 24 -> 16) beside a ViT (image 32 / patch 8, width
    32, 2 layers). Load it with ``model_name=f"local-dir:{path}"``.

    Like a downloaded hub folder of that model, ``open_clip_config.json`` names the text tower
    ``"xlm-roberta-base"`` (:data:`XLM_ROBERTA_TEXT_CFG`) and the tokenizer files are at the top
    (open_clip's ``HFTokenizer`` reads a ``local-dir:``'s own); the folder adds an
    ``xlm-roberta-base/`` subfolder holding the tower's transformers ``config.json`` (its weights
    are in ``open_clip_model.safetensors``). open_clip alone looks the name up on the hub (or
    relative to the working directory); clipserve's open_clip backend finds the subfolder.
    Returns ``path``."""
    import open_clip
    from transformers import XLMRobertaConfig

    tokenizer = xlm_roberta_tokenizer()
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(path))
    text_dir = path / XLM_ROBERTA_TEXT_CFG["hf_model_name"]
    XLMRobertaConfig(**_xlm_roberta_text(tokenizer)).save_pretrained(str(text_dir))
    vision_cfg = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
    text_cfg = dict(XLM_ROBERTA_TEXT_CFG)
    with _seeded(seed):
        model = open_clip.CustomTextCLIP(
            embed_dim=16,
            vision_cfg=vision_cfg,
            text_cfg={**text_cfg, "hf_model_name": str(text_dir), "hf_model_pretrained": False},
        )
    model_cfg = {"embed_dim": 16, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    return save_open_clip_folder(model, model_cfg, path)


def build_tinyclip(path: Path, *, seed: int = 0) -> Path:
    """Write an open_clip ``local-dir:`` folder of TinyCLIP-ViT-8M/16 Text-3M's architecture
    (:func:`tinyclip_config`, 224 px, 23M parameters: 94 MB) with random weights.
    Returns ``path``."""
    import open_clip

    with _seeded(seed):
        model = open_clip.CLIP(**tinyclip_config())
    return save_open_clip_folder(model, tinyclip_config(), path)
