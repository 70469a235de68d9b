from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import openai
import pytest

from clipserve.testing import DeviceGate, FakeLoader

EMBEDDINGS = "/v1/embeddings"


@pytest.fixture
def png_uri(photo_bytes: Callable[..., bytes]) -> str:
    return "data:image/png;base64," + base64.b64encode(photo_bytes("astronaut", "PNG")).decode()


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(), FakeLoader())


def openai_client(http: Any, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="unused", base_url="http://testserver/v1", http_client=http, **options
    )


async def until_queued(client: Any, n: int) -> None:
    """Wait (bounded) until the service reports ``n`` queued items."""
    async with asyncio.timeout(10):
        while (await client.get("/health")).json()["queue_size"] < n:
            await asyncio.sleep(0.005)


async def test_embed_uses_the_default_text_model(client: Any) -> None:
    response = await client.post("/embed", json={"input_text": "hello world"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "minilm"
    assert len(body["embedding"]) == 16
    assert np.linalg.norm(body["embedding"]) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("body", "where"),
    [({"input_text": ""}, "input_text"), ({"input_text": "x" * 1025}, "input_text"), ({}, "")],
)
async def test_embed_validates_its_input(client: Any, body: dict[str, Any], where: str) -> None:
    response = await client.post("/embed", json=body)
    assert response.status_code == 422
    assert response.json()["error"].startswith(f"request validation failed: {where or 'input'}")


async def test_openai_shape_and_base64_equals_float(
    client: Any, assert_vectors_close: Callable[[Any, Any], None]
) -> None:
    texts = ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    floats = (await client.post(EMBEDDINGS, json={"model": "fast", "input": texts})).json()
    encoded = (
        await client.post(
            EMBEDDINGS, json={"model": "fast", "input": texts, "encoding_format": "base64"}
        )
    ).json()
    assert floats["object"] == "list"
    assert floats["model"] == "fast"
    assert [d["index"] for d in floats["data"]] == [0, 1, 2]
    assert {d["object"] for d in floats["data"]} == {"embedding"}
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0
    for as_float, as_b64 in zip(floats["data"], encoded["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(as_b64["embedding"]), dtype="<f4")
        assert_vectors_close(decoded, np.asarray(as_float["embedding"], dtype=np.float32))
    assert floats["data"][0]["embedding"] == floats["data"][2]["embedding"]


async def test_the_openai_client_works_unchanged(
    client: Any, assert_vectors_close: Callable[[Any, Any], None]
) -> None:
    api = openai_client(client)
    result = await api.embeddings.create(model="fast", input=["a cat", "a dog"])  # base64 default
    assert [d.index for d in result.data] == [0, 1]
    assert result.model == "fast"
    direct = (await client.post(EMBEDDINGS, json={"model": "fast", "input": ["a cat"]})).json()
    assert_vectors_close(
        np.asarray(result.data[0].embedding, dtype=np.float32),
        np.asarray(direct["data"][0]["embedding"], dtype=np.float32),
    )
    single = await api.embeddings.create(model="fast", input="a cat", encoding_format="float")
    assert_vectors_close(single.data[0].embedding, direct["data"][0]["embedding"])
    assert single.usage.prompt_tokens > 0


async def test_openai_client_raises_the_right_exceptions(client: Any) -> None:
    api = openai_client(client, max_retries=0)
    with pytest.raises(openai.NotFoundError) as missing:
        await api.embeddings.create(model="nope", input="x")
    assert missing.value.code == "model_not_found"
    assert "model config 'nope' is unknown" in missing.value.message
    with pytest.raises(openai.UnprocessableEntityError, match="cannot return 4-dimensional"):
        await api.embeddings.create(model="fast", input="x", dimensions=4)
    with pytest.raises(openai.BadRequestError, match="cannot encode image inputs"):
        await api.embeddings.create(
            model="minilm", input=["https://example.com/x.png"], extra_body={"modality": "image"}
        )
    with pytest.raises(openai.UnprocessableEntityError, match="token-id inputs"):
        await api.embeddings.create(model="fast", input=[[1, 2, 3]])
    with pytest.raises(openai.InternalServerError, match="unavailable") as unavailable:
        await api.embeddings.create(model="broken", input="x")
    assert unavailable.value.status_code == 503


async def test_overload_raises_rate_limit_error_in_the_openai_client(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    gate = DeviceGate()
    settings = make_settings(batching={"max_queue_size": 1, "max_batch_size": 1})
    client = await client_for(settings, FakeLoader(before_forward=gate))
    assert (
        await client.post(EMBEDDINGS, json={"model": "fast", "input": "warm"})
    ).status_code == 200
    gate.close()
    running = asyncio.ensure_future(client.post(EMBEDDINGS, json={"model": "fast", "input": "a"}))
    await gate.entered()
    queued = asyncio.ensure_future(client.post(EMBEDDINGS, json={"model": "fast", "input": "b"}))
    await until_queued(client, 1)
    with pytest.raises(openai.RateLimitError) as limited:
        await openai_client(client, max_retries=0).embeddings.create(model="fast", input="c")
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1
    gate.open()
    assert [r.status_code for r in await asyncio.gather(running, queued)] == [200, 200]


async def test_images_as_data_uris_objects_and_image_url_parts(
    client: Any, png_uri: str, assert_vectors_close: Callable[[Any, Any], None]
) -> None:
    by_modality = await client.post(
        EMBEDDINGS, json={"model": "fast", "input": [png_uri], "modality": "image"}
    )
    by_object = await client.post(EMBEDDINGS, json={"model": "fast", "input": [{"image": png_uri}]})
    by_part = await client.post(
        EMBEDDINGS,
        json={
            "model": "fast",
            "input": [{"type": "image_url", "image_url": {"url": png_uri}}, {"text": "a cat"}],
        },
    )
    assert {r.status_code for r in (by_modality, by_object, by_part)} == {200}
    vector = by_modality.json()["data"][0]["embedding"]
    assert_vectors_close(by_object.json()["data"][0]["embedding"], vector)
    assert_vectors_close(by_part.json()["data"][0]["embedding"], vector)
    assert by_part.json()["data"][1]["embedding"] != vector  # the text, mixed in


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "fast", "input": []}, 422, "input must not be empty"),
        ({"model": "fast", "input": ["ok", ""]}, 422, "input[1] is an empty string"),
        ({"model": "fast", "input": [{"image": "x", "text": "y"}]}, 422, "validation failed"),
        ({"model": "fast", "input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"model": "fast", "input": "x", "dimensions": 0}, 422, "dimensions"),
        (
            {"model": "fast", "input": ["data:image/png;base64,AAAA"], "modality": "image"},
            400,
            "image could not be decoded",
        ),
        (
            {"model": "fast", "input": ["a", {"image": "data:text/plain;base64,eA=="}]},
            415,
            "input[1]: ",
        ),
    ],
)
async def test_errors_take_openais_shape(
    client: Any, body: dict[str, Any], status: int, message: str
) -> None:
    response = await client.post(EMBEDDINGS, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_unknown_fields_are_accepted(client: Any) -> None:
    body = {"model": "fast", "input": "x", "user": "u-1", "some_new_openai_field": True}
    assert (await client.post(EMBEDDINGS, json=body)).status_code == 200


async def test_too_many_inputs_are_refused(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(server={"max_batch_items": 3}), FakeLoader())
    response = await client.post(EMBEDDINGS, json={"model": "fast", "input": ["a"] * 4})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "the request has 4 inputs; the limit is 3"


async def test_uploaded_images_are_embedded_like_data_uris(
    client: Any,
    photo_bytes: Callable[..., bytes],
    png_uri: str,
    assert_vectors_close: Callable[[Any, Any], None],
) -> None:
    files = [
        ("files", ("a.png", photo_bytes("astronaut", "PNG"), "image/png")),
        ("files", ("c.jpg", photo_bytes("coffee"), "image/jpeg")),
    ]
    response = await client.post("/v1/embeddings/images", files=files, data={"model": "fast"})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2
    reference = await client.post(
        EMBEDDINGS, json={"model": "fast", "input": [png_uri], "modality": "image"}
    )
    assert_vectors_close(data[0]["embedding"], reference.json()["data"][0]["embedding"])
    bad = await client.post(
        "/v1/embeddings/images", files=[("files", ("x.png", b"not a png", "image/png"))]
    )
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("files[0]: image could not be decoded")
    empty = await client.post(
        "/v1/embeddings/images", files=[("files", ("e.png", b"", "image/png"))]
    )
    assert empty.status_code == 400
    assert empty.json()["error"] == "files[0]: image could not be decoded: the data is empty"


async def test_oversized_uploads_are_refused(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    photo_bytes: Callable[..., bytes],
) -> None:
    client = await client_for(make_settings(media={"max_image_bytes": 1000}), FakeLoader())
    files = [("files", ("a.png", photo_bytes("astronaut", "PNG"), "image/png"))]
    response = await client.post("/v1/embeddings/images", files=files)
    assert response.status_code == 413
    assert "limit is 1000" in response.json()["error"]


async def test_cache_false_computes_again_on_every_embedding_route(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    photo_bytes: Callable[..., bytes],
) -> None:
    loader = FakeLoader()
    client = await client_for(make_settings(), loader)
    body = {"model": "fast", "input": ["a cat", "a dog"]}
    for extra in ({}, {}, {"cache": False}):  # computed, a hit, computed again
        assert (await client.post(EMBEDDINGS, json=body | extra)).status_code == 200
    assert sum(loader.loaded["fake-fast"].forwards("text")) == 4
    for extra in ({}, {}, {"cache": False}):
        assert (await client.post("/embed", json={"input_text": "hi"} | extra)).status_code == 200
    assert sum(loader.loaded["fake-text"].forwards("text")) == 2
    files = [("files", ("a.png", photo_bytes("astronaut", "PNG"), "image/png"))]
    for form in ({}, {}, {"cache": "false"}):
        response = await client.post("/v1/embeddings/images", files=files, data=form)
        assert response.status_code == 200, response.text
    assert sum(loader.loaded["fake-fast"].forwards("image")) == 2
    metrics = (await client.get("/metrics")).text
    assert 'clipserve_cache_hits_total{modality="text",model="fast",tier="memory"} 2.0' in metrics
    assert 'clipserve_cache_misses_total{modality="image",model="fast",tier="memory"} 1.0' in (
        metrics
    )
