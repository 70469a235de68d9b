from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from clipserve.testing import FakeLoader


@pytest.fixture
def uris(photo_bytes: Callable[..., bytes]) -> dict[str, str]:
    return {
        name: "data:image/png;base64," + base64.b64encode(photo_bytes(name, "PNG")).decode()
        for name in ("astronaut", "coffee")
    }


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(), FakeLoader())


# --- /v1/rank ------------------------------------------------------------------------------------


async def test_rank_texts_sorted_with_top_n_and_documents(
    client: Any, assert_similarities_close: Callable[[Any, Any], None]
) -> None:
    body = {
        "model": "fast",
        "query": "a cat",
        "documents": ["a dog", "a cat", {"text": "a car"}],
        "return_documents": True,
    }
    full = (await client.post("/v1/rank", json=body)).json()
    assert full["object"] == "rerank"
    assert full["model"] == "fast"
    assert full["results"][0] == {
        "index": 1,
        "relevance_score": pytest.approx(1.0, abs=1e-5),
        "document": "a cat",
        "error": None,
    }
    scores = [r["relevance_score"] for r in full["results"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in full["results"]) == [0, 1, 2]
    top = await client.post("/v1/rank", json={**body, "top_n": 1, "return_documents": False})
    assert_similarities_close(
        top.json()["results"],
        [
            {
                "index": 1,
                "relevance_score": full["results"][0]["relevance_score"],
                "document": None,
                "error": None,
            }
        ],
    )


async def test_rank_images_against_a_text_and_an_image_query(
    client: Any, uris: dict[str, str]
) -> None:
    documents = [uris["coffee"], uris["astronaut"]]
    by_text = await client.post(
        "/v1/rank",
        json={"query": "an astronaut", "documents": documents, "documents_modality": "image"},
    )
    assert by_text.status_code == 200, by_text.text
    by_image = await client.post(
        "/v1/rank",
        json={
            "query": {"image": uris["astronaut"]},
            "documents": documents,
            "documents_modality": "image",
            "return_documents": True,
        },
    )
    best = by_image.json()["results"][0]
    assert best["index"] == 1
    assert best["relevance_score"] == pytest.approx(1.0, abs=1e-5)
    assert best["document"].startswith("data:image/png;base64,")
    assert len(best["document"]) < 200


async def test_rank_uploads(client: Any, photo_bytes: Callable[..., bytes]) -> None:
    files = [
        ("files", ("c.png", photo_bytes("coffee", "PNG"), "image/png")),
        ("files", ("a.png", photo_bytes("astronaut", "PNG"), "image/png")),
    ]
    response = await client.post(
        "/v1/rank", files=files, data={"query": "an astronaut", "model": "fast"}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["results"]) == 2
    by_image = await client.post(
        "/v1/rank",
        files=[("query_file", ("a.png", photo_bytes("astronaut", "PNG"), "image/png"))],
        data={"documents": ["a cat", "an astronaut"]},
    )
    assert by_image.status_code == 200, by_image.text
    neither = await client.post("/v1/rank", files=files)
    assert neither.status_code == 422
    assert (
        neither.json()["error"] == "send exactly one of 'query' (a text) or 'query_file' (an image)"
    )


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"query": "q", "documents": []}, 422, "documents"),
        ({"documents": ["a"]}, 422, "query"),
        ({"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
        (
            {"query": "q", "documents": ["a"], "model": "nope"},
            404,
            "model config 'nope' is unknown",
        ),
        (
            {"query": {"image": "data:image/png;base64,AAAA"}, "documents": ["a"]},
            400,
            "query: image could not be decoded",
        ),
        ({"query": "q", "documents": [{"texts": "a"}]}, 422, "documents.0"),
        (
            {"query": {"image": "x"}, "documents": ["a"], "model": "minilm"},
            400,
            "cannot encode image",
        ),
    ],
)
async def test_rank_errors(client: Any, body: dict[str, Any], status: int, message: str) -> None:
    response = await client.post("/v1/rank", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


async def test_a_failing_document_fails_alone_and_is_listed_last(
    client: Any, uris: dict[str, str]
) -> None:
    body = {
        "query": "a cat",
        "documents": [
            {"image": "data:image/png;base64,AAAA"},
            "a cat",
            {"text": ""},
            {"image": uris["coffee"]},
            "a dog",
        ],
        "top_n": 1,
    }
    response = await client.post("/v1/rank", json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [1, 0, 2]  # the best (top_n 1), then every failure
    assert results[0]["error"] is None
    assert results[1]["relevance_score"] is None
    assert results[1]["error"].startswith("image could not be decoded")
    assert results[2] == {
        "index": 2,
        "relevance_score": None,
        "document": None,
        "error": "the text is empty (or only whitespace)",
    }


# --- /v1/classify --------------------------------------------------------------------------------


async def test_classify_one_image_and_a_list(client: Any, uris: dict[str, str]) -> None:
    labels = ["astronaut", "coffee", "cat"]
    one = await client.post("/v1/classify", json={"input": uris["astronaut"], "labels": labels})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "classification"
    assert body["model"] == "fast"
    (row,) = body["data"]
    assert row["index"] == 0
    assert row["top_label"] == row["labels"][0]["label"]
    assert sum(label["probability"] for label in row["labels"]) == pytest.approx(1.0, abs=1e-5)
    assert sorted(label["index"] for label in row["labels"]) == [0, 1, 2]
    many = await client.post(
        "/v1/classify",
        json={
            "input": [uris["astronaut"], {"image": uris["coffee"]}],
            "labels": labels,
            "template": "a picture of {}",
        },
    )
    assert [r["index"] for r in many.json()["data"]] == [0, 1]


async def test_classify_uploads_with_repeated_labels_or_a_json_array(
    client: Any,
    photo_bytes: Callable[..., bytes],
    uris: dict[str, str],
    assert_similarities_close: Callable[[Any, Any], None],
) -> None:
    files = [("files", ("a.png", photo_bytes("astronaut", "PNG"), "image/png"))]
    repeated = await client.post("/v1/classify", files=files, data={"labels": ["astronaut", "cat"]})
    as_json = await client.post(
        "/v1/classify", files=files, data={"labels": json.dumps(["astronaut", "cat"])}
    )
    reference = await client.post(
        "/v1/classify", json={"input": uris["astronaut"], "labels": ["astronaut", "cat"]}
    )
    assert repeated.status_code == as_json.status_code == 200
    assert_similarities_close(repeated.json(), reference.json())
    assert_similarities_close(as_json.json(), reference.json())
    no_labels = await client.post("/v1/classify", files=files)
    assert no_labels.status_code == 422
    assert "labels" in no_labels.json()["error"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"input": "IMG", "labels": []}, 422, "labels"),
        ({"input": "IMG", "labels": ["a", " "]}, 422, "labels must not be empty strings"),
        (
            {"input": "IMG", "labels": ["a"], "template": "no slot"},
            422,
            "template must contain '{}'",
        ),
        ({"input": [], "labels": ["a"]}, 422, "at least one image"),
        ({"input": "IMG", "labels": ["a"], "model": "minilm"}, 400, "cannot encode image"),
        ({"input": [{"img": "x"}], "labels": ["a"]}, 422, "input"),
    ],
)
async def test_classify_errors(
    client: Any, uris: dict[str, str], body: dict[str, Any], status: int, message: str
) -> None:
    if body["input"] == "IMG":
        body = {**body, "input": uris["astronaut"]}
    response = await client.post("/v1/classify", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


async def test_openapi_documents_json_and_multipart_bodies(client: Any) -> None:
    spec = (await client.get("/openapi.json")).json()
    for path in ("/v1/rank", "/v1/classify"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
    assert "/v1/embeddings" in spec["paths"]
    assert "/v1/embeddings/images" in spec["paths"]


async def test_a_failing_image_fails_alone(client: Any, uris: dict[str, str]) -> None:
    body = {"input": [uris["astronaut"], "data:image/png;base64,AAAA", ""], "labels": ["a", "b"]}
    response = await client.post("/v1/classify", json=body)
    assert response.status_code == 200, response.text
    good, bad, empty = response.json()["data"]
    assert good["error"] is None
    assert good["top_label"] in ("a", "b")
    assert bad["top_label"] is None
    assert bad["labels"] == []
    assert bad["error"].startswith("image could not be decoded")
    assert empty["error"].startswith("image input is empty")
