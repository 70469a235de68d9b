"""Parity per model family (issue 17), for the families whose text tower or shape differs from
plain CLIP's: multilingual CLIPs (an XLM-R text tower beside a CLIP ViT: AltCLIP in transformers,
open_clip's xlm-roberta layout) and TinyCLIP. Each builds a tiny random model of the family's real
architecture at test time and checks that our embeddings and CLIP scores equal the family's own
code path to 1e-4 in fp32, and do not depend on the batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from torch.nn.functional import normalize

from clipserve.models.base import Backend, clip_scores
from clipserve.models.hf_backend import HfClipBackend
from clipserve.models.open_clip_backend import OpenClipBackend, local_text_tower
from clipserve.testing.tiny import convert_open_clip_to_hf_clip
from clipserve.testing.tiny_families import (
    XLM_ROBERTA_TEXT_CFG,
    build_tiny_hf_altclip,
    build_tiny_open_clip_xlm_roberta,
    build_tinyclip,
)

NAMES = ("astronaut", "chelsea", "coffee", "rocket")
MULTILINGUAL = (
    "a photo of a cat",
    "ein Foto einer Katze auf dem Sofa",
    "一只猫的照片",
    "una foto de un perro en el parque, con una pelota roja y un niño",
)
PARITY = 1e-4
"""fp32 embeddings and 0-100 scores against the family's own code path."""


@pytest.fixture(scope="module")
def images(photos: dict[str, Image.Image]) -> list[Image.Image]:
    return [photos[name] for name in NAMES]


def _hf(folder: Path) -> HfClipBackend:
    return HfClipBackend.load(str(folder), device="cpu", dtype=torch.float32)


def _open_clip(folder: Path) -> OpenClipBackend:
    return OpenClipBackend.load(f"local-dir:{folder}", None, device="cpu", dtype=torch.float32)


def _embed(backend: Backend, images: list[Image.Image], texts: list[str]) -> Any:
    pixels = torch.stack([backend.preprocess(image) for image in images])
    return backend.encode_images(pixels), backend.encode_texts(backend.tokenize(texts))


