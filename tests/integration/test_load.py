"""Load on a real uvicorn server over loopback, bounded in count and time: with a tiny queue every
request gets exactly one answer, 200 or an honest 429/503, and the service keeps serving."""

from __future__ import annotations

import asyncio
import base64
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx

from clipserve.config import Settings
from clipserve.testing import DeviceGate, FakeLoader

REQUESTS = 60


async def fire(
    base: str, bodies: list[tuple[str, dict[str, Any]]], on_status: Callable[[int], None]
) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:

        async def one(path: str, body: dict[str, Any]) -> httpx.Response:
            response = await client.post(path, json=body)
            on_status(response.status_code)
            return response

        async with asyncio.timeout(60):
            return await asyncio.gather(*(one(path, body) for path, body in bodies))


async def test_a_tiny_queue_answers_every_request_with_200_or_429(
    serve: Callable[..., str],
    make_settings: Callable[..., Settings],
    photo_bytes: Callable[..., bytes],
) -> None:
    gate = DeviceGate()
    settings = make_settings(batching={"max_queue_size": 2, "max_batch_size": 2})
    base = serve(settings, FakeLoader(before_forward=gate))
    image = "data:image/jpeg;base64," + base64.b64encode(photo_bytes("coffee")).decode()
    async with httpx.AsyncClient(base_url=base, timeout=30) as warm:
        assert (await warm.post("/embed", json={"input_text": "warm"})).status_code == 200
        warmed = await warm.post(
            "/evaluator/v1/evaluation/single", json={"image_input": image, "text_prompt": "w"}
        )
        assert warmed.status_code == 200
    gate.close()  # forward passes wait until the first refusal, so the queue really fills

    def on_status(status: int) -> None:
        if status == 429:
            gate.open()

    bodies: list[tuple[str, dict[str, Any]]] = []
    for i in range(REQUESTS):
        if i % 3 == 0:
            bodies.append(
                ("/evaluator/v1/evaluation/single", {"image_input": image, "text_prompt": f"t{i}"})
            )
        else:
            bodies.append(("/v1/embeddings", {"model": "fast", "input": f"text {i}"}))
    try:
        responses = await fire(base, bodies, on_status)
    finally:
        gate.open()

    statuses = Counter(r.status_code for r in responses)
    assert sum(statuses.values()) == REQUESTS  # every request answered, once
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses[429] >= 1, statuses
    assert statuses[200] >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            body = response.json()
            message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
            assert "overloaded" in message
        else:
            assert response.status_code == 200
    async with httpx.AsyncClient(base_url=base, timeout=30) as after:
        assert (await after.get("/ready")).status_code == 200
        health = (await after.get("/health")).json()
        assert health["queue_size"] == 0
        assert health["inflight_batches"] == 0
        assert (await after.post("/embed", json={"input_text": "still fine"})).status_code == 200


async def test_wait_mode_serves_every_request(
    serve: Callable[..., str], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(
        batching={"max_queue_size": 2, "max_batch_size": 2, "queue_overflow_action": "wait"}
    )
    base = serve(settings)
    bodies = [("/v1/embeddings", {"model": "fast", "input": f"text {i}"}) for i in range(REQUESTS)]
    responses = await fire(base, bodies, lambda status: None)
    assert Counter(r.status_code for r in responses) == {200: REQUESTS}
