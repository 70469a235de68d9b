from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipserve.testing import FakeLoader


async def test_health_reports_the_batcher_and_the_default_model(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(), FakeLoader())
    await client.post("/v1/embeddings", json={"model": "fast", "input": ["a", "b"]})
    response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["model"] == "fast"
    assert body["model_state"] == "loaded"
    assert body["device"] == "cpu"
    assert body["queue_size"] == 0
    assert body["inflight_batches"] == 0
    batching = body["batch_processing"]
    assert batching["accepting"] is True
    assert batching["max_batch_size"] == 32
    assert batching["max_queue_size"] == 1000
    assert batching["items_processed"] == 2
    queues = {(q["model"], q["modality"]): q for q in batching["queues"]}
    assert set(queues) == {("fast", "text"), ("fast", "image")}  # built when the model loaded
    assert queues["fast", "text"]["items"] == 2
    assert (await client.get("/ready")).json() == {"status": "ready"}


async def test_not_ready_while_the_default_model_fails(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(default_model="broken"), FakeLoader())
    assert (await client.get("/ready")).status_code == 200  # lazy: not tried yet
    failed = await client.post("/v1/embeddings", json={"input": "x"})
    assert failed.status_code == 503
    health = await client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert health.json()["model_state"] == "error"
    assert "failed to load" in health.json()["error"]
    assert int(health.headers["retry-after"]) >= 1
    ready = await client.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "not_ready"
    assert "simulated load failure" in ready.json()["error"]


async def test_metrics_include_the_batcher_series(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(), FakeLoader())
    await client.post("/embed", json={"input_text": "hello"})
    text = (await client.get("/metrics")).text
    for name in (
        "batcher_requests_total",
        "batcher_request_latency_seconds",
        "batcher_batch_size",
        "batcher_batch_wait_time_seconds",
        "batcher_inference_time_seconds",
        "batcher_queue_size",
        "batcher_inflight_batches",
        "http_requests_total",
    ):
        assert f"# TYPE {name} " in text, name
    assert 'batcher_requests_total{modality="text",model="minilm",outcome="ok"} 1.0' in text
    evaluator = (await client.get("/evaluator/metrics")).text
    assert "# TYPE batcher_queue_size " in evaluator  # one registry behind both paths
