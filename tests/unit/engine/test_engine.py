from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.engine.tasks.embed import Content
from clipserve.engine.tasks.evaluate import EvalItem
from clipserve.errors import (
    EngineNotReadyError,
    InferenceError,
    InferenceTimeoutError,
    InvalidImageError,
    InvalidInputError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
    UnsupportedModalityError,
)
from clipserve.models.base import clip_scores
from clipserve.testing import DeviceGate, FakeBackend, FakeLoader


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture
def images(photo_bytes: Callable[..., bytes], tmp_path: Path) -> dict[str, str]:
    """Image inputs of every string kind: data URIs and paths under the media root."""
    (tmp_path / "chelsea.png").write_bytes(photo_bytes("chelsea", "PNG"))
    return {
        "astronaut": data_uri(photo_bytes("astronaut", "PNG"), "image/png"),
        "coffee": data_uri(photo_bytes("coffee")),
        "chelsea": str(tmp_path / "chelsea.png"),
        "rocket": "rocket.png",  # relative to the media root, written below
    }


async def test_scores_are_max_100_cos_in_request_order(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
    photos: dict[str, Any],
    tmp_path: Path,
) -> None:
    photos["rocket"].save(tmp_path / "rocket.png")
    loader = FakeLoader()
    engine = engine_for(make_settings(), loader)
    items = [EvalItem(images[n], f"a photo of {n}") for n in ("astronaut", "chelsea", "rocket")]
    results = await engine.evaluate(items)

    backend = loader.loaded["fake-fast"]
    for item, result, name in zip(items, results, ("astronaut", "chelsea", "rocket"), strict=True):
        assert result.error is None
        assert result.model == "fast"
        pixels = backend.preprocess(photos[name].convert("RGB"))
        image = backend.encode_images(pixels[None])
        text = backend.encode_texts(backend.tokenize([item.text]))
        expected = float(clip_scores(image, text)[0])
        assert result.score == pytest.approx(expected, abs=1e-4)  # lossless inputs
        assert 0.0 <= result.score <= 100.0


async def test_duplicates_are_encoded_once_and_passes_follow_max_batch_size(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    photos: dict[str, Any],
) -> None:
    loader = FakeLoader()
    engine = engine_for(make_settings(batching={"max_batch_size": 4}), loader)
    distinct = [photos["astronaut"].rotate(angle) for angle in range(0, 100, 10)]  # 10 images
    items = [EvalItem(img, "same caption") for img in distinct]
    items += [EvalItem(distinct[0], "same caption"), EvalItem(distinct[1], "other caption")]
    results = await engine.evaluate(items, window=4)

    backend = loader.loaded["fake-fast"]
    assert sum(backend.forwards("image")) == 10  # each distinct image once
    assert all(n <= 4 for n in backend.forwards("image"))
    assert sum(backend.forwards("text")) == 2
    assert results[10].score == results[0].score
    assert all(r.error is None for r in results)


async def test_failing_items_carry_errors_and_the_rest_succeed(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings())
    items = [
        EvalItem(images["astronaut"], "ok"),
        EvalItem(data_uri(b"not an image at all"), "bad image"),
        EvalItem(images["astronaut"], "x" * 20_000),
        EvalItem(images["astronaut"], "unknown model", model="nope"),
        EvalItem(images["astronaut"], "text-only model", model="minilm"),
        EvalItem(images["astronaut"], "broken model", model="broken"),
        EvalItem(images["chelsea"], "also ok", model="accurate"),
        EvalItem("", "no image"),
        EvalItem(images["astronaut"], ""),
        EvalItem(images["astronaut"], "   "),
        EvalItem("  ", "blank image", model="nope"),
    ]
    results = await engine.evaluate(items)
    assert results[0].error is None
    assert results[6].error is None
    assert results[6].model == "accurate"
    assert isinstance(results[1].error, InvalidImageError)
    assert results[1].error.message.startswith("image could not be decoded")
    assert isinstance(results[2].error, InvalidInputError)
    assert "limit is 10000" in results[2].error.message
    assert isinstance(results[3].error, ModelNotFoundError)
    assert isinstance(results[4].error, UnsupportedModalityError)
    assert "cannot encode image" in results[4].error.message
    assert isinstance(results[5].error, ModelUnavailableError)
    assert all(r.score is None for r in results[1:6])
    assert [type(r.error) for r in results[7:]] == [InvalidInputError] * 4
    assert results[7].error is not None
    assert results[7].error.message.startswith("image_input is empty")
    assert [r.error.message for r in results[8:10] if r.error] == ["text_prompt is empty"] * 2
    assert results[10].model == "nope"
    errors = engine.metrics.evaluation_errors_total
    assert errors.labels("fast", "InvalidImageError")._value.get() == 1


