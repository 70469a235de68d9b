"""OpenClipBackend on tiny seeded models: parity with open_clip and transformers, batching."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipserve.errors import ModelLoadError
from clipserve.models.base import Backend, clip_scores
from clipserve.models.open_clip_backend import (
    MAX_TOKEN_CHARS,
    MAX_WORD_CHARS,
    OpenClipBackend,
    _BoundedCache,
    _PilThenNumpy,
    bounded_text,
    resolve_open_clip_source,
)
from clipserve.models.quantize import INT8

NAMES = ("astronaut", "chelsea", "coffee", "rocket")


def _load(folder: Path) -> OpenClipBackend:
    return OpenClipBackend.load(f"local-dir:{folder}", None, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def backend(tiny_dirs: dict[str, Path]) -> OpenClipBackend:
    return _load(tiny_dirs["open_clip"])


@pytest.fixture(scope="module")
def siglip_backend(tiny_dirs: dict[str, Path]) -> OpenClipBackend:
    return _load(tiny_dirs["open_clip_siglip"])


@pytest.fixture(scope="module")
def images(photos: dict[str, Image.Image]) -> list[Image.Image]:
    return [photos[name] for name in NAMES]


@pytest.fixture(scope="module")
def texts(captions: dict[str, str]) -> list[str]:
    return [captions[name] for name in NAMES]


def _embed(backend: Backend, images: list[Image.Image], texts: list[str]) -> Any:
    pixels = torch.stack([backend.preprocess(image) for image in images])
    return backend.encode_images(pixels), backend.encode_texts(backend.tokenize(texts))


def test_is_a_backend_with_expected_info(backend: OpenClipBackend) -> None:
    assert isinstance(backend, Backend)
    info = backend.info
    assert (info.backend, info.architecture) == ("open_clip", "clip")
    assert (info.embed_dim, info.context_length, info.image_size) == (32, 77, 64)
    assert info.modalities == frozenset({"text", "image"})
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.parameter_count > 3_000_000
    assert info.memory_bytes >= 4 * info.parameter_count
    assert backend.logit_bias is None
    assert backend.logit_scale == pytest.approx(1 / 0.07, rel=1e-5)  # exp(log(1/0.07))


def test_siglip_variant_has_bias(siglip_backend: OpenClipBackend) -> None:
    assert siglip_backend.info.architecture == "siglip"
    assert siglip_backend.logit_bias == pytest.approx(-10.0)


def test_shapes_norms_dtype_and_determinism(
    backend: OpenClipBackend, images: list[Image.Image], texts: list[str]
) -> None:
    pixels = backend.preprocess(images[0])
    assert pixels.shape == (3, 64, 64)
    assert pixels.dtype == torch.float32
    image_emb, text_emb = _embed(backend, images, texts)
    for emb in (image_emb, text_emb):
        assert emb.shape == (4, 32)
        assert emb.dtype == torch.float32
        assert emb.device.type == "cpu"
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    again = _embed(backend, images, texts)
    assert torch.equal(again[0], image_emb)
    assert torch.equal(again[1], text_emb)


def test_reloading_gives_identical_embeddings(
    backend: OpenClipBackend, tiny_dirs: dict[str, Path], texts: list[str]
) -> None:
    other = _load(tiny_dirs["open_clip"])
    a = backend.encode_texts(backend.tokenize(texts))
    assert torch.equal(other.encode_texts(other.tokenize(texts)), a)


def test_batch_equals_singles(
    backend: OpenClipBackend, images: list[Image.Image], texts: list[str]
) -> None:
    image_emb, text_emb = _embed(backend, images, texts)
    for i in range(len(images)):
        single_image, single_text = _embed(backend, images[i : i + 1], texts[i : i + 1])
        torch.testing.assert_close(single_image[0], image_emb[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(single_text[0], text_emb[i], atol=1e-5, rtol=0)


def test_embeddings_equal_open_clip_itself(
    backend: OpenClipBackend,
    tiny_dirs: dict[str, Path],
    images: list[Image.Image],
    texts: list[str],
) -> None:
    name = f"local-dir:{tiny_dirs['open_clip']}"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    with torch.no_grad():
        ref_images = model.eval().encode_image(torch.stack([preprocess(i) for i in images]), True)
        ref_texts = model.encode_text(tokenizer(texts), normalize=True)
    image_emb, text_emb = _embed(backend, images, texts)
    torch.testing.assert_close(image_emb, ref_images, atol=1e-6, rtol=0)
    torch.testing.assert_close(text_emb, ref_texts, atol=1e-6, rtol=0)


def test_truncation_is_reported_not_fatal(backend: OpenClipBackend, long_text: str) -> None:
    tokens = backend.tokenize([long_text, "a cat", ""])
    assert tokens.inputs["input_ids"].shape == (3, 77)
    assert tokens.truncated == (True, False, False)
    assert tokens.token_counts[0] > 77
    assert tokens.token_counts[1:] == (4, 2)  # <start> a cat <end>; <start> <end>
    # the count is exactly what the tokenizer keeps when nothing is truncated
    assert int((tokens.inputs["input_ids"][1] != 0).sum()) == 4
    assert backend.encode_texts(tokens).shape == (3, 32)


def test_hostile_long_words_cost_milliseconds_not_seconds(backend: OpenClipBackend) -> None:
    rng = np.random.default_rng(7)  # random letters: no repeating pattern for the BPE to reuse
    words = ["".join(chr(ord("a") + c) for c in rng.integers(0, 26, n)) for n in (20_000, 2600)]
    marks = "".join(rng.choice(list("!?.,;:-+*/")) for _ in range(3000))
    started = time.perf_counter()
    many = " ".join(words[1][i : i + 40] for i in range(0, 2400, 40))  # 60 random 40-letter words
    tokens = backend.tokenize([*words, marks, many, "a photo of a cat"])
    assert time.perf_counter() - started < 1.0  # uncut: 8 s for the first, 0.5 s for the second
    assert tokens.truncated == (True, True, True, True, False)


def test_bounded_text_keeps_what_reaches_the_context() -> None:
    assert bounded_text("a photo of  a cat", 77, cut_long_words=True) == "a photo of  a cat"
    many = " ".join(f"w{i}" for i in range(200))
    assert bounded_text(many, 77, cut_long_words=True) == " ".join(f"w{i}" for i in range(77))
    assert bounded_text("x" * 100, 77, cut_long_words=True) == "x" * MAX_WORD_CHARS
    assert bounded_text("x" * 100, 77, cut_long_words=False) == "x" * 100
    assert bounded_text("é" * 60 + " ok", 77, cut_long_words=True) == "é" * MAX_WORD_CHARS + " ok"
    assert bounded_text("1" * 60, 77, cut_long_words=True) == "1" * 60  # a digit is a word


def test_words_of_normal_length_tokenize_exactly_as_open_clip(backend: OpenClipBackend) -> None:
    text = "pneumonoultramicroscopicsilicovolcanoconiosis, antidisestablishmentarianism!!!"
    reference = open_clip.get_tokenizer("ViT-B-32")([text], context_length=77)
    assert torch.equal(backend.tokenize([text]).inputs["input_ids"], reference)


def test_cutting_long_texts_keeps_the_tokens_that_fit(
    backend: OpenClipBackend, long_text: str
) -> None:
    text = (long_text + " ") * 40
    assert len(text) > 77 * MAX_TOKEN_CHARS
    reference = open_clip.get_tokenizer("ViT-B-32")([text], context_length=77)
    assert torch.equal(backend.tokenize([text]).inputs["input_ids"], reference)


def test_the_bpe_word_cache_is_bounded() -> None:
    from open_clip.tokenizer import SimpleTokenizer

    plain, bounded = SimpleTokenizer(), SimpleTokenizer()
    special = dict(bounded.cache)
    bounded.cache = _BoundedCache(bounded.cache, 100)
    words = [f"w{i}x{i * 31 % 97}q" for i in range(1000)]
    assert torch.equal(bounded(words), plain(words))  # the same tokens
    assert len(bounded.cache) <= 100 + len(special)
    assert all(bounded.cache[k] == v for k, v in special.items())  # special tokens stay


def test_empty_batches(backend: OpenClipBackend) -> None:
    tokens = backend.tokenize([])
    assert len(tokens) == 0
    assert backend.encode_texts(tokens).shape == (0, 32)
    assert backend.encode_images(torch.zeros(0, 3, 64, 64)).shape == (0, 32)


def test_preprocess_converts_other_modes(backend: OpenClipBackend) -> None:
    gray = Image.new("L", (80, 50), color=128)
    assert backend.preprocess(gray).shape == (3, 64, 64)


def _hf_reference(folder: Path, pixels: torch.Tensor | None, images: Any, texts: list[str]) -> Any:
    """Raw ``100 * cos`` from transformers' CLIPModel + CLIPProcessor (forward, not our code)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPProcessor.from_pretrained(str(folder))
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    if pixels is not None:
        inputs["pixel_values"] = pixels
    with torch.no_grad():
        out = model(**inputs)
    return 100 * (out.image_embeds * out.text_embeds).sum(-1), inputs["input_ids"]


