"""The ML inference service's endpoints: /api/v1/caption, /api/v1/embed/{image,text}, warm-up
and capabilities covering caption models, the prefix setting, and POST /v1/qa (tiny real BLIP
and CLIP models)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image


def _data_uri(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def settings_for(
    make_settings: Callable[..., Any],
    tiny_caption_registry: dict[str, dict[str, Any]],
    tiny_registry: dict[str, dict[str, Any]],
) -> Callable[..., Any]:
    def make(**overrides: Any) -> Any:
        models = {"tiny": tiny_registry["tiny"], **tiny_caption_registry}
        return make_settings(models, default_model="tiny", **overrides)

    return make


@pytest.fixture
async def client(client_for: Callable[..., Any], settings_for: Callable[..., Any]) -> Any:
    return await client_for(settings_for())


async def test_caption_one_and_many_with_per_item_errors(client: Any) -> None:
    one = await client.post("/api/v1/caption", json={"image": _data_uri(0)})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["model"] == "blip"
    assert [c["index"] for c in body["captions"]] == [0]
    assert body["captions"][0]["caption"]
    assert body["timing"]["total_ms"] > 0

    many = await client.post(
        "/api/v1/caption",
        json={"images": [_data_uri(0), "data:image/png;base64,AAAA", _data_uri(2)]},
    )
    assert many.status_code == 200, many.text
    captions = many.json()["captions"]
    assert captions[0]["caption"] == body["captions"][0]["caption"]  # batched == alone
    assert captions[1]["caption"] is None
    assert captions[1]["error"].startswith("image could not be decoded")
    assert captions[2]["caption"]


async def test_caption_uploads(client: Any) -> None:
    files = [("files", (f"{i}.png", base64.b64decode(_data_uri(i).split(",")[1]))) for i in (0, 1)]
    response = await client.post(
        "/api/v1/caption", files=files, data={"prompt": "a photo of", "max_new_tokens": "4"}
    )
    assert response.status_code == 200, response.text
    captions = response.json()["captions"]
    assert len(captions) == 2
    assert all(c["caption"].startswith("a photo of") for c in captions)


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({}, 422, "send exactly one of 'image' or 'images'"),
        ({"image": "x", "images": ["y"]}, 422, "send exactly one of 'image' or 'images'"),
        ({"images": []}, 422, "send at least one image"),
        ({"image": "IMG", "max_new_tokens": 1000}, 422, "max_new_tokens must be between 1"),
        ({"image": "IMG", "num_beams": 50}, 422, "num_beams must be between 1"),
        ({"image": "IMG", "model": "tiny"}, 400, "model 'tiny' cannot caption images"),
        ({"image": "IMG", "model": "nope"}, 404, "nope"),
    ],
)
async def test_caption_errors(client: Any, body: dict[str, Any], status: int, error: str) -> None:
    if body.get("image") == "IMG":
        body["image"] = _data_uri(0)
    response = await client.post("/api/v1/caption", json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert error in payload["error"] or error in str(payload.get("detail"))


async def test_embed_image_and_text(client: Any) -> None:
    images = await client.post("/api/v1/embed/image", json={"images": [_data_uri(0), _data_uri(1)]})
    assert images.status_code == 200, images.text
    body = images.json()
    assert body["model"] == "tiny"
    vectors = np.array(body["embeddings"])
    assert vectors.shape == (2, body["dimensions"])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    texts = await client.post("/api/v1/embed/text", json={"texts": ["a cat", "a dog"]})
    assert texts.status_code == 200, texts.text
    assert np.array(texts.json()["embeddings"]).shape == (2, body["dimensions"])

    bad = await client.post("/api/v1/embed/image", json={"images": ["data:image/png;base64,AAAA"]})
    assert bad.status_code == 400
    assert bad.json()["error"].startswith("images[0]: image could not be decoded")
    wrong = await client.post("/api/v1/embed/text", json={"texts": ["a"], "model": "blip"})
    assert wrong.status_code == 400
    assert "cannot encode text inputs" in wrong.json()["error"]


async def test_qa(client: Any) -> None:
    response = await client.post(
        "/v1/qa", json={"model": "vqa", "image": _data_uri(0), "question": "what is this?"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "vqa"
    assert body["question"] == "what is this?"
    assert body["answer"]
    refused = await client.post(
        "/v1/qa", json={"model": "blip", "image": _data_uri(0), "question": "what is this?"}
    )
    assert refused.status_code == 400
    assert "cannot answer questions about images" in refused.json()["error"]
    empty = await client.post(
        "/v1/qa", json={"model": "vqa", "image": _data_uri(0), "question": ""}
    )
    assert empty.status_code == 422
    assert empty.json()["error"].startswith("question: the text is empty")


async def test_warmup_and_capabilities_cover_caption_models(client: Any) -> None:
    warm = await client.post("/api/v1/warmup", json={"models": ["blip", "vqa"]})
    assert warm.status_code == 200, warm.text
    reports = {m["model"]: m for m in warm.json()["models"]}
    assert reports["blip"]["error"] is None
    assert {p["modality"] for p in reports["vqa"]["passes"]} == {"answer"}
    capabilities = (await client.get("/api/v1/capabilities")).json()
    models = {m["name"]: m for m in capabilities["models"]}
    assert models["blip"]["modalities"] == ["caption"]
    assert [q["modality"] for q in models["vqa"]["queues"]] == ["answer"]


async def test_the_prefix_is_a_setting(
    client_for: Callable[..., Any], settings_for: Callable[..., Any]
) -> None:
    client = await client_for(settings_for(server={"inference_prefix": "/ml/v2"}))
    moved = await client.post("/ml/v2/caption", json={"image": _data_uri(0)})
    assert moved.status_code == 200, moved.text
    assert (await client.get("/ml/v2/capabilities")).status_code == 200
    assert (await client.post("/api/v1/caption", json={"image": _data_uri(0)})).status_code == 404
