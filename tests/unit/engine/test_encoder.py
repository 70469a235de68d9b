"""The encoder with the embedding cache: a hit skips the fetch (of inline bytes), the decode and
the forward pass; a URL is fetched every time and keyed by the bytes it served; nothing that looks
alike is shared; the per-request opt-out; reloads."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.engine.tasks.embed import Content
from clipserve.errors import InferenceError
from clipserve.testing import DeviceGate, FakeBackend, FakeLoader, QuietHTTPServer

TEXT_LABELS = {"model": "fast", "modality": "text"}
IMAGE_LABELS = {"model": "fast", "modality": "image"}


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def sample(engine: Engine, name: str, **labels: str) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def engine(
    engine_for: Callable[..., Engine], make_settings: Callable[..., Settings], loader: FakeLoader
) -> Engine:
    return engine_for(make_settings(), loader)


class Origin:
    """A loopback origin serving one image whose bytes a test may change; counts the fetches."""

    def __init__(self) -> None:
        self.body = b""
        self.fetches = 0
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                origin.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(origin.body)))
                self.end_headers()
                self.wfile.write(origin.body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/photo.png"


@pytest.fixture
def origin() -> Iterator[Origin]:
    served = Origin()
    thread = threading.Thread(target=served.server.serve_forever, daemon=True)
    thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()


async def test_a_repeated_text_is_served_from_the_cache_without_the_model(
    engine: Engine, loader: FakeLoader
) -> None:
    long_text = "one two three four five six seven eight nine ten"  # over 8 tokens: truncated
    first = await engine.embed("fast", [Content.text("a cat"), Content.text(long_text)])
    backend = loader.loaded["fake-fast"]
    assert sum(backend.forwards("text")) == 2
    again = await engine.embed("fast", [Content.text(long_text), Content.text("a cat")])
    assert sum(backend.forwards("text")) == 2  # both hits: no forward pass
    np.testing.assert_array_equal(again.vectors, first.vectors[::-1])
    assert again.token_counts == first.token_counts[::-1] == (12, 4)
    assert again.truncated == (True, False)
    assert sample(engine, "clipserve_cache_hits_total", **TEXT_LABELS, tier="memory") == 2
    assert sample(engine, "clipserve_cache_misses_total", **TEXT_LABELS, tier="memory") == 2
    assert sample(engine, "clipserve_cache_bytes") > 2 * 16 * 4


async def test_an_image_is_cached_by_its_bytes_whatever_the_input_that_carried_them(
    engine: Engine, loader: FakeLoader, photos: dict[str, Any], tmp_path: Path
) -> None:
    data = png(photos["chelsea"])
    (tmp_path / "chelsea.png").write_bytes(data)  # under the media root
    first = await engine.embed_images("fast", [data])
    for same in (data_uri(data), str(tmp_path / "chelsea.png"), data):
        np.testing.assert_array_equal(await engine.embed_images("fast", [same]), first)
    assert sum(loader.loaded["fake-fast"].forwards("image")) == 1
    assert sample(engine, "clipserve_cache_hits_total", **IMAGE_LABELS, tier="memory") == 3


async def test_a_url_is_fetched_every_time_and_re_embedded_when_its_bytes_change(
    engine: Engine, loader: FakeLoader, photos: dict[str, Any], origin: Origin
) -> None:
    origin.body = png(photos["coffee"])
    coffee = await engine.embed_images("fast", [origin.url])
    backend = loader.loaded["fake-fast"]
    np.testing.assert_array_equal(await engine.embed_images("fast", [origin.url]), coffee)
    assert (origin.fetches, sum(backend.forwards("image"))) == (2, 1)  # fetched, not decoded

    origin.body = png(photos["rocket"])  # the same URL now serves another image
    rocket = await engine.embed_images("fast", [origin.url])
    assert (origin.fetches, sum(backend.forwards("image"))) == (3, 2)
    assert float(rocket[0] @ coffee[0]) < 0.99

    origin.body = png(photos["coffee"])  # and back: the first bytes are still cached
    np.testing.assert_array_equal(await engine.embed_images("fast", [origin.url]), coffee)
    assert (origin.fetches, sum(backend.forwards("image"))) == (4, 2)
    expected = backend.encode_images(backend.preprocess(photos["rocket"])[None]).numpy()
    np.testing.assert_allclose(rocket, expected, atol=1e-5)  # the new image's vector


async def test_a_text_and_an_image_of_the_same_bytes_never_share_a_vector(
    engine: Engine, loader: FakeLoader
) -> None:
    ppm = "P3\n1 1\n255\n255 0 0\n"  # a plain-text PPM: a valid text and a valid image
    assert Image.open(io.BytesIO(ppm.encode())).size == (1, 1)
    embedded = await engine.embed("fast", [Content.text(ppm), Content.image(ppm.encode())])
    backend = loader.loaded["fake-fast"]
    assert (sum(backend.forwards("text")), sum(backend.forwards("image"))) == (1, 1)
    again = await engine.embed("fast", [Content.image(ppm.encode()), Content.text(ppm)])
    np.testing.assert_array_equal(again.vectors, embedded.vectors[::-1])
    assert float(embedded.vectors[0] @ embedded.vectors[1]) < 0.99


async def test_the_same_text_on_two_models_is_computed_by_each(
    engine: Engine, loader: FakeLoader
) -> None:
    fast = await engine.embed_texts("fast", ["a cat"])
    await engine.embed_texts("accurate", ["warm up"])
    accurate = loader.loaded["fake-accurate"]
    original = accurate.encode_texts

    def negated(tokens: Any) -> torch.Tensor:
        return -original(tokens)  # another model: other vectors for the same text

    accurate.encode_texts = negated  # type: ignore[method-assign]
    other = await engine.embed_texts("accurate", ["a cat"])
    np.testing.assert_allclose(other.vectors, -fast.vectors, atol=1e-6)
    assert sum(loader.loaded["fake-fast"].forwards("text")) == 1


async def test_texts_are_keyed_by_their_exact_characters(
    engine: Engine, loader: FakeLoader
) -> None:
    texts = ["a cat", "A cat", "a cat ", "a  cat"]
    await engine.embed_texts("fast", texts)
    await engine.embed_texts("fast", texts)
    assert sum(loader.loaded["fake-fast"].forwards("text")) == len(texts)


async def test_cache_false_neither_reads_nor_fills_the_cache(
    engine: Engine, loader: FakeLoader, photos: dict[str, Any]
) -> None:
    data = png(photos["astronaut"])
    inputs = [Content.text("a cat"), Content.image(data)]
    await engine.embed("fast", inputs, cache=False)
    await engine.embed("fast", inputs, cache=False)
    backend = loader.loaded["fake-fast"]
    assert (sum(backend.forwards("text")), sum(backend.forwards("image"))) == (2, 2)
    assert engine.cache is not None
    assert engine.cache.memory is not None
    assert len(engine.cache.memory) == 0
    await engine.embed("fast", inputs)  # the default: computed (nothing was stored), then kept
    await engine.embed("fast", inputs)
    assert (sum(backend.forwards("text")), sum(backend.forwards("image"))) == (3, 3)


async def test_pil_images_are_not_cached(
    engine: Engine, loader: FakeLoader, photos: dict[str, Any]
) -> None:
    await engine.embed_images("fast", [photos["rocket"]])
    await engine.embed_images("fast", [photos["rocket"]])
    assert sum(loader.loaded["fake-fast"].forwards("image")) == 2


async def test_the_cache_can_be_switched_off(
    engine_for: Callable[..., Engine], make_settings: Callable[..., Settings], loader: FakeLoader
) -> None:
    engine = engine_for(make_settings(cache={"enabled": False}), loader)
    assert engine.cache is None
    await engine.embed_texts("fast", ["a cat"])
    await engine.embed_texts("fast", ["a cat"])
    assert sum(loader.loaded["fake-fast"].forwards("text")) == 2


async def test_concurrent_identical_requests_share_one_computation(
    engine_for: Callable[..., Engine], make_settings: Callable[..., Settings]
) -> None:
    gate = DeviceGate()
    loader = FakeLoader(before_forward=gate)
    engine = engine_for(make_settings(), loader)
    await engine.embed_texts("fast", ["load the model"])
    assert engine.cache is not None
    gate.close()
    first = asyncio.ensure_future(engine.embed_texts("fast", ["same"]))
    await gate.entered()  # its forward pass is on the device
    second = asyncio.ensure_future(engine.embed_texts("fast", ["same"]))
    async with asyncio.timeout(5):
        while engine.cache.waiters() < 1:
            await asyncio.sleep(0.001)
    gate.open()
    a, b = await asyncio.gather(first, second)
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert loader.loaded["fake-fast"].forwards("text") == [1, 1]  # warm-up, then "same" once
    assert sample(engine, "clipserve_cache_hits_total", **TEXT_LABELS, tier="inflight") == 1


async def test_a_failure_is_not_cached_and_a_concurrent_twin_gets_it_too(
    engine_for: Callable[..., Engine], make_settings: Callable[..., Settings]
) -> None:
    loader = FakeLoader(fail_texts=frozenset({"boom"}))
    engine = engine_for(make_settings(), loader)
    await engine.embed_texts("fast", ["load the model"])
    backend = loader.loaded["fake-fast"]
    attempts = 0
    original = backend.encode_texts

    def counting(tokens: Any) -> torch.Tensor:
        nonlocal attempts
        attempts += 1
        return original(tokens)

    backend.encode_texts = counting  # type: ignore[method-assign]
    results = await asyncio.gather(
        engine.embed_texts("fast", ["boom"]),
        engine.embed_texts("fast", ["boom"]),
        return_exceptions=True,
    )
    assert all(isinstance(r, InferenceError) for r in results)
    assert attempts == 1  # the twin waited for the first and got its error
    with pytest.raises(InferenceError):
        await engine.embed_texts("fast", ["boom"])
    assert attempts == 2  # not cached: tried again
    assert engine.cache is not None
    assert engine.cache.in_flight() == 0


async def test_a_preprocess_change_re_embeds_the_same_bytes(
    engine: Engine,
    loader: FakeLoader,
    photos: dict[str, Any],
    write_config: Callable[[dict[str, Any]], Any],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    buffer = io.BytesIO()
    photos["coffee"].save(buffer, format="JPEG")
    jpeg = buffer.getvalue()
    await engine.embed_images("fast", [jpeg])
    fake_models["fast"]["preprocess"] = "fast"  # metadata: the loaded model is kept
    write_config(fake_models)
    assert (await engine.registry.reload()).updated == ["fast"]
    await engine.embed_images("fast", [jpeg])
    await engine.embed_images("fast", [jpeg])
    assert sum(loader.loaded["fake-fast"].forwards("image")) == 2  # once per mode


async def test_a_reload_of_one_model_drops_only_its_entries(
    engine: Engine,
    loader: FakeLoader,
    write_config: Callable[[dict[str, Any]], Any],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    await engine.embed_texts("fast", ["a cat"])
    await engine.embed_texts("accurate", ["a cat"])
    first_fast = loader.loaded["fake-fast"]
    fake_models["fast"]["pretrained"] = "new-weights"  # a load field: the model is reloaded
    write_config(fake_models)
    assert (await engine.registry.reload()).changed == ["fast"]
    assert await engine.registry.drain(10)  # the old model unloaded
    assert engine.cache is not None
    assert engine.cache.memory is not None
    assert len(engine.cache.memory) == 1  # accurate's entry is left
    await engine.embed_texts("fast", ["a cat"])
    await engine.embed_texts("accurate", ["a cat"])
    new_fast = loader.loaded["fake-fast"]
    assert new_fast is not first_fast
    assert sum(new_fast.forwards("text")) == 1  # computed by the new weights
    assert sum(loader.loaded["fake-accurate"].forwards("text")) == 1  # still a hit


async def test_the_hit_path_returns_the_vector_the_model_made(
    engine: Engine, loader: FakeLoader
) -> None:
    await engine.embed_texts("fast", ["a cat"])
    hit = await engine.embed_texts("fast", ["a cat"])
    backend: FakeBackend = loader.loaded["fake-fast"]
    expected = backend.encode_texts(backend.tokenize(["a cat"])).numpy()
    np.testing.assert_allclose(hit.vectors, expected, atol=1e-6)
    digest = hashlib.sha256(b"a cat").hexdigest()
    assert engine.cache is not None
    assert engine.cache.memory is not None
    (stored,) = [k for k in engine.cache.memory._slots if k.endswith(digest)]
    assert stored.startswith("v1:fast:")
    assert ":text:" in stored


async def test_a_request_of_many_texts_is_batched_shortest_first(
    engine_for: Callable[..., Engine], make_settings: Callable[..., Settings], loader: FakeLoader
) -> None:
    engine = engine_for(make_settings(batching={"max_batch_size": 4}), loader)
    await engine.embed_texts("fast", ["warm-up"])
    backend = loader.loaded["fake-fast"]
    batches: list[tuple[int, ...]] = []
    encode = backend.encode_texts

    def recording(tokens: Any) -> torch.Tensor:
        batches.append(tokens.token_counts)
        return encode(tokens)

    backend.encode_texts = recording  # type: ignore[method-assign]
    texts = ["w " * (i % 7 + 1) + str(i) for i in range(40)]  # 1 to 7 words, interleaved
    embedded = await engine.embed_texts("fast", texts)
    assert embedded.vectors.shape[0] == 40  # in input order, whatever the batches
    assert embedded.token_counts == tuple(i % 7 + 4 for i in range(40))
    ran = [count for batch in batches for count in batch]
    assert ran == sorted(ran)  # so each batch holds texts of about the same length
    assert len(batches) >= 10