def test_scores_match_transformers_on_converted_weights(
    backend: OpenClipBackend,
    tiny_dirs: dict[str, Path],
    images: list[Image.Image],
    texts: list[str],
) -> None:
    pixels = torch.stack([backend.preprocess(image) for image in images])
    image_emb = backend.encode_images(pixels)
    tokens = backend.tokenize(texts)
    text_emb = backend.encode_texts(tokens)
    raw = 100 * (image_emb * text_emb).sum(-1)

    # identical pixel tensors: the two libraries agree to float rounding
    ref_raw, ref_ids = _hf_reference(tiny_dirs["open_clip_as_hf"], pixels, images, texts)
    assert (raw - ref_raw).abs().max() <= 1e-4
    expected = ref_raw.clamp(min=0).numpy()
    assert np.abs(clip_scores(image_emb, text_emb) - expected).max() <= 1e-4
    assert raw.abs().max() > 1.0  # not a trivial 0 == 0
    ids = tokens.inputs["input_ids"][:, : ref_ids.shape[1]]
    assert torch.equal(ids.masked_fill(ids == 0, 49407), ref_ids)  # same token ids

    # end to end, each library preprocessing the photos its own way: CLIPImageProcessor's
    # (torchvision) resize differs by at most 1/255 per pixel, and for an odd crop margin
    # transformers floors the offset where torchvision rounds it: the rocket (640x427 -> 95x64)
    # is cropped from x=15 instead of x=16, a one-pixel shift.
    e2e_raw, _ = _hf_reference(tiny_dirs["open_clip_as_hf"], None, images, texts)
    diff = (raw - e2e_raw).abs()
    assert diff[:3].max() <= 0.01  # measured: 0.0022
    assert diff[3] <= 1.0  # measured: 0.31