async def test_model_failure_fails_its_items_only(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings(), FakeLoader(fail_texts=frozenset({"boom"})))
    results = await engine.evaluate(
        [EvalItem(images["astronaut"], "boom"), EvalItem(images["astronaut"], "fine")],
        window=1,
    )
    assert isinstance(results[0].error, InferenceError)
    assert "inference failed for model 'fast' (text)" in results[0].error.message
    assert results[1].error is None


async def test_truncation_is_reported(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings())
    long, short = await engine.evaluate(
        [EvalItem(images["astronaut"], "word " * 50), EvalItem(images["astronaut"], "short")]
    )
    assert long.text_truncated is True
    assert long.score is not None
    assert short.text_truncated is False
    assert long.text_context_length == short.text_context_length
    assert long.text_context_length is not None


async def test_evaluate_one_raises_the_items_error(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for(make_settings())
    with pytest.raises(InvalidImageError):
        await engine.evaluate_one(EvalItem(data_uri(b"junk"), "x"))


async def test_a_pair_whose_prompt_is_refused_skips_its_image(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    loader = FakeLoader()
    engine = engine_for(make_settings(), loader)
    with pytest.raises(InvalidInputError, match="limit is 10000"):
        await engine.evaluate_one(EvalItem(images["astronaut"], "x" * 20_000))
    backend = loader.loaded["fake-fast"]
    assert sum(backend.forwards("image")) == 0  # refused at once: its image is never encoded
    # A batch with one good pair still encodes both sides of it, and only of it.
    bad_text = EvalItem(images["coffee"], "y" * 20_000)
    results = await engine.evaluate([EvalItem(images["astronaut"], "ok"), bad_text])
    assert results[0].score is not None
    assert isinstance(results[1].error, InvalidInputError)
    assert sum(backend.forwards("text")) == 1
    assert sum(backend.forwards("image")) == 2  # not every text failed: both images
    assert (await engine.evaluate_one(EvalItem(images["chelsea"], "a cat"))).score is not None


async def test_an_exception_on_one_side_cancels_the_other_and_propagates() -> None:
    from clipserve.engine.tasks.evaluate import _both_sides

    other_started, other_cancelled = asyncio.Event(), asyncio.Event()

    async def slow() -> dict[str, Any]:
        other_started.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        except asyncio.CancelledError:
            other_cancelled.set()
            raise
        return {}

    async def broken() -> dict[str, Any]:
        await other_started.wait()
        raise RuntimeError("a bug in one side")

    with pytest.raises(RuntimeError, match="a bug in one side"):
        await asyncio.wait_for(_both_sides(slow(), broken()), 5)
    assert other_cancelled.is_set()


async def test_preprocess_fast_decodes_jpegs_at_a_reduced_scale_for_that_model_only(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    photos: dict[str, Any],
) -> None:
    buffer = io.BytesIO()
    photos["coffee"].resize((2048, 1536)).save(buffer, format="JPEG")
    uri = data_uri(buffer.getvalue())
    loader = FakeLoader()
    models = {"fast": {"model_name": "fake-fast", "preprocess": "fast"}}
    # No cache: the second evaluation of the image must decode it again.
    engine = engine_for(make_settings(models, cache={"enabled": False}), loader)
    seen: dict[str, list[tuple[int, int]]] = {}
    for name in ("fast", "accurate"):
        await engine.evaluate_one(EvalItem(uri, "warm", model=name))  # loads the model
        backend = loader.loaded[f"fake-{name}"]
        sizes = seen.setdefault(name, [])

        def recording(
            image: Image.Image,
            sizes: list[tuple[int, int]] = sizes,
            preprocess: Callable[[Image.Image], torch.Tensor] = backend.preprocess,
        ) -> torch.Tensor:
            sizes.append(image.size)
            return preprocess(image)

        backend.preprocess = recording  # type: ignore[method-assign]
        await engine.evaluate_one(EvalItem(uri, "a cup of coffee", model=name))
    assert loader.loaded["fake-fast"].info.image_size == 8
    assert seen["fast"] == [(256, 192)]  # 1/8, the smallest DCT scale (still >= 8 pixels)
    assert seen["accurate"] == [(2048, 1536)]


async def test_progress_reaches_the_total(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings())
    seen: list[tuple[int, int]] = []
    items = [EvalItem(images["astronaut"], str(i)) for i in range(5)]
    items.append(EvalItem(images["astronaut"], "x", model="nope"))
    await engine.evaluate(items, window=2, progress=lambda d, t: seen.append((d, t)))
    assert (6, 6) in seen
    assert all(t == 6 for _, t in seen)


async def test_embeddings_are_normalised_and_shaped(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    photos: dict[str, Any],
) -> None:
    engine = engine_for(make_settings())
    texts = await engine.embed_texts(None, ["a", "b", "a"])
    assert texts.vectors.shape == (3, 16)
    assert texts.vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(texts.vectors[0], texts.vectors[2])
    vectors = await engine.embed_images("fast", [photos["astronaut"], photos["coffee"]])
    assert vectors.shape == (2, 16)
    with pytest.raises(UnsupportedModalityError):
        await engine.embed_images("minilm", [photos["astronaut"]])
    text_only = await engine.embed_texts("minilm", ["hello"])
    assert text_only.vectors.shape == (1, 16)


def test_clip_scores_clamp_at_zero() -> None:
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), dim=-1)
    b = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]), dim=-1)
    scores = clip_scores(a, b)
    assert scores.dtype == np.float32
    assert float(scores[0]) == pytest.approx(100 / 2**0.5, abs=1e-4)
    assert float(scores[1]) == 0.0


