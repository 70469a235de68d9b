"""HfClipBackend on tiny seeded CLIP and SigLIP folders: parity with transformers, torchmetrics,
preprocessing without torch operators."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from clipserve.errors import ModelLoadError
from clipserve.models import hf_backend
from clipserve.models.base import Backend, clip_scores
from clipserve.models.hf_backend import HfClipBackend
from clipserve.models.quantize import INT8

NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def _load(folder: Path) -> HfClipBackend:
    return HfClipBackend.load(str(folder), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def clip(tiny_dirs: dict[str, Path]) -> HfClipBackend:
    return _load(tiny_dirs["hf_clip"])


@pytest.fixture(scope="module")
def siglip(tiny_dirs: dict[str, Path]) -> HfClipBackend:
    return _load(tiny_dirs["hf_siglip"])


@pytest.fixture(scope="module")
def images(photos: dict[str, Image.Image]) -> list[Image.Image]:
    return [photos[name] for name in NAMES]


@pytest.fixture(scope="module")
def texts(captions: dict[str, str]) -> list[str]:
    return [captions[name] for name in NAMES]


def _raw_scores(backend: Backend, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """``100 * cos`` of image i with text i, unclamped."""
    pixels = torch.stack([backend.preprocess(image) for image in images])
    image_emb = backend.encode_images(pixels)
    text_emb = backend.encode_texts(backend.tokenize(texts))
    return 100 * (image_emb * text_emb).sum(-1)


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects ``get_*_features`` to return tensors, as in transformers 4;
    transformers 5 returns a ModelOutput whose ``pooler_output`` is that tensor."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model.get_text_features(*args, **kwargs).pooler_output


def _torchmetrics_loader(folder: Path) -> Callable[[], tuple[Any, Any]]:
    from transformers import CLIPModel, CLIPProcessor

    def load() -> tuple[Any, Any]:
        model = CLIPModel.from_pretrained(str(folder)).eval()
        return _TensorFeatures(model), CLIPProcessor.from_pretrained(str(folder))

    return load


def test_clip_score_matches_torchmetrics(
    clip: HfClipBackend, tiny_dirs: dict[str, Path], images: list[Image.Image], texts: list[str]
) -> None:
    from torchmetrics.functional.multimodal import clip_score

    load = _torchmetrics_loader(tiny_dirs["hf_clip"])
    pixels = torch.stack([clip.preprocess(image) for image in images])
    ours = clip_scores(clip.encode_images(pixels), clip.encode_texts(clip.tokenize(texts)))
    with torch.no_grad():
        reference = torch.stack(
            [
                clip_score(torch.from_numpy(np.array(image)).permute(2, 0, 1), text, load)
                for image, text in zip(images, texts, strict=True)
            ]
        )
    assert np.abs(ours - reference.numpy()).max() <= 1e-4
    assert reference.max() > 1.0  # not a trivial 0 == 0


def test_scores_match_direct_transformers(
    clip: HfClipBackend, tiny_dirs: dict[str, Path], images: list[Image.Image], texts: list[str]
) -> None:
    from transformers import CLIPModel, CLIPProcessor

    folder = str(tiny_dirs["hf_clip"])
    model = CLIPModel.from_pretrained(folder).eval()
    inputs = CLIPProcessor.from_pretrained(folder)(
        text=texts, images=images, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        out = model(**inputs)
    reference_raw = 100 * (out.image_embeds * out.text_embeds).sum(-1)
    raw = _raw_scores(clip, images, texts)
    assert (raw - reference_raw).abs().max() <= 1e-4
    assert (raw.clamp(min=0) - reference_raw.clamp(min=0)).abs().max() <= 1e-4
    assert reference_raw.abs().max() > 1.0
    assert clip.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


def test_siglip_matches_direct_transformers(
    siglip: HfClipBackend, tiny_dirs: dict[str, Path], images: list[Image.Image], texts: list[str]
) -> None:
    from transformers import AutoProcessor, SiglipModel

    folder = str(tiny_dirs["hf_siglip"])
    model = SiglipModel.from_pretrained(folder).eval()
    inputs = AutoProcessor.from_pretrained(folder)(
        text=texts, images=images, padding="max_length", return_tensors="pt"
    )
    with torch.no_grad():  # SigLIP is trained without a text attention mask
        out = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"])
    logits = out.logits_per_image.diagonal()
    cos = _raw_scores(siglip, images, texts) / 100
    ours = cos * siglip.logit_scale + (siglip.logit_bias or 0.0)
    assert (ours - logits).abs().max() <= 1e-4


def _features(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = model.get_image_features(pixel_values=pixels)
    return torch.nn.functional.normalize(output.pooler_output, dim=-1)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_preprocess_equals_the_transformers_processor(
    which: str,
    request: pytest.FixtureRequest,
    tiny_dirs: dict[str, Path],
    photos: dict[str, Image.Image],
    texts: list[str],
) -> None:
    """The PIL + numpy preprocessing gives the pixels and scores of transformers' own (default,
    torchvision) processor: on the four photos, a non-square one and one smaller than the crop."""
    from transformers import AutoModel, AutoProcessor

    backend: HfClipBackend = request.getfixturevalue(which)
    assert backend.info.extra["image_preprocessing"] == "numpy"
    folder = str(tiny_dirs[f"hf_{which}"])
    processor = AutoProcessor.from_pretrained(folder).image_processor
    model = AutoModel.from_pretrained(folder).eval()
    small = photos["coffee"].crop((200, 100, 248, 120))  # 48 x 20, below the 64 px crop
    images = [photos[name] for name in NAMES] + [small]
    reference = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([backend.preprocess(image) for image in images])
    assert (ours - reference).abs().max() == 0.0
    text = backend.encode_texts(backend.tokenize([*texts, texts[1]]))
    expected = 100 * (_features(model, reference) * text).sum(-1)
    got = 100 * (backend.encode_images(ours) * text).sum(-1)
    assert (got - expected).abs().max() <= 1e-4
    assert expected.abs().max() > 1.0


class _RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


_WRAP_NUMPY = {"aten.lift_fresh.default"}
"""What ``torch.from_numpy`` shows up as under a dispatch mode: wrapping, not computing."""


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_preprocess_runs_no_torch_operator(
    which: str,
    request: pytest.FixtureRequest,
    tiny_dirs: dict[str, Path],
    images: list[Image.Image],
) -> None:
    from transformers import AutoProcessor

    backend: HfClipBackend = request.getfixturevalue(which)
    with _RecordOps() as recorder:
        for image in [*images, images[0].convert("RGBA")]:
            backend.preprocess(image)
    assert set(recorder.ops) <= _WRAP_NUMPY
    processor = AutoProcessor.from_pretrained(str(tiny_dirs[f"hf_{which}"])).image_processor
    with _RecordOps() as recorder:  # the recorder does see the processor's ops
        processor(images=images[0], return_tensors="pt")
    assert any("upsample" in op for op in recorder.ops)


def test_unreproducible_processor_falls_back_with_a_warning(
    tiny_dirs: dict[str, Path], images: list[Image.Image], caplog: pytest.LogCaptureFixture
) -> None:
    from transformers import AutoProcessor, CLIPModel

    folder = str(tiny_dirs["hf_clip"])
    processor = AutoProcessor.from_pretrained(folder)
    processor.image_processor.resample = Image.Resampling.NEAREST
    with caplog.at_level(logging.WARNING, logger=hf_backend.__name__):
        backend = HfClipBackend(
            CLIPModel.from_pretrained(folder),
            processor.image_processor,
            processor.tokenizer,
            architecture="clip",
            device="cpu",
            dtype=torch.float32,
            name="tiny",
        )
    assert "resample" in caplog.text
    assert backend.info.extra["image_preprocessing"] == "transformers"
    expected = processor.image_processor(images=images[1], return_tensors="pt")["pixel_values"][0]
    assert torch.equal(backend.preprocess(images[1]), expected)


def test_info_and_logits(clip: HfClipBackend, siglip: HfClipBackend) -> None:
    assert isinstance(clip, Backend)
    assert isinstance(siglip, Backend)
    assert (clip.info.backend, clip.info.architecture, clip.logit_bias) == ("hf", "clip", None)
    assert (clip.info.embed_dim, clip.info.context_length, clip.info.image_size) == (32, 77, 64)
    assert clip.info.modalities == frozenset({"text", "image"})
    assert (clip.info.device, clip.info.dtype) == ("cpu", "float32")
    assert clip.info.memory_bytes >= 4 * clip.info.parameter_count > 0
    assert siglip.info.architecture == "siglip"
    assert siglip.logit_bias == pytest.approx(-10.0)
    assert siglip.logit_scale == pytest.approx(10.0)
    assert (siglip.info.embed_dim, siglip.info.context_length) == (64, 64)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_shapes_batching_and_determinism(
    which: str, request: pytest.FixtureRequest, images: list[Image.Image], texts: list[str]
) -> None:
    backend: HfClipBackend = request.getfixturevalue(which)
    dim = backend.info.embed_dim
    pixels = torch.stack([backend.preprocess(image) for image in images])
    assert pixels.shape == (4, 3, 64, 64)
    assert pixels.dtype == torch.float32
    image_emb = backend.encode_images(pixels)
    text_emb = backend.encode_texts(backend.tokenize(texts))
    for emb in (image_emb, text_emb):
        assert emb.shape == (4, dim)
        assert emb.dtype == torch.float32
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    assert torch.equal(backend.encode_images(pixels), image_emb)
    for i in range(4):
        single_text = backend.encode_texts(backend.tokenize(texts[i : i + 1]))
        torch.testing.assert_close(single_text[0], text_emb[i], atol=1e-5, rtol=0)
        single_image = backend.encode_images(pixels[i : i + 1])
        torch.testing.assert_close(single_image[0], image_emb[i], atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_truncation(which: str, request: pytest.FixtureRequest, long_text: str) -> None:
    backend: HfClipBackend = request.getfixturevalue(which)
    context = backend.info.context_length
    tokens = backend.tokenize([long_text, "a cat"])
    assert tokens.inputs["input_ids"].shape == (2, context)
    assert tokens.truncated == (True, False)
    assert tokens.token_counts[0] > context
    assert 2 <= tokens.token_counts[1] <= 4
    assert backend.encode_texts(tokens).shape == (2, backend.info.embed_dim)


def test_padding_per_architecture(clip: HfClipBackend, siglip: HfClipBackend) -> None:
    clip_tokens = clip.tokenize(["a cat", "a photo of a cat"])
    assert clip_tokens.inputs["input_ids"].shape == (
        2,
        7,
    )  # longest: <start> a photo of a cat <end>
    assert clip_tokens.token_counts == (4, 7)
    siglip_tokens = siglip.tokenize(["a cat"])
    assert set(siglip_tokens.inputs) == {"input_ids"}  # no attention mask, as SigLIP was trained
    assert siglip_tokens.inputs["input_ids"].shape == (1, 64)  # padding="max_length"


def test_empty_batches(clip: HfClipBackend) -> None:
    assert clip.encode_texts(clip.tokenize([])).shape == (0, 32)
    assert clip.encode_images(torch.zeros(0, 3, 64, 64)).shape == (0, 32)


def test_rejects_other_model_types(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="model_type 'bert'"):
        _load(tmp_path)


def test_close(tiny_dirs: dict[str, Path]) -> None:
    backend = _load(tiny_dirs["hf_clip"])
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.encode_images(torch.zeros(1, 3, 64, 64))


def test_concurrent_tokenization_is_consistent(clip: HfClipBackend) -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = [" ".join(["cat"] * (i % 120)) for i in range(200)]
    expected = [clip.tokenize([text]) for text in texts]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda text: clip.tokenize([text]), texts))
    for got, want in zip(results, expected, strict=True):
        assert torch.equal(got.inputs["input_ids"], want.inputs["input_ids"])
        assert got.truncated == want.truncated


# --- precision int8 ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hf_clip", "hf_siglip"])
def test_int8_quantizes_the_linear_layers_and_stays_close_to_fp32(
    kind: str, tiny_dirs: dict[str, Path], images: list[Image.Image], texts: list[str]
) -> None:
    fp32 = _load(tiny_dirs[kind])
    int8 = HfClipBackend.load(str(tiny_dirs[kind]), device="cpu", dtype=INT8)
    model = int8._live_model()  # noqa: SLF001
    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
    # every one, but for the out_proj of SigLIP's MultiheadAttention pooling head
    assert not [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert int8.info.dtype == "int8"
    assert int8.info.extra["quantization"] == "int8-dynamic"
    assert 0 < int8.info.memory_bytes < fp32.info.memory_bytes
    embedded = {}
    for name, backend in (("fp32", fp32), ("int8", int8)):
        pixels = torch.stack([backend.preprocess(image) for image in images])
        embedded[name] = (
            backend.encode_images(pixels),
            backend.encode_texts(backend.tokenize(texts)),
        )
    for got, expected in zip(embedded["int8"], embedded["fp32"], strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-5, rtol=0)
        assert float((got * expected).sum(dim=-1).min()) >= 0.99


# --- SigLIP 2 NaFlex -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipserve.testing.tiny import build_tiny_hf_siglip2

    return build_tiny_hf_siglip2(tmp_path_factory.mktemp("siglip2") / "model", seed=7)


def test_siglip2_naflex_matches_direct_transformers(
    siglip2_dir: Path, images: list[Image.Image], texts: list[str]
) -> None:
    """Our embeddings equal the family's own path (its processor, Siglip2Model) to 1e-4 in
    fp32, for photos of different aspect ratios, and do not depend on the batch."""
    from transformers import AutoProcessor, Siglip2Model

    backend = _load(siglip2_dir)
    assert backend.info.architecture == "siglip2"
    assert backend.info.extra["image_preprocessing"] == "naflex"
    assert backend.logit_bias == pytest.approx(-10.0)
    model = Siglip2Model.from_pretrained(str(siglip2_dir)).eval()
    processor = AutoProcessor.from_pretrained(str(siglip2_dir))
    shapes = {image.size for image in images}
    assert len(shapes) > 1  # aspect ratios differ: patch grids differ
    with torch.no_grad():
        ref_images = model.get_image_features(**processor(images=images, return_tensors="pt"))
        text_inputs = processor(
            text=texts, padding="max_length", max_length=64, return_tensors="pt"
        )
        ref_texts = model.get_text_features(**text_inputs)
    ref_i = torch.nn.functional.normalize(ref_images.pooler_output, dim=-1)
    ref_t = torch.nn.functional.normalize(ref_texts.pooler_output, dim=-1)
    ours_i = backend.encode_images(torch.stack([backend.preprocess(i) for i in images]))
    ours_t = backend.encode_texts(backend.tokenize(texts))
    assert (ours_i - ref_i).abs().max() <= 1e-4
    assert (ours_t - ref_t).abs().max() <= 1e-4
    alone = backend.encode_images(backend.preprocess(images[1]).unsqueeze(0))
    assert float(torch.dot(alone[0], ours_i[1])) >= 1 - 1e-6
    assert set(backend.tokenize(texts).inputs) == {"input_ids", "attention_mask"}


async def test_siglip2_serves_through_the_engine(
    siglip2_dir: Path, make_settings: Callable[..., Any], images: list[Image.Image]
) -> None:
    from clipserve.engine.engine import Engine

    spec = {"model_name": str(siglip2_dir), "backend": "hf"}
    async with Engine(make_settings({"siglip2": spec})) as engine:
        (report,) = await engine.warm_up(["siglip2"])  # blank images in the NaFlex layout
        assert report.error is None
        ranked = await engine.classify("siglip2", images[:2], ["a cat", "a rocket"])
        assert all(c.error is None and len(c.labels) == 2 for c in ranked)


# --- any transformers dual encoder: a BERT text tower beside a ViT (Chinese-CLIP) ----------------


def test_other_dual_encoders_load_through_automodel_and_match_it(
    tmp_path: Path, images: list[Image.Image]
) -> None:
    from transformers import AutoModel, AutoProcessor

    from clipserve.testing.tiny import build_tiny_hf_chinese_clip

    folder = build_tiny_hf_chinese_clip(tmp_path / "chinese-clip", seed=8)
    backend = _load(folder)
    assert backend.info.extra["model_type"] == "chinese_clip"
    assert backend.info.embed_dim == 16
    assert backend.info.context_length == 64
    model = AutoModel.from_pretrained(str(folder)).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    texts = ["a photo of a cat", "a dog on the table with a red car"]
    with torch.no_grad():
        ref_i = model.get_image_features(**processor(images=images, return_tensors="pt"))
        ref_t = model.get_text_features(**processor(text=texts, padding=True, return_tensors="pt"))
    ref_i = torch.nn.functional.normalize(ref_i.pooler_output, dim=-1)
    ref_t = torch.nn.functional.normalize(ref_t.pooler_output, dim=-1)
    ours_i = backend.encode_images(torch.stack([backend.preprocess(i) for i in images]))
    ours_t = backend.encode_texts(backend.tokenize(texts))
    assert (ours_i - ref_i).abs().max() <= 1e-4
    assert (ours_t - ref_t).abs().max() <= 1e-4
    alone = backend.encode_texts(backend.tokenize(texts[:1]))
    assert float(torch.dot(alone[0], ours_t[0])) >= 1 - 1e-6
    assert backend.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))


# --- long-text CLIPs (Long-CLIP: a CLIPModel with 248 text positions) ----------------------------


def test_long_text_clip_takes_its_context_from_the_model(tmp_path: Path) -> None:
    from transformers import CLIPModel, CLIPProcessor

    from clipserve.testing.tiny import (
        OPENAI_MEAN,
        OPENAI_STD,
        _hf_clip_config,
        _save_hf_clip,
        tiny_open_clip_config,
    )

    model_cfg = tiny_open_clip_config()
    model_cfg["text_cfg"] = {**model_cfg["text_cfg"], "context_length": 248}
    torch.manual_seed(9)
    model = CLIPModel(_hf_clip_config(model_cfg))
    folder = _save_hf_clip(
        model, tmp_path / "long-clip", image_size=64, mean=OPENAI_MEAN, std=OPENAI_STD
    )
    backend = _load(folder)
    assert backend.info.context_length == 248
    text = " ".join(["cat"] * 150)  # 152 tokens with start and end: past CLIP's 77
    tokens = backend.tokenize([text, " ".join(["dog"] * 300)])
    assert tokens.token_counts == (152, 302)
    assert tokens.truncated == (False, True)
    processor = CLIPProcessor.from_pretrained(str(folder))
    reference = processor(
        text=[text], padding=True, truncation=True, max_length=248, return_tensors="pt"
    )
    with torch.no_grad():
        expected = CLIPModel.from_pretrained(str(folder)).eval().get_text_features(**reference)
    expected = torch.nn.functional.normalize(expected.pooler_output, dim=-1)
    ours = backend.encode_texts(backend.tokenize([text]))
    assert (ours - expected).abs().max() <= 1e-4
