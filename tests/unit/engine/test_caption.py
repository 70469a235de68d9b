"""Captions and answers through the engine, with tiny random BLIP models (real loaders)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipserve.engine.engine import Engine
from clipserve.errors import InvalidInputError, ModelUnavailableError, UnsupportedModalityError


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def blip_settings(
    make_settings: Callable[..., Any],
    tiny_caption_registry: dict[str, dict[str, Any]],
    tiny_registry: dict[str, dict[str, Any]],
) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        return make_settings({"tiny": tiny_registry["tiny"], **tiny_caption_registry}, **overrides)

    return make


@pytest.fixture
async def engine(blip_settings: Callable[..., Any]) -> Any:
    async with Engine(blip_settings()) as engine:
        yield engine


async def test_captions_batched_equal_one_by_one(engine: Engine) -> None:
    images = [_image(i) for i in range(6)]
    batched = await engine.caption("blip", images)
    alone = [await engine.caption("blip", [image]) for image in images]
    assert batched.model == "blip"
    assert [c.index for c in batched.captions] == list(range(6))
    texts = [c.caption for c in batched.captions]
    assert all(isinstance(t, str) and t for t in texts)
    assert texts == [a.captions[0].caption for a in alone]
    assert len(set(texts)) > 1  # the tiny model's captions depend on the image
    assert batched.seconds > 0


async def test_concurrent_requests_share_batches(engine: Engine) -> None:
    images = [_image(i) for i in range(4)]
    expected = [(await engine.caption("blip", [im])).captions[0].caption for im in images]
    results = await asyncio.gather(*(engine.caption("blip", [im]) for im in images))
    assert [r.captions[0].caption for r in results] == expected


async def test_prompt_is_continued_and_beam_search(engine: Engine) -> None:
    image = _image(1)
    prompted = await engine.caption("blip", [image], prompt="a photo of", max_new_tokens=5)
    assert prompted.captions[0].caption.startswith("a photo of")
    beams = await engine.caption("blip", [image], num_beams=3, max_new_tokens=8)
    assert beams.captions[0].caption


async def test_per_item_errors(engine: Engine) -> None:
    result = await engine.caption("blip", [_image(0), b"not an image", _image(2)])
    assert result.captions[0].caption
    assert result.captions[2].caption
    failed = result.captions[1]
    assert failed.caption is None
    assert failed.error is not None
    assert failed.error.message.startswith("image could not be decoded")


async def test_prompt_too_long_for_the_context_fails_its_images(engine: Engine) -> None:
    result = await engine.caption("blip", [_image(0)], prompt="a " * 60)
    (item,) = result.captions
    assert item.error is not None
    assert "model's context of 64 tokens" in item.error.message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 128"),
        ({"max_new_tokens": 129}, "max_new_tokens must be between 1 and 128"),
        ({"num_beams": 6}, "num_beams must be between 1 (greedy decoding) and 5"),
        ({"prompt": "x" * 501}, "prompt: text is 501 characters long; the limit is 500"),
        ({"prompt": "  "}, "prompt: the text is empty"),
    ],
)
async def test_options_out_of_bounds_are_refused(
    engine: Engine, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        await engine.caption("blip", [_image(0)], **kwargs)


async def test_answers_need_a_vqa_model(engine: Engine) -> None:
    answer = await engine.answer("vqa", _image(0), "what is this?", max_new_tokens=4)
    assert answer.model == "vqa"
    assert answer.answer
    with pytest.raises(UnsupportedModalityError, match="cannot answer questions about images"):
        await engine.answer("blip", _image(0), "what is this?")
    with pytest.raises(UnsupportedModalityError, match="cannot caption images"):
        await engine.caption("vqa", [_image(0)])
    with pytest.raises(UnsupportedModalityError, match="cannot caption images"):
        await engine.caption("tiny", [_image(0)])


async def test_embedding_models_refuse_caption_models(engine: Engine) -> None:
    with pytest.raises(UnsupportedModalityError, match="cannot encode image inputs"):
        await engine.embed_images("blip", [_image(0)])


async def test_warm_up_covers_caption_models(engine: Engine) -> None:
    (report,) = await engine.warm_up(["blip"])
    assert report.error is None
    assert report.modalities == ("caption",)
    assert {p.batch_size for p in report.passes} == {1, engine.settings.batching.max_batch_size}


# --- a remote OpenAI-compatible vision model, through the engine --------------------------------


@pytest.fixture
def fake_openai() -> Any:
    from clipserve.testing.fake_openai import FakeOpenAIServer

    with FakeOpenAIServer(api_key="sk-engine-test", model="vision-1") as server:
        yield server


@pytest.fixture
async def remote_engine(make_settings: Callable[..., Any], fake_openai: Any) -> Any:
    models = {
        "remote": {
            "backend": "openai-vision",
            "model_name": "vision-1",
            "base_url": fake_openai.base_url,
            "max_retries": 0,
        }
    }
    settings = make_settings(models, captions={"openai_api_key": "sk-engine-test"})
    async with Engine(settings) as engine:
        yield engine


async def test_remote_captions_and_answers(remote_engine: Engine, fake_openai: Any) -> None:
    result = await remote_engine.caption("remote", [_image(0, (48, 40)), _image(1, (20, 30))])
    assert [c.caption for c in result.captions] == ["a 48x40 image", "a 20x30 image"]
    answer = await remote_engine.answer("remote", _image(0), "what is this?")
    assert answer.answer == "you asked: what is this?"
    assert all(r.headers["authorization"] == "Bearer sk-engine-test" for r in fake_openai.requests)
    status = remote_engine.registry.status("remote")
    assert status.device == "remote"


async def test_remote_failure_fails_its_image_alone(
    remote_engine: Engine, fake_openai: Any
) -> None:
    fake_openai.fail_matching("poison", 500)
    result = await remote_engine.caption("remote", [_image(0)], prompt="poison")
    (item,) = result.captions
    assert item.error is not None
    assert "HTTP 500" in item.error.message
    ok = await remote_engine.caption("remote", [_image(0)])
    assert ok.captions[0].caption == "a 48x40 image"


async def test_remote_warm_up_sends_nothing(remote_engine: Engine, fake_openai: Any) -> None:
    (report,) = await remote_engine.warm_up(["remote"])
    assert report.error is None
    assert report.modalities == ("answer", "caption")
    assert fake_openai.requests == []


async def test_remote_base_url_on_loopback_is_refused_by_default(
    make_settings: Callable[..., Any], fake_openai: Any
) -> None:
    models = {
        "remote": {"backend": "openai-vision", "model_name": "m", "base_url": fake_openai.base_url}
    }
    settings = make_settings(models, media={"allow_private_urls": False})
    async with Engine(settings) as engine:
        with pytest.raises(ModelUnavailableError, match="loopback"):
            await engine.caption("remote", [_image(0)])
    assert fake_openai.requests == []


# --- BLIP-2 --------------------------------------------------------------------------------------


async def test_blip2_captions_and_answers(engine: Engine) -> None:
    images = [_image(i) for i in range(3)]
    batched = await engine.caption("blip2", images, max_new_tokens=8)
    alone = [(await engine.caption("blip2", [im], max_new_tokens=8)).captions[0] for im in images]
    assert [c.caption for c in batched.captions] == [c.caption for c in alone]
    prompted = await engine.caption("blip2", images[:1], prompt="a photo of", max_new_tokens=4)
    assert prompted.captions[0].caption.startswith("a photo of")
    answer = await engine.answer("blip2", images[0], "what is this?", max_new_tokens=4)
    assert answer.answer
    assert "what is this" not in answer.answer  # the question is not echoed
    status = engine.registry.status("blip2")
    assert status.info is not None
    assert status.info.modalities == {"caption", "answer"}


# --- the engine's contracts, with the fake caption backend ---------------------------------------


async def test_a_stuck_batch_answers_each_caption_at_its_deadline(
    make_settings: Callable[..., Any],
) -> None:
    import threading

    from clipserve.errors import InferenceTimeoutError
    from clipserve.testing import FakeCaptionBackend, FakeLoader

    release = threading.Event()
    backend = FakeCaptionBackend(before_generate=lambda n: release.wait(10))
    settings = make_settings(batching={"request_timeout": 0.3})
    engine = Engine(settings, loader=FakeLoader(caption=backend))
    try:
        result = await engine.caption("blip", [_image(0), _image(1)])
        assert all(isinstance(c.error, InferenceTimeoutError) for c in result.captions)
    finally:
        release.set()
        await engine.close()


async def test_a_failing_batch_is_split_so_other_requests_get_their_captions(
    make_settings: Callable[..., Any],
) -> None:
    from clipserve.testing import FakeCaptionBackend, FakeLoader

    backend = FakeCaptionBackend(fail_prompts=frozenset({"poison"}))
    async with Engine(make_settings(), loader=FakeLoader(caption=backend)) as engine:
        good, bad = await asyncio.gather(
            engine.caption("blip", [_image(0), _image(1)]),
            engine.caption("blip", [_image(2)], prompt="poison"),
        )
    assert all(c.caption and c.caption.startswith("a picture of colour") for c in good.captions)
    (failed,) = bad.captions
    assert failed.error is not None
    assert failed.error.message == "inference failed for model 'blip' (caption): RuntimeError"
