from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clipserve.testing import FakeLoader

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"
RESPONSE_FIELDS = {
    "image_input",
    "text_prompt",
    "clip_score",
    "processing_time_ms",
    "model_used",
    "error",
    "text_truncated",
    "text_context_length",
}


@pytest.fixture
def jpeg_uri(photo_bytes: Callable[..., bytes]) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(photo_bytes("astronaut")).decode()


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(), FakeLoader())


async def test_single_has_the_contract_fields(client: Any, jpeg_uri: str) -> None:
    response = await client.post(
        SINGLE,
        json={"image_input": jpeg_uri, "text_prompt": "an astronaut", "model_config_name": "fast"},
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == RESPONSE_FIELDS
    assert 0 <= body["clip_score"] <= 100
    assert body["model_used"] == "fast"
    assert body["error"] is None
    assert body["text_prompt"] == "an astronaut"
    assert body["image_input"].startswith("data:image/jpeg;base64,")
    assert len(body["image_input"]) < 200  # long data URIs are abbreviated in the echo
    assert body["processing_time_ms"] >= 0


async def test_single_uses_the_default_model_and_a_local_path(
    client: Any, photos: dict[str, Any], tmp_path: Path
) -> None:
    photos["chelsea"].save(tmp_path / "cat.png")
    response = await client.post(SINGLE, json={"image_input": "cat.png", "text_prompt": "a cat"})
    assert response.status_code == 200, response.text
    assert response.json()["model_used"] == "fast"


@pytest.mark.parametrize(
    ("payload", "status", "message"),
    [
        ({"text_prompt": "x"}, 422, "request validation failed: image_input: Field required"),
        ({"image_input": "", "text_prompt": "x"}, 422, "image_input is empty"),
        ({"image_input": "cat.png", "text_prompt": " "}, 422, "text_prompt is empty"),
        ({"image_input": 5, "text_prompt": "x"}, 422, "image_input: Input should be a valid"),
        (
            {"image_input": "data:image/png;base64,AAAA", "text_prompt": "x"},
            400,
            "image could not be decoded",
        ),
        ({"image_input": "data:text/plain;base64,aGk=", "text_prompt": "x"}, 415, "text/plain"),
        ({"image_input": "/etc/passwd", "text_prompt": "x"}, 400, "media root"),
        ({"image_input": "missing.png", "text_prompt": "x"}, 400, "not found"),
        ({"image_input": "ftp://example.com/a.png", "text_prompt": "x"}, 415, "ftp"),
        (
            {
                "image_input": "data:image/png;base64,AAAA",
                "text_prompt": "x",
                "model_config_name": "nope",
            },
            404,
            "'nope' is unknown; available models: fast, accurate, blip, minilm, broken",
        ),
        (
            {
                "image_input": "data:image/png;base64,AAAA",
                "text_prompt": "x",
                "model_config_name": "broken",
            },
            503,
            "model 'broken' is unavailable: simulated load failure",
        ),
    ],
)
async def test_single_errors_have_status_and_json_body(
    client: Any, payload: dict[str, Any], status: int, message: str
) -> None:
    response = await client.post(SINGLE, json=payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert message in body["error"]


async def test_unavailable_model_sends_retry_after(client: Any, jpeg_uri: str) -> None:
    payload = {"image_input": jpeg_uri, "text_prompt": "x", "model_config_name": "broken"}
    response = await client.post(SINGLE, json=payload)
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["detail"]["model"] == "broken"


async def test_malformed_json_is_422(client: Any) -> None:
    response = await client.post(
        SINGLE, content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"].startswith("request validation failed")


async def test_batch_keeps_order_and_reports_per_item_failures(client: Any, jpeg_uri: str) -> None:
    evaluations = [
        {"image_input": jpeg_uri, "text_prompt": "one"},
        {"image_input": "data:image/png;base64,AAAA", "text_prompt": "broken image"},
        {"image_input": jpeg_uri, "text_prompt": "three", "model_config_name": "accurate"},
        {"image_input": jpeg_uri, "text_prompt": "four", "model_config_name": "nope"},
    ]
    response = await client.post(BATCH, json={"evaluations": evaluations, "batch_size": 2})
    assert response.status_code == 200
    body = response.json()
    assert body["total_processed"] == 4
    assert body["total_successful"] == 2
    assert body["total_failed"] == 2
    assert body["total_processing_time_ms"] > 0
    results = body["results"]
    assert [r["text_prompt"] for r in results] == ["one", "broken image", "three", "four"]
    assert results[0]["clip_score"] is not None
    assert results[1]["clip_score"] is None
    assert results[1]["error"].startswith("image could not be decoded")
    assert results[2]["model_used"] == "accurate"
    assert "unknown" in results[3]["error"]
    assert all(set(r) == RESPONSE_FIELDS for r in results)


async def test_item_problems_fail_alone_in_a_batch_of_32(client: Any, jpeg_uri: str) -> None:
    """A CSV row with a blank URL (or prompt, or a model that does not exist) fails alone."""
    evaluations: list[dict[str, Any]] = [
        {"image_input": jpeg_uri, "text_prompt": f"caption {i}"} for i in range(32)
    ]
    evaluations[3]["image_input"] = ""
    evaluations[11]["text_prompt"] = ""
    evaluations[20]["model_config_name"] = "does-not-exist"
    response = await client.post(BATCH, json={"evaluations": evaluations})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["total_successful"], body["total_failed"]) == (29, 3)
    errors = {i: r["error"] for i, r in enumerate(body["results"]) if r["error"] is not None}
    assert errors[3].startswith("image_input is empty")
    assert errors[11] == "text_prompt is empty"
    assert errors[20].startswith("model config 'does-not-exist' is unknown")
    assert set(errors) == {3, 11, 20}
    assert body["results"][20]["model_used"] == "does-not-exist"


async def test_a_structurally_broken_batch_is_422(client: Any, jpeg_uri: str) -> None:
    for evaluations in ([{"image_input": 5, "text_prompt": "x"}], "not a list", [None]):
        response = await client.post(BATCH, json={"evaluations": evaluations})
        assert response.status_code == 422, response.text
        assert response.json()["error"].startswith("request validation failed: evaluations")


async def test_batch_limits(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], jpeg_uri: str
) -> None:
    client = await client_for(make_settings(server={"max_batch_items": 2}), FakeLoader())
    item = {"image_input": jpeg_uri, "text_prompt": "x"}
    response = await client.post(BATCH, json={"evaluations": [item] * 3})
    assert response.status_code == 422
    assert response.json()["error"] == "the request has 3 evaluations; the limit is 2"
    empty = await client.post(BATCH, json={"evaluations": []})
    assert empty.status_code == 422
    # Counted before the items are validated: one error, not two per item.
    broken = await client.post(BATCH, json={"evaluations": [{}] * 5000})
    assert broken.status_code == 422
    assert broken.json() == {
        "error": "the request has 5000 evaluations; the limit is 2",
        "detail": {"max_batch_items": 2},
    }
    bad_size = await client.post(BATCH, json={"evaluations": [item], "batch_size": 0})
    assert bad_size.status_code == 422


async def test_client_chosen_names_never_become_metric_labels(client: Any, jpeg_uri: str) -> None:
    evaluations = [
        {"image_input": jpeg_uri, "text_prompt": "x", "model_config_name": f"made-up-{i}"}
        for i in range(3)
    ]
    assert (await client.post(BATCH, json={"evaluations": evaluations})).status_code == 200
    assert (await client.request("PROPFIND", SINGLE)).status_code == 405
    text = (await client.get("/metrics")).text
    assert "made-up" not in text
    assert 'evaluation_errors_total{error_type="ModelNotFoundError",model="unknown"} 3.0' in text
    assert "PROPFIND" not in text
    assert 'method="other"' in text
