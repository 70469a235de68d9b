"""Tiny model builders: offline loading, seeding, tokenizer ids, the open_clip -> HF converter."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from clipserve.testing.tiny import (
    build_tiny_hf_clip,
    build_tiny_hf_siglip,
    build_tiny_open_clip,
    clip_bpe_tokenizer,
    convert_open_clip_to_hf_clip,
)

TEXTS = [
    "a photo of a cat",
    "Hello, World! It's 2024... naïve café",
    "  multiple   spaces\tand\nnewlines ",
    "don't stop-believing #hashtag @user 123456",
    "日本語のテキスト and emoji 😀",
]


@pytest.fixture(scope="module")
def open_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_open_clip(tmp_path_factory.mktemp("tiny") / "open_clip", seed=0)


def test_open_clip_folder_loads_offline(open_clip_dir: Path) -> None:
    assert {p.name for p in open_clip_dir.iterdir()} == {
        "open_clip_config.json",
        "open_clip_model.safetensors",
    }
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{open_clip_dir}")
    assert model.visual.image_size == (64, 64)
    assert model.logit_bias is None
    with torch.no_grad():
        assert model.encode_image(torch.zeros(1, 3, 64, 64)).shape == (1, 32)


def test_open_clip_is_seeded_and_leaves_the_rng_alone(tmp_path: Path, open_clip_dir: Path) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    same = load_file(
        build_tiny_open_clip(tmp_path / "same", seed=0) / "open_clip_model.safetensors"
    )
    assert torch.equal(torch.random.get_rng_state(), before)
    reference = load_file(open_clip_dir / "open_clip_model.safetensors")
    other = load_file(
        build_tiny_open_clip(tmp_path / "other", seed=1) / "open_clip_model.safetensors"
    )
    assert all(torch.equal(same[k], reference[k]) for k in reference)
    assert not torch.equal(other["visual.proj"], reference["visual.proj"])


def test_open_clip_siglip_variant(tmp_path: Path) -> None:
    folder = build_tiny_open_clip(tmp_path / "siglip", siglip=True)
    model = open_clip.create_model(f"local-dir:{folder}")
    assert float(model.logit_bias.detach()) == pytest.approx(-10.0)
    assert isinstance(open_clip.get_tokenizer(f"local-dir:{folder}"), open_clip.SimpleTokenizer)


def test_clip_tokenizer_ids_equal_open_clip() -> None:
    reference = open_clip.get_tokenizer("ViT-B-32")
    tokenizer = clip_bpe_tokenizer()
    assert len(tokenizer) == 49408
    for text in TEXTS:
        ids = reference([text])[0]
        assert tokenizer(text)["input_ids"] == ids[ids != 0].tolist(), text


def test_hf_clip_folder_loads_offline(tmp_path: Path) -> None:
    from transformers import AutoProcessor, CLIPModel, CLIPProcessor

    folder = build_tiny_hf_clip(tmp_path / "hf_clip")
    model = CLIPModel.from_pretrained(str(folder))
    assert model.config.projection_dim == 32
    assert model.config.vision_config.image_size == 64
    assert model.config.text_config.hidden_act == "gelu"
    processor = CLIPProcessor.from_pretrained(str(folder))
    assert type(AutoProcessor.from_pretrained(str(folder))) is type(processor)
    inputs = processor(text=["a cat"], return_tensors="pt")
    assert inputs["input_ids"].tolist() == [[49406, 320, 2368, 49407]]
    again = CLIPModel.from_pretrained(str(build_tiny_hf_clip(tmp_path / "again")))
    assert torch.equal(again.visual_projection.weight, model.visual_projection.weight)


def test_hf_siglip_folder_loads_offline(tmp_path: Path) -> None:
    from transformers import AutoProcessor, SiglipModel

    folder = build_tiny_hf_siglip(tmp_path / "hf_siglip")
    model = SiglipModel.from_pretrained(str(folder))
    processor = AutoProcessor.from_pretrained(str(folder))
    inputs = processor(text=["a photo of a cat"], padding="max_length", return_tensors="pt")
    assert inputs["input_ids"].shape == (1, 64)
    assert inputs["input_ids"][0, -1] == 1  # padded with eos/pad id 1
    assert float(model.logit_bias.detach()) == pytest.approx(-10.0)
    with torch.no_grad():
        features = model.get_text_features(input_ids=inputs["input_ids"]).pooler_output
    assert features.shape == (1, 64)


def test_converted_model_computes_what_open_clip_computes(
    tmp_path: Path, open_clip_dir: Path
) -> None:
    from transformers import CLIPModel

    folder = convert_open_clip_to_hf_clip(open_clip_dir, tmp_path / "converted")
    hf_model = CLIPModel.from_pretrained(str(folder)).eval()
    model = open_clip.create_model(f"local-dir:{open_clip_dir}").eval()
    tokens = open_clip.get_tokenizer(f"local-dir:{open_clip_dir}")(TEXTS)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_images = hf_model.get_image_features(pixel_values=pixels).pooler_output
        hf_texts = hf_model.get_text_features(input_ids=tokens).pooler_output
        torch.testing.assert_close(hf_images, model.encode_image(pixels), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hf_texts, model.encode_text(tokens), atol=1e-5, rtol=1e-5)
    assert float(hf_model.logit_scale.detach()) == pytest.approx(float(model.logit_scale.detach()))