def test_resolve_source_mappings(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    assert resolve_open_clip_source("ViT-B-32", "hf-hub:org/repo") == ("hf-hub:org/repo", None)
    folder = tiny_dirs["open_clip"]
    assert resolve_open_clip_source("ViT-B-32", str(folder)) == (f"local-dir:{folder}", None)
    assert resolve_open_clip_source("ViT-B-32", "laion2b_s34b_b79k") == (
        "ViT-B-32",
        "laion2b_s34b_b79k",
    )
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match="checkpoint file set as `pretrained`") as info:
        resolve_open_clip_source("ViT-B-32", str(missing))
    assert str(tmp_path) not in info.value.message  # clients see the message; the log the path
    assert str(missing) in str(info.value.technical)
    with pytest.raises(ModelLoadError, match="open_clip_config.json") as info:
        resolve_open_clip_source(f"local-dir:{tmp_path}", None)
    assert str(tmp_path) not in info.value.message
    assert str(tmp_path) in str(info.value.technical)


def test_close_releases_the_model(tiny_dirs: dict[str, Path]) -> None:
    backend = _load(tiny_dirs["open_clip"])
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.encode_texts(backend.tokenize(["a cat"]))


@pytest.mark.parametrize(
    ("image_size", "resize_mode", "mean", "std"),
    [
        (224, "shortest", None, None),  # CLIP defaults (ViT-B-32, ViT-L-14)
        (256, "squash", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # SigLIP-style
    ],
)
def test_numpy_tail_is_bit_identical_to_open_clips_transform(
    photos: dict[str, Any],
    image_size: int,
    resize_mode: str,
    mean: tuple[float, ...] | None,
    std: tuple[float, ...] | None,
) -> None:
    transform = open_clip.image_transform(
        image_size, is_train=False, mean=mean, std=std, resize_mode=resize_mode
    )
    fast = _PilThenNumpy.wrap(transform)
    assert fast is not None
    for photo in [*photos.values(), photos["chelsea"].convert("L").convert("RGB")]:
        assert torch.equal(fast(photo), transform(photo))


def test_backend_uses_the_numpy_tail(backend: OpenClipBackend) -> None:
    assert isinstance(backend._preprocess, _PilThenNumpy)


def test_text_runs_on_the_used_length_and_equals_the_full_context(
    backend: OpenClipBackend, texts: list[str], long_text: str
) -> None:
    batch = [*texts, "x", long_text]  # short, one-word and truncated texts in one batch
    tokens = backend.tokenize(batch)
    with torch.inference_mode():
        full = backend._live_model().encode_text(tokens.inputs["input_ids"])  # noqa: SLF001
    expected = torch.nn.functional.normalize(full.float(), dim=-1)
    assert backend._trimmable  # noqa: SLF001
    torch.testing.assert_close(backend.encode_texts(tokens), expected, atol=1e-6, rtol=0)
    short = backend.tokenize(texts[:1])
    with torch.inference_mode():
        full_short = backend._live_model().encode_text(short.inputs["input_ids"])  # noqa: SLF001
    torch.testing.assert_close(
        backend.encode_texts(short),
        torch.nn.functional.normalize(full_short.float(), dim=-1),
        atol=1e-6,
        rtol=0,
    )


# --- precision int8 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_backend(tiny_dirs: dict[str, Path]) -> OpenClipBackend:
    return OpenClipBackend.load(
        f"local-dir:{tiny_dirs['open_clip']}", None, device="cpu", dtype=INT8
    )


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(dim=-1).min())


