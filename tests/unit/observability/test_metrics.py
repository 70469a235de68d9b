"""Metrics of the batcher queues: each queue's capacity is exported next to its size, so that
how full a queue is (size / capacity, what the queue-near-full alert watches) is read from the
service, not from a threshold copied into the rules."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from clipserve.observability.metrics import Metrics
from clipserve.testing import FakeLoader


def samples(exposition: str, name: str) -> dict[tuple[str, str], float]:
    """``{(model, modality): value}`` of one family labelled by model and modality."""
    pattern = re.compile(
        rf'^{name}\{{modality="([^"]*)",model="([^"]*)"\}} ([0-9.e+-]+)$', re.MULTILINE
    )
    return {(model, modality): float(v) for modality, model, v in pattern.findall(exposition)}


async def test_each_queue_exports_its_capacity_beside_its_size(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(batching={"max_queue_size": 37}), FakeLoader())
    response = await client.post("/v1/embeddings", json={"model": "fast", "input": "hi"})
    assert response.status_code == 200
    text = (await client.get("/metrics")).text
    capacity = samples(text, "batcher_queue_capacity")
    size = samples(text, "batcher_queue_size")
    assert capacity == {("fast", "text"): 37.0, ("fast", "image"): 37.0}
    assert set(size) == set(capacity)  # every queue has both: the alert's ratio never misses one
    assert all(size[queue] / capacity[queue] == 0.0 for queue in capacity)


def test_a_models_capacity_goes_with_its_other_series() -> None:
    metrics = Metrics()
    metrics.batcher_queue_capacity.labels("fast", "text").set(10)
    metrics.batcher_queue_capacity.labels("accurate", "text").set(10)
    metrics.forget_model("fast")  # unloaded
    assert set(samples(metrics.render().decode(), "batcher_queue_capacity")) == {
        ("accurate", "text")
    }
