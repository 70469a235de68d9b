from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import pytest

from clipserve.testing import FakeLoader


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(), FakeLoader())


async def test_health_is_healthy_then_degraded_when_a_model_fails(client: Any) -> None:
    health = (await client.get("/evaluator/health")).json()
    assert health["status"] == "healthy"
    assert health["models"]["fast"] == "not_loaded"
    assert health["gpu"] is None  # no CUDA here
    await client.post(
        "/evaluator/v1/evaluation/single",
        json={"image_input": "x.png", "text_prompt": "x", "model_config_name": "broken"},
    )
    response = await client.get("/evaluator/health")
    assert response.status_code == 200
    health = response.json()
    assert health["status"] == "degraded"
    assert health["models"]["broken"] == "error"
    assert "simulated load failure" in health["model_errors"]["broken"]


async def test_status_reports_versions_and_limits(client: Any) -> None:
    status = (await client.get("/v1/system/status")).json()
    assert status["version"] == "0.1.0"
    assert status["cuda_available"] is False
    assert status["device"] == "cpu"
    assert status["models_total"] == 5
    assert status["limits"]["max_image_bytes"] == 20 * 1024 * 1024
    assert status["config_path"].endswith("models.json")


async def test_metrics_expose_the_contract_names(
    client: Any, photo_bytes: Callable[..., bytes]
) -> None:
    uri = "data:image/jpeg;base64," + base64.b64encode(photo_bytes("rocket")).decode()
    ok = await client.post(
        "/evaluator/v1/evaluation/batch",
        json={
            "evaluations": [
                {"image_input": uri, "text_prompt": "a rocket"},
                {"image_input": "data:image/png;base64,AAAA", "text_prompt": "bad"},
            ]
        },
    )
    assert ok.status_code == 200
    response = await client.get("/evaluator/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in (
        "http_requests_total",
        "http_request_duration_seconds",
        "clip_score_distribution",
        "inference_time_seconds",
        "image_processing_time_seconds",
        "model_load_time_seconds",
        "evaluation_errors_total",
        "batch_processing_efficiency",
    ):
        assert f"# TYPE {name}" in text, name
    assert (
        'http_requests_total{endpoint="/evaluator/v1/evaluation/batch",'
        'method="POST",status="200"} 1.0' in text
    )
    assert 'evaluation_errors_total{error_type="InvalidImageError",model="fast"} 1.0' in text
    assert 'clip_score_distribution_count{model="fast"} 1.0' in text
    assert 'model_load_time_seconds{model="fast"}' in text


async def test_unmatched_routes_are_404_json_with_bounded_metric_labels(client: Any) -> None:
    response = await client.get("/no/such/path/123")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found", "detail": {"path": "/no/such/path/123"}}
    text = (await client.get("/evaluator/metrics")).text
    assert 'endpoint="unmatched"' in text
    assert "/no/such/path/123" not in text


async def test_request_id_is_echoed_or_generated(client: Any) -> None:
    echoed = await client.get("/evaluator/health", headers={"x-request-id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = await client.get(
        "/evaluator/health", headers={"x-request-id": "bad id with spaces"}
    )
    assert len(generated.headers["x-request-id"]) == 32


async def test_openapi_docs_are_served_with_examples(client: Any) -> None:
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert "/evaluator/v1/evaluation/single" in spec["paths"]
    schema = spec["components"]["schemas"]["EvaluationRequest"]
    assert schema["examples"][0]["model_config_name"] == "fast"


async def test_status_and_health_report_recent_requests_and_scrapes_read_queue_ages(
    client_for: Any, make_settings: Any
) -> None:
    from clipserve.testing import FakeLoader

    client = await client_for(make_settings(), FakeLoader())
    for _ in range(3):
        assert (
            await client.post("/v1/embeddings", json={"model": "fast", "input": "x"})
        ).is_success
    await client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    status = (await client.get("/v1/system/status")).json()
    assert status["recent"]["window_s"] == 300.0
    assert status["recent"]["requests"] == 4
    assert status["recent"]["server_errors"] == 0
    assert status["recent"]["error_rate"] == 0.0
    assert status["gpu"] is None  # no CUDA here
    health = (await client.get("/evaluator/health")).json()
    assert health["recent"]["requests"] == 5  # and the status request
    metrics = (await client.get("/metrics")).text
    assert 'batcher_oldest_item_age_seconds{modality="text",model="fast"} 0.0' in metrics