def test_int8_quantizes_the_linear_layers_and_says_so(
    int8_backend: OpenClipBackend, backend: OpenClipBackend
) -> None:
    model = int8_backend._live_model()  # noqa: SLF001
    quantized = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == 8  # c_fc and c_proj of 2 image and 2 text blocks
    # only MultiheadAttention's out_proj (a NonDynamicallyQuantizableLinear) stays float
    assert not [m for m in model.modules() if type(m) is torch.nn.Linear]
    info = int8_backend.info
    assert info.dtype == "int8"
    assert info.extra["quantization"] == "int8-dynamic"
    assert "quantization" not in backend.info.extra
    assert info.parameter_count == backend.info.parameter_count
    assert 0 < info.memory_bytes < backend.info.memory_bytes


def test_int8_embeddings_are_unit_norm_and_close_to_fp32(
    int8_backend: OpenClipBackend,
    backend: OpenClipBackend,
    images: list[Image.Image],
    texts: list[str],
) -> None:
    image_emb, text_emb = _embed(int8_backend, images, texts)
    ref_image, ref_text = _embed(backend, images, texts)
    assert image_emb.dtype == text_emb.dtype == torch.float32
    for emb in (image_emb, text_emb):
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(NAMES)), atol=1e-5, rtol=0)
    assert _min_cosine(image_emb, ref_image) >= 0.99
    assert _min_cosine(text_emb, ref_text) >= 0.99


def test_int8_trimmed_text_matches_open_clips_own_full_context(
    int8_backend: OpenClipBackend, texts: list[str]
) -> None:
    assert int8_backend._trimmable  # noqa: SLF001
    tokens = int8_backend.tokenize(texts)
    with torch.inference_mode():
        full = int8_backend._live_model().encode_text(tokens.inputs["input_ids"])  # noqa: SLF001
    # activations are quantized per batch, over the padding too: close, not bit-identical
    expected = torch.nn.functional.normalize(full.float(), dim=-1)
    assert _min_cosine(int8_backend.encode_texts(tokens), expected) >= 0.999


def test_int8_keeps_a_linear_text_projection_float(tmp_path: Path, texts: list[str]) -> None:
    """open_clip calls a text projection only when it is an ``nn.Linear`` (else multiplies)."""
    from safetensors.torch import save_file

    from clipserve.testing.tiny import build_tiny_open_clip, tiny_open_clip_config

    folder = build_tiny_open_clip(tmp_path / "proj-bias")
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["text_cfg"]["proj_bias"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    cfg = tiny_open_clip_config()
    cfg["text_cfg"]["proj_bias"] = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        source = open_clip.CLIP(**cfg)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    fp32 = OpenClipBackend.load(f"local-dir:{folder}", None, device="cpu", dtype=torch.float32)
    int8 = OpenClipBackend.load(f"local-dir:{folder}", None, device="cpu", dtype=INT8)
    model = int8._live_model()  # noqa: SLF001
    assert type(model.text_projection) is torch.nn.Linear
    tokens = int8.tokenize(texts)
    with torch.inference_mode():  # open_clip's own path, which checks isinstance(.., nn.Linear)
        own = torch.nn.functional.normalize(model.encode_text(tokens.inputs["input_ids"]), dim=-1)
    text_emb = int8.encode_texts(tokens)
    assert _min_cosine(text_emb, own) >= 0.999
    assert _min_cosine(text_emb, fp32.encode_texts(fp32.tokenize(texts))) >= 0.99


def test_mobileclip_equals_open_clip_itself(images: list[Image.Image], texts: list[str]) -> None:
    """MobileCLIP (what CPU users run) through open_clip's own architecture, random weights:
    our embeddings equal open_clip's path to 1e-4 and do not depend on the batch."""
    torch.manual_seed(0)
    backend = OpenClipBackend.load("MobileCLIP-S1", None, device="cpu", dtype=torch.float32)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("MobileCLIP-S1")
    tokenizer = open_clip.get_tokenizer("MobileCLIP-S1")
    model.load_state_dict(backend._model.state_dict())  # the same random weights
    with torch.no_grad():
        ref_images = model.eval().encode_image(torch.stack([preprocess(i) for i in images]), True)
        ref_texts = model.encode_text(tokenizer(texts), normalize=True)
    image_emb, text_emb = _embed(backend, images, texts)
    assert backend.info.image_size == 256
    torch.testing.assert_close(image_emb, ref_images, atol=1e-4, rtol=0)
    torch.testing.assert_close(text_emb, ref_texts, atol=1e-4, rtol=0)
    single, _ = _embed(backend, images[:1], texts[:1])
    assert float(torch.dot(single[0], image_emb[0])) >= 1 - 1e-6
