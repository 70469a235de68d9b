"""POST /v1/score: CLIP-score and cosine matrices, per-item errors, bounds."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from clipserve.testing import FakeLoader

SINGLE = "/evaluator/v1/evaluation/single"


@pytest.fixture
def uris(photo_bytes: Callable[..., bytes]) -> dict[str, str]:
    return {
        name: "data:image/png;base64," + base64.b64encode(photo_bytes(name, "PNG")).decode()
        for name in ("astronaut", "coffee", "chelsea")
    }


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(), FakeLoader())


async def test_image_by_text_scores_equal_single_evaluations(
    client: Any, uris: dict[str, str], assert_scores_close: Callable[[Any, Any], None]
) -> None:
    images = [uris["astronaut"], uris["coffee"]]
    texts = ["an astronaut", "a cup of coffee", "a cat"]
    response = await client.post("/v1/score", json={"images": images, "texts": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "fast"
    assert body["formula"] == "clip_score = max(100 * cos(image, text), 0)"
    assert body["images"] == [{"index": 0, "error": None}, {"index": 1, "error": None}]
    assert [t["index"] for t in body["texts"]] == [0, 1, 2]
    assert body["image_similarity"] is None
    assert body["text_similarity"] is None
    expected = []
    for image in images:
        row = []
        for text in texts:
            single = await client.post(SINGLE, json={"image_input": image, "text_prompt": text})
            row.append(single.json()["clip_score"])
        expected.append(row)
    assert_scores_close(body["scores"], expected)
    assert body["timing"]["total_ms"] > 0


async def test_images_alone_give_image_similarity_and_texts_alone_text_similarity(
    client: Any, uris: dict[str, str]
) -> None:
    images = (await client.post("/v1/score", json={"images": list(uris.values())})).json()
    assert images["scores"] is None
    assert images["text_similarity"] is None
    matrix = np.array(images["image_similarity"])
    assert matrix.shape == (3, 3)
    np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-5)
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    assert (matrix < 1 - 1e-3)[~np.eye(3, dtype=bool)].all()  # different photos differ

    texts = (await client.post("/v1/score", json={"texts": ["a cat", "a dog"]})).json()
    assert texts["scores"] is None
    assert texts["image_similarity"] is None
    np.testing.assert_allclose(np.diag(np.array(texts["text_similarity"])), 1.0, atol=1e-5)

    both = await client.post(
        "/v1/score",
        json={"images": [uris["coffee"]], "texts": ["a cat"], "self_similarity": True},
    )
    body = both.json()
    assert len(body["scores"]) == 1
    assert body["image_similarity"] == [[pytest.approx(1.0, abs=1e-5)]]
    assert body["text_similarity"] == [[pytest.approx(1.0, abs=1e-5)]]


async def test_failed_inputs_carry_their_error_and_null_cells(
    client: Any, uris: dict[str, str]
) -> None:
    body = {"images": [uris["coffee"], "data:image/png;base64,AAAA"], "texts": ["a cup", "  "]}
    response = await client.post("/v1/score", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["images"][0]["error"] is None
    assert result["images"][1]["error"].startswith("image could not be decoded")
    assert result["texts"][1]["error"] == "the text is empty (or only whitespace)"
    assert result["scores"][0][0] is not None
    assert result["scores"][0][1] is None
    assert result["scores"][1] == [None, None]


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({}, 422, "send images, texts or both"),
        ({"images": [], "texts": []}, 422, "send images, texts or both"),
        ({"texts": ["a"] * 400}, 422, "400 texts would answer 160000 scores; the limit is 100000"),
        ({"texts": ["a"], "model": "nope"}, 404, "'nope' is unknown"),
        ({"texts": ["a"] * 1001}, 422, "1001"),
        ({"images": ["x"], "texts": ["a"], "extra": 1}, 422, "extra"),
    ],
)
async def test_refusals(client: Any, body: dict[str, Any], status: int, error: str) -> None:
    response = await client.post("/v1/score", json=body)
    assert response.status_code == status, response.text
    assert error in response.text