def _assert_same_scores(
    ours: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Embeddings, raw ``100 * cos`` and CLIP scores (clamped at 0) of pair i equal to 1e-4."""
    for got, expected in zip(ours, reference, strict=True):
        assert (got - expected).abs().max() <= PARITY
    raw = 100 * (ours[0] * ours[1]).sum(-1)
    reference_raw = 100 * (reference[0] * reference[1]).sum(-1)
    assert (raw - reference_raw).abs().max() <= PARITY
    expected_scores = reference_raw.clamp(min=0).numpy()
    assert np.abs(clip_scores(*ours) - expected_scores).max() <= PARITY
    assert reference_raw.abs().max() > 1.0  # not a trivial 0 == 0


def _assert_batch_invariant(backend: Backend, images: list[Image.Image], texts: list[str]) -> None:
    """Each pair alone, and the batch in reverse order, give the batch's embeddings (cosine
    >= 1 - 1e-6) and scores (1e-5 on the 0-100 scale): never bit-equality across batches."""
    image_emb, text_emb = _embed(backend, images, texts)
    scores = clip_scores(image_emb, text_emb)
    reverse_image, reverse_text = _embed(backend, images[::-1], texts[::-1])
    assert np.abs(clip_scores(reverse_image, reverse_text)[::-1] - scores).max() <= 1e-5
    for i in range(len(images)):
        alone_image, alone_text = _embed(backend, images[i : i + 1], texts[i : i + 1])
        assert float(torch.dot(alone_image[0], image_emb[i])) >= 1 - 1e-6
        assert float(torch.dot(alone_text[0], text_emb[i])) >= 1 - 1e-6
        assert abs(float(clip_scores(alone_image, alone_text)[0]) - float(scores[i])) <= 1e-5


# --- multilingual: AltCLIP (transformers: an XLM-R text tower beside a CLIP ViT) -----------------


@pytest.fixture(scope="module")
def altclip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_hf_altclip(tmp_path_factory.mktemp("altclip") / "model", seed=11)


def _altclip_reference(folder: Path, images: list[Image.Image], texts: list[str]) -> Any:
    """AltCLIPModel's own features of AltCLIPProcessor's inputs, L2-normalised."""
    from transformers import AltCLIPModel, AutoProcessor

    model = AltCLIPModel.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    text_inputs = processor(text=texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image_out = model.get_image_features(**processor(images=images, return_tensors="pt"))
        text_out = model.get_text_features(**text_inputs)
    scale = float(model.logit_scale.detach().exp())
    return normalize(image_out.pooler_output), normalize(text_out.pooler_output), scale


def test_altclip_equals_altclipmodel(altclip_dir: Path, images: list[Image.Image]) -> None:
    backend = _hf(altclip_dir)
    assert backend.info.extra["model_type"] == "altclip"
    assert (backend.info.architecture, backend.logit_bias) == ("clip", None)
    assert (backend.info.embed_dim, backend.info.image_size) == (16, 32)
    assert backend.info.context_length == 512  # XLM-R: 514 positions
    texts = list(MULTILINGUAL)
    ref_images, ref_texts, scale = _altclip_reference(altclip_dir, images, texts)
    _assert_same_scores(_embed(backend, images, texts), (ref_images, ref_texts))
    assert backend.logit_scale == pytest.approx(scale)
    assert backend.tokenize(["一只猫"]).inputs["input_ids"][0, 0] == 0  # <s>, as XLM-R's
    _assert_batch_invariant(backend, images, texts)


def test_altclip_context_is_what_its_positions_hold(
    tmp_path: Path, images: list[Image.Image]
) -> None:
    """With a tokenizer that sets no limit, the context still stops at 512: XLM-R numbers its
    514 positions from padding_idx + 1, and a 513th token would index past the table."""
    folder = build_tiny_hf_altclip(tmp_path / "no-limit", seed=12, model_max_length=None)
    backend = _hf(folder)
    assert backend.info.context_length == 512
    long_text = " ".join(["ein Foto einer Katze"] * 200)
    tokens = backend.tokenize([long_text, "a photo of a cat"])
    assert tokens.inputs["input_ids"].shape == (2, 512)
    assert tokens.truncated == (True, False)
    assert tokens.token_counts[0] > 512
    ours = backend.encode_texts(tokens)
    from transformers import AltCLIPModel, AutoProcessor

    model = AltCLIPModel.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    inputs = processor(
        text=[long_text, "a photo of a cat"],
        padding=True,
        truncation=True,
        max_length=512,
        return_tensors="pt",
    )
    with torch.no_grad():
        expected = normalize(model.get_text_features(**inputs).pooler_output)
    assert (ours - expected).abs().max() <= PARITY


# --- multilingual: open_clip's xlm-roberta-base-ViT-B-32 layout (an HF text tower) ---------------


@pytest.fixture(scope="module")
def xlm_roberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("open-clip-xlmr")
    return build_tiny_open_clip_xlm_roberta(root / "model", seed=13)


def test_open_clip_text_tower_is_found_in_the_folder(xlm_roberta_dir: Path, tmp_path: Path) -> None:
    name = f"local-dir:{xlm_roberta_dir}"
    kwargs = local_text_tower(name)
    tower = xlm_roberta_dir / XLM_ROBERTA_TEXT_CFG["hf_model_name"]
    assert kwargs["text_cfg"]["hf_model_name"] == str(tower)
    assert kwargs["text_cfg"]["hf_model_pretrained"] is False  # weights: the folder's checkpoint
    assert kwargs["text_cfg"]["hf_pooler_type"] == "mean_pooler"
    assert local_text_tower("xlm-roberta-base-ViT-B-32") == {}  # built-in names: open_clip's way
    assert local_text_tower("hf-hub:org/repo") == {}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "open_clip_config.json").write_text('{"model_cfg": {"text_cfg": {"width": 64}}}')
    assert local_text_tower(f"local-dir:{plain}") == {}


def test_open_clip_xlm_roberta_equals_open_clip_itself(
    xlm_roberta_dir: Path, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference is open_clip's own path, run from inside the folder: there, and only
    there, open_clip itself resolves the config's relative ``"xlm-roberta-base"``."""
    backend = _open_clip(xlm_roberta_dir)
    info = backend.info
    assert (info.embed_dim, info.image_size, info.architecture) == (16, 32, "clip")
    assert info.context_length == 77  # open_clip's tokenizer default: the config sets none
    assert info.extra["tokenizer"] == "HFTokenizer"
    texts = list(MULTILINGUAL)
    name = f"local-dir:{xlm_roberta_dir}"
    monkeypatch.chdir(xlm_roberta_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    assert isinstance(model, open_clip.CustomTextCLIP)
    with torch.no_grad():
        ref_images = model.eval().encode_image(torch.stack([preprocess(i) for i in images]), True)
        ref_texts = model.encode_text(tokenizer(texts), normalize=True)
    assert torch.equal(backend.tokenize(texts).inputs["input_ids"], tokenizer(texts))
    _assert_same_scores(_embed(backend, images, texts), (ref_images, ref_texts))
    assert backend.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    _assert_batch_invariant(backend, images, texts)


def test_open_clip_xlm_roberta_truncates_at_its_context(xlm_roberta_dir: Path) -> None:
    backend = _open_clip(xlm_roberta_dir)
    tokens = backend.tokenize([" ".join(["une photo d'un chat"] * 40), "a photo of a cat"])
    assert tokens.inputs["input_ids"].shape == (2, 77)
    assert tokens.truncated == (True, False)
    assert tokens.token_counts[0] > 77
    assert backend.encode_texts(tokens).shape == (2, 16)


# --- TinyCLIP (TinyCLIP-ViT-8M/16 Text-3M's architecture: hub checkpoints are CLIPModel) ---------


@pytest.fixture(scope="module")
def tinyclip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tinyclip")
    open_clip_dir = build_tinyclip(root / "open_clip", seed=14)
    return {
        "open_clip": open_clip_dir,
        "hf": convert_open_clip_to_hf_clip(open_clip_dir, root / "hf"),
    }


def test_tinyclip_in_transformers_equals_clipmodel(
    tinyclip_dirs: dict[str, Path], images: list[Image.Image], captions: dict[str, str]
) -> None:
    from transformers import CLIPModel, CLIPProcessor

    backend = _hf(tinyclip_dirs["hf"])
    model = CLIPModel.from_pretrained(str(tinyclip_dirs["hf"])).eval()
    vision, text = model.config.vision_config, model.config.text_config
    shape = ("hidden_size", "num_hidden_layers", "num_attention_heads")
    assert tuple(getattr(vision, field) for field in shape) == (256, 10, 4)
    assert tuple(getattr(text, field) for field in shape) == (256, 3, 4)
    assert (vision.patch_size, vision.image_size, model.config.projection_dim) == (16, 224, 512)
    info = backend.info
    assert (info.embed_dim, info.context_length, info.image_size) == (512, 77, 224)
    assert 23_000_000 < info.parameter_count < 24_000_000
    texts = [captions[name] for name in NAMES]
    processor = CLIPProcessor.from_pretrained(str(tinyclip_dirs["hf"]))
    with torch.no_grad():
        out = model(**processor(text=texts, images=images, return_tensors="pt", padding=True))
    _assert_same_scores(_embed(backend, images, texts), (out.image_embeds, out.text_embeds))
    _assert_batch_invariant(backend, images, texts)


def test_tinyclip_in_open_clip_equals_open_clip_and_transformers(
    tinyclip_dirs: dict[str, Path], images: list[Image.Image], captions: dict[str, str]
) -> None:
    backend = _open_clip(tinyclip_dirs["open_clip"])
    assert (backend.info.embed_dim, backend.info.image_size) == (512, 224)
    texts = [captions[name] for name in NAMES]
    name = f"local-dir:{tinyclip_dirs['open_clip']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        ref_images = model.eval().encode_image(torch.stack([preprocess(i) for i in images]), True)
        ref_texts = model.encode_text(tokenizer(texts), normalize=True)
    ours = _embed(backend, images, texts)
    _assert_same_scores(ours, (ref_images, ref_texts))
    _assert_batch_invariant(backend, images, texts)
    # the same weights in the hub's format, given the same pixels: the two backends agree
    hf = _hf(tinyclip_dirs["hf"])
    pixels = torch.stack([backend.preprocess(image) for image in images])
    _assert_same_scores((hf.encode_images(pixels), hf.encode_texts(hf.tokenize(texts))), ours)
