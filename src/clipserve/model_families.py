"""The model families clipserve serves, how to point the registry at each, and how each is tested
(``clipserve models --families``; the README's table is checked against this one).

Each family's parity test builds a tiny random model of its real architecture at test time and
compares our embeddings with the family's own code path (transformers or open_clip) in fp32.

Not served: M-CLIP (``M-CLIP/XLM-Roberta-Large-Vit-B-32``...), a multilingual text encoder with a
linear projection, distilled into the space of a separate OpenAI CLIP image model. No checkpoint
holds both towers and its text side needs the ``multilingual_clip`` package's own class, while
a registry entry is one model behind one backend; multilingual models that hold both towers
(AltCLIP, open_clip's xlm-roberta ones) are served instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelFamily:
    name: str
    backend: str
    example: Mapping[str, Any]
    """A registry entry (``models.json``) for a real checkpoint of the family."""
    context: str
    """The text context, in tokens."""
    image_input: str
    parity: str
    """What its parity test compares, and to what tolerance."""


def _entry(**fields: Any) -> Mapping[str, Any]:
    return MappingProxyType(fields)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        "CLIP (OpenAI, LAION, DataComp)",
        "open_clip",
        _entry(model_name="ViT-B-32", pretrained="laion2b_s34b_b79k"),
        "77",
        "fixed square (224 px)",
        "open_clip itself 1e-6; transformers on converted weights and torchmetrics 1e-4",
    ),
    ModelFamily(
        "CLIP in transformers (openai/clip-*, fashion-clip)",
        "hf",
        _entry(model_name="patrickjohncyh/fashion-clip", backend="hf"),
        "77",
        "fixed square (224 px)",
        "CLIPModel and torchmetrics' CLIPScore 1e-4",
    ),
    ModelFamily(
        "SigLIP, and SigLIP 2 at a fixed resolution",
        "hf",
        _entry(model_name="google/siglip2-base-patch16-224", backend="hf"),
        "64 (padded to it)",
        "fixed square (224-512 px)",
        "SiglipModel logits 1e-4",
    ),
    ModelFamily(
        "SigLIP 2 NaFlex",
        "hf",
        _entry(model_name="google/siglip2-base-patch16-naflex", backend="hf"),
        "64 (padded to it)",
        "patches at the image's aspect ratio, up to max_num_patches (256)",
        "Siglip2Model 1e-4; batch invariant",
    ),
    ModelFamily(
        "SigLIP through open_clip (timm weights)",
        "open_clip",
        _entry(model_name="hf-hub:timm/ViT-B-16-SigLIP"),
        "64",
        "fixed square",
        "a SigLIP-style tiny open_clip model: bias and sigmoid probabilities (no separate "
        "embedding parity test)",
    ),
    ModelFamily(
        "Long-text CLIPs (Long-CLIP, CLIPModel format)",
        "hf",
        _entry(model_name="/models/longclip-L", backend="hf"),
        "the model's (Long-CLIP: 248)",
        "fixed square (224 px)",
        "CLIPModel 1e-4 at 248 tokens; text_truncated past the model's context",
    ),
    ModelFamily(
        "Other transformers dual encoders (Chinese-CLIP: a BERT text tower)",
        "hf",
        _entry(model_name="OFA-Sys/chinese-clip-vit-base-patch16", backend="hf"),
        "the model's (BERT: 512)",
        "fixed square (224 px)",
        "AutoModel 1e-4 (a BERT text tower beside a ViT)",
    ),
    ModelFamily(
        "Multilingual CLIPs in transformers (AltCLIP, AltCLIP-m9/m18: an XLM-R text tower)",
        "hf",
        _entry(model_name="BAAI/AltCLIP", backend="hf"),
        "the model's (XLM-R: 512, its 514 positions less the offset)",
        "fixed square (224 px)",
        "AltCLIPModel 1e-4 (an XLM-R tokenizer and text tower beside a CLIP ViT); batch invariant",
    ),
    ModelFamily(
        "Mobile CLIPs (MobileCLIP, MobileCLIP2)",
        "open_clip",
        _entry(model_name="MobileCLIP-S1", pretrained="datacompdr"),
        "77",
        "fixed square (256 px)",
        "open_clip itself 1e-4 (MobileCLIP-S1's real architecture, random weights)",
    ),
    ModelFamily(
        "TinyCLIP (the hub's checkpoints are CLIPModel)",
        "hf",
        _entry(model_name="wkcn/TinyCLIP-ViT-8M-16-Text-3M-YFCC15M", backend="hf"),
        "77",
        "fixed square (224 px)",
        "CLIPModel 1e-4, and open_clip on the same weights 1e-4 (TinyCLIP-ViT-8M/16 Text-3M's "
        "real architecture, random weights); batch invariant",
    ),
    ModelFamily(
        "Multilingual open_clip (xlm-roberta-base-ViT-B-32: an XLM-R text tower)",
        "open_clip",
        _entry(model_name="xlm-roberta-base-ViT-B-32", pretrained="laion5b_s13b_b90k"),
        "77 (open_clip's tokenizer)",
        "fixed square (224 px)",
        "open_clip itself 1e-4 (its layout in a local folder: the text tower from the folder's "
        "own config); batch invariant",
    ),
    ModelFamily(
        "Text-only (sentence-transformers: all-MiniLM-L6-v2...)",
        "sentence-transformers",
        _entry(
            model_name="sentence-transformers/all-MiniLM-L6-v2", backend="sentence-transformers"
        ),
        "the model's (256)",
        "none (texts only)",
        "batch invariant 1e-5, on the real all-MiniLM-L6-v2 shipped offline",
    ),
)
