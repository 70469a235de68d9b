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
    settings = make_settings(
        batching={"max_queue_size": 2, "max_batch_size": 2, "client_queue_share": 1.0}
    )  # one client: the whole queue may be its share
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


async def test_a_flooding_client_meets_its_own_limit_while_others_are_served(
    serve: Callable[..., str], make_settings: Callable[..., Settings]
) -> None:
    """Behind one trusted proxy, 40 requests from one client address against a queue of 8: it
    holds at most half the queue and gets the 429s; another client's requests, sent while the
    flood waits, are all admitted and served."""
    gate = DeviceGate()
    settings = make_settings(
        batching={"max_queue_size": 8, "max_batch_size": 1, "client_queue_share": 0.5},
        rate_limit={"trusted_proxies": 1},
    )
    base = serve(settings, FakeLoader(before_forward=gate))
    flood_headers = {"X-Forwarded-For": "203.0.113.7"}
    polite_headers = {"X-Forwarded-For": "198.51.100.9"}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        warm = await client.post("/v1/embeddings", json={"model": "fast", "input": "warm"})
        assert warm.status_code == 200
        gate.close()

        async def post(text: str, headers: dict[str, str]) -> httpx.Response:
            body = {"model": "fast", "input": text}
            return await client.post("/v1/embeddings", json=body, headers=headers)

        async with asyncio.timeout(60):
            flood = [asyncio.ensure_future(post(f"flood {i}", flood_headers)) for i in range(40)]
            while sum(f.done() for f in flood) < 40 - 5:  # 1 running + 4 queued: the rest refused
                await asyncio.wait(flood, return_when=asyncio.FIRST_COMPLETED)
            polite = [asyncio.ensure_future(post(f"polite {i}", polite_headers)) for i in range(3)]
            health = None
            while health is None or health["queue_size"] < 7:  # 4 flood + 3 polite waiting
                health = (await client.get("/health")).json()
            gate.open()
            flooded = await asyncio.gather(*flood)
            served = await asyncio.gather(*polite)
    statuses = Counter(r.status_code for r in flooded)
    assert statuses == {200: 5, 429: 35}, statuses
    refused = next(r for r in flooded if r.status_code == 429)
    assert "too many requests from this client" in refused.json()["error"]["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in served] == [200, 200, 200]