def test_fake_backend_is_a_backend() -> None:
    from clipserve.models.base import Backend

    assert isinstance(FakeBackend(), Backend)


# --- the dynamic batcher behind the engine -------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for a condition another task or thread will make true."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)
    assert condition(), what


async def test_concurrent_single_evaluations_share_forward_passes(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    gate = DeviceGate()
    loader = FakeLoader(before_forward=gate)
    engine = engine_for(make_settings(), loader)
    await engine.evaluate_one(EvalItem(images["astronaut"], "warm up"))
    backend = loader.loaded["fake-fast"]
    backend.forward_calls.clear()
    gate.close()
    first = asyncio.ensure_future(engine.evaluate_one(EvalItem(images["astronaut"], "first")))
    await gate.entered()  # one forward pass holds the device
    rest = [
        asyncio.ensure_future(engine.evaluate_one(EvalItem(images["coffee"], f"caption {i}")))
        for i in range(7)
    ]
    await until(lambda: engine.batcher.stats().queue_size >= 7, "requests queue up")
    gate.open()
    results = await asyncio.gather(first, *rest)
    assert all(r.score is not None for r in results)
    texts = backend.forwards("text")
    assert sum(texts) == 8
    assert len(texts) < 8  # seven texts that queued together went through one shared pass
    assert max(texts) >= 7


async def test_a_request_past_its_deadline_gets_504(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    gate = DeviceGate()
    engine = engine_for(
        make_settings(batching={"request_timeout": 0.2}), FakeLoader(before_forward=gate)
    )
    gate.close()
    with pytest.raises(InferenceTimeoutError, match=r"within its 0\.2 s deadline"):
        await engine.evaluate_one(EvalItem(images["astronaut"], "too slow"))
    with pytest.raises(InferenceTimeoutError):
        await engine.embed_texts("fast", ["also too slow"])
    gate.open()
    assert (await engine.embed_texts("fast", ["fine now"])).vectors.shape == (1, 16)


async def test_a_full_queue_refuses_new_requests_with_429(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    gate = DeviceGate()
    settings = make_settings(batching={"max_queue_size": 1, "max_batch_size": 1})
    engine = engine_for(settings, FakeLoader(before_forward=gate))
    await engine.embed_texts("fast", ["load the model"])
    gate.close()
    running = asyncio.ensure_future(engine.embed_texts("fast", ["running"]))
    await gate.entered()
    queued = asyncio.ensure_future(engine.embed_texts("fast", ["queued"]))
    await until(lambda: engine.batcher.stats().queue_size == 1, "one item queued")
    with pytest.raises(QueueFullError, match="overloaded") as refused:
        await engine.embed_texts("fast", ["refused"])
    assert refused.value.retry_after_s >= 1
    gate.open()
    assert len(await asyncio.gather(running, queued)) == 2


async def test_wait_overflow_holds_new_requests_until_there_is_room(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    gate = DeviceGate()
    settings = make_settings(
        batching={"max_queue_size": 1, "max_batch_size": 1, "queue_overflow_action": "wait"}
    )
    engine = engine_for(settings, FakeLoader(before_forward=gate))
    await engine.embed_texts("fast", ["load the model"])
    gate.close()
    calls = [asyncio.ensure_future(engine.embed_texts("fast", [f"t{i}"])) for i in range(4)]
    await gate.entered()
    gate.open()
    done = await asyncio.gather(*calls)
    assert [d.vectors.shape for d in done] == [(1, 16)] * 4


async def test_rank_sorts_documents_by_similarity(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings())
    documents = [Content.text("a dog"), Content.image(images["astronaut"]), Content.text("a cat")]
    ranking = await engine.rank("fast", Content.text("a cat"), documents)
    assert ranking.results[0].index == 2
    assert ranking.results[0].score == pytest.approx(1.0, abs=1e-5)
    assert sorted(r.index for r in ranking.results) == [0, 1, 2]
    scores = [r.score for r in ranking.results]
    assert scores == sorted(scores, reverse=True)
    partial = await engine.rank(
        "fast", Content.text("a dog"), [Content.image(data_uri(b"x")), documents[0]]
    )
    assert [(r.index, r.error is None) for r in partial.results] == [(1, True), (0, False)]
    failed = partial.results[1]
    assert failed.score is None
    assert isinstance(failed.error, InvalidImageError)
    assert failed.error.message.startswith("image could not be decoded")
    with pytest.raises(InvalidImageError, match=r"^query: image could not be decoded"):
        await engine.rank("fast", Content.image(data_uri(b"x")), documents)


async def test_classify_gives_softmax_probabilities_and_caches_label_prompts(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    loader = FakeLoader()
    engine = engine_for(make_settings(), loader)
    labels = ["astronaut", "cat", "coffee"]
    (result,) = await engine.classify("fast", [images["astronaut"]], labels, "a photo of a {}")
    row = result.labels
    assert result.error is None
    assert sum(s.probability for s in row) == pytest.approx(1.0, abs=1e-5)
    assert [s.probability for s in row] == sorted((s.probability for s in row), reverse=True)
    backend = loader.loaded["fake-fast"]
    image = backend.encode_images(backend.preprocess(Image.open(images["chelsea"]))[None])
    prompts = backend.encode_texts(backend.tokenize([f"a photo of a {x}" for x in labels]))
    cos = (image @ prompts.T)[0]
    expected = torch.softmax(cos * 100.0, dim=-1)
    (chelsea,) = await engine.classify("fast", [images["chelsea"]], labels)
    for s in chelsea.labels:
        assert s.score == pytest.approx(float(cos[s.index]), abs=1e-5)
        assert s.probability == pytest.approx(float(expected[s.index]), abs=1e-5)
    assert backend.forwards("text") == [3, 3]  # the prompts once (cached), then the check above
    with pytest.raises(InvalidInputError, match="template must contain"):
        await engine.classify("fast", [images["chelsea"]], labels, "no placeholder")
    bad, good = await engine.classify("fast", [data_uri(b"junk"), images["chelsea"]], labels)
    assert bad.labels == ()
    assert isinstance(bad.error, InvalidImageError)
    assert good.error is None
    assert [s.label for s in good.labels] == [s.label for s in chelsea.labels]


async def test_classify_uses_a_sigmoid_for_siglip_models(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
) -> None:
    engine = engine_for(make_settings(), FakeLoader(logit_bias_value=-10.0))
    (row,) = await engine.classify("fast", [images["astronaut"]], ["astronaut", "cat"])
    for s in row.labels:
        assert s.probability == pytest.approx(
            float(torch.sigmoid(torch.tensor(s.score * 100.0 - 10.0))), abs=1e-5
        )


async def test_dimensions_only_where_the_model_was_trained_for_truncation(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for(make_settings({"mrl": {"model_name": "fake-mrl", "matryoshka_dims": [8]}}))
    with pytest.raises(InvalidInputError, match="cannot return 4-dimensional embeddings"):
        await engine.embed("fast", [Content.text("x")], dimensions=4)
    assert (await engine.embed("fast", [Content.text("x")], dimensions=16)).vectors.shape == (1, 16)
    short = await engine.embed("mrl", [Content.text("x"), Content.text("y")], dimensions=8)
    assert short.vectors.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(short.vectors, axis=1), 1.0, atol=1e-5)


async def test_readiness_tells_the_truth(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for(make_settings(default_model="broken"))
    assert engine.readiness().ready  # not loaded yet: loads on first use
    with pytest.raises(ModelUnavailableError):
        await engine.embed_texts(None, ["x"])
    readiness = engine.readiness()
    assert not readiness.ready
    assert readiness.reason is not None
    assert "failed to load" in readiness.reason
    await engine.batcher.close()
    assert engine.readiness().reason == "the server is shutting down"
    with pytest.raises(EngineNotReadyError, match="shutting down"):
        await engine.embed_texts("fast", ["x"])


async def test_unloading_a_model_closes_its_queues(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    write_config: Callable[[dict[str, Any]], Any],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    engine = engine_for(make_settings())
    await engine.embed_texts("accurate", ["x"])
    assert any(q.model == "accurate" for q in engine.batcher.stats().queues)
    del fake_models["accurate"]
    write_config(fake_models)
    await engine.registry.reload()
    assert await engine.registry.drain(10)  # the unload runs on a registry task
    assert not any(q.model == "accurate" for q in engine.batcher.stats().queues)


async def test_preload_creates_the_queues_and_probes_them(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    engine = engine_for(make_settings(preload=True))
    await engine.start()
    queues = {(q.model, q.modality) for q in engine.batcher.stats().queues}
    assert {("fast", "image"), ("fast", "text"), ("minilm", "text")} <= queues
    assert all(q.max_batch_size == 32 for q in engine.batcher.stats().queues)  # CPU: as set


async def test_shutdown_never_hangs_on_a_stuck_forward_pass(
    make_settings: Callable[..., Settings],
    images: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = DeviceGate(timeout_s=60)
    engine = Engine(
        make_settings(batching={"drain_timeout": 0.1}), loader=FakeLoader(before_forward=gate)
    )
    gate.close()
    stuck = asyncio.ensure_future(engine.evaluate_one(EvalItem(images["astronaut"], "stuck")))
    await gate.entered()  # a forward pass that will not return
    try:
        async with asyncio.timeout(15):
            await engine.close()
        with pytest.raises(EngineNotReadyError, match="shut"):
            await asyncio.wait_for(stuck, 5)
        assert "abandoned" in caplog.text
    finally:
        gate.open()


async def test_a_model_unloaded_by_a_reload_loses_all_its_metric_series(
    make_settings: Callable[..., Settings],
    engine_for: Callable[..., Engine],
    images: dict[str, str],
    write_config: Callable[[dict[str, Any]], Any],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    engine = engine_for(make_settings({"extra": {"model_name": "fake-extra"}}))
    await engine.evaluate([EvalItem(images["astronaut"], "x", model="extra")])
    await engine.evaluate([EvalItem(data_uri(b"junk"), "x", model="extra")])

    def families() -> set[str]:
        text = engine.metrics.render().decode()
        return {line.split("{")[0] for line in text.splitlines() if 'model="extra"' in line}

    assert len(families()) >= 12  # every per-model family has a series
    write_config(fake_models)  # without "extra"
    await engine.registry.reload()
    assert await engine.registry.drain(10)
    assert families() == set()


async def test_one_client_cannot_fill_the_queue_for_everyone_else(
    make_settings: Callable[..., Settings], engine_for: Callable[..., Engine]
) -> None:
    """A greedy client's requests fill at most its share of a queue (then it, and only it, gets
    429); its big request is windowed to the share instead of being refused."""
    gate = DeviceGate()
    settings = make_settings(
        batching={"max_queue_size": 8, "max_batch_size": 1, "client_queue_share": 0.5}
    )
    engine = engine_for(settings, FakeLoader(before_forward=gate))
    await engine.embed_texts("fast", ["load the model"])
    assert engine.scope(window=100, client="greedy").window == 4  # capped to the share
    gate.close()
    running = asyncio.ensure_future(engine.embed(None, [Content.text("running")], client="a"))
    await gate.entered()
    big = asyncio.ensure_future(
        engine.embed(
            "fast", [Content.text(f"big {i}") for i in range(12)], window=100, client="greedy"
        )
    )
    await until(lambda: engine.batcher.stats().queue_size == 4, "the greedy window queued")
    with pytest.raises(QueueFullError, match="too many requests from this client"):
        await engine.embed("fast", [Content.text("one more")], client="greedy")
    polite = asyncio.ensure_future(engine.embed(None, [Content.text("polite")], client="b"))
    await until(lambda: engine.batcher.stats().queue_size == 5, "the polite item queued")
    gate.open()
    assert (await big).vectors.shape == (12, 16)
    assert (await polite).vectors.shape == (1, 16)
    assert (await running).vectors.shape == (1, 16)
