"""Faults are contained: the request gets a clear error, the service keeps serving, and the
probes tell the truth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from clipserve.testing import DeviceGate, FakeLoader

EMBED = "/v1/embeddings"


def raising(exc: BaseException) -> Callable[[str, int], None]:
    def hook(modality: str, n: int) -> None:
        raise exc

    return hook


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_bodies_over_the_limit_get_413_declared_or_streamed(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(server={"max_body_bytes": 1000}), FakeLoader())
    big = {"model": "fast", "input": "x" * 2000}
    declared = await client.post(EMBED, json=big)
    assert declared.status_code == 413
    size = declared.request.headers["content-length"]
    assert declared.json()["error"]["message"] == (
        f"request body of {size} bytes is over the limit of 1000 bytes (max_body_bytes)"
    )
    streamed = await client.post(
        "/embed",
        content=chunks(b'{"input_text": "', b"y" * 600, b"y" * 600, b'"}'),
        headers={"content-type": "application/json"},
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"] == (
        "request body is over the limit of 1000 bytes (max_body_bytes)"
    )
    assert (await client.post("/embed", json={"input_text": "small"})).status_code == 200


async def test_too_many_distinct_images_are_refused(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(server={"max_images_per_request": 2}), FakeLoader())
    images = [f"https://img.example/{i}.png" for i in range(3)]
    response = await client.post(
        EMBED, json={"model": "fast", "input": images, "modality": "image"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "the request has 3 distinct images; the limit is 2"
    )
    batch = await client.post(
        "/evaluator/v1/evaluation/batch",
        json={"evaluations": [{"image_input": u, "text_prompt": "x"} for u in images]},
    )
    assert batch.status_code == 422


async def test_a_failing_model_is_reported_and_recovers(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    poison = frozenset({"t0", "t1", "t2", "t3", "t4", "t5"})
    settings = make_settings(model_retry_interval_s=0.3)
    client = await client_for(settings, FakeLoader(fail_texts=poison))

    async def fail_three(start: int) -> None:
        for i in range(start, start + 3):
            failed = await client.post(EMBED, json={"model": "fast", "input": f"t{i}"})
            assert failed.status_code == 500
            assert failed.json()["error"]["message"] == (
                "inference failed for model 'fast' (text): RuntimeError"
            )

    await fail_three(0)
    ready = await client.get("/ready")
    assert ready.status_code == 503
    assert "default model 'fast' is failing" in ready.json()["error"]
    assert "3 text inputs in a row" in ready.json()["error"]
    health = (await client.get("/evaluator/health")).json()
    assert health["status"] == "degraded"
    assert "is failing" in health["model_errors"]["fast"]
    other = await client.post(EMBED, json={"model": "minilm", "input": "other models serve"})
    assert other.status_code == 200
    assert (await client.get("/ready")).status_code == 503  # still: fast itself has not recovered
    assert (await client.post(EMBED, json={"model": "fast", "input": "fine"})).status_code == 200
    assert (await client.get("/ready")).status_code == 200  # a success resets the count
    await fail_three(3)
    assert (await client.get("/ready")).status_code == 503
    async with asyncio.timeout(10):  # after the retry interval traffic may probe it again
        while (await client.get("/ready")).status_code != 200:
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
async def test_a_worker_thread_that_dies_is_contained(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], exc: BaseException
) -> None:
    client = await client_for(make_settings(), FakeLoader(before_forward=raising(exc)))
    response = await client.post(EMBED, json={"model": "fast", "input": "x"})
    assert response.status_code == 500
    assert response.json()["error"]["message"] == (
        "inference failed for model 'fast' (text): RuntimeError"
    )
    assert (await client.get("/health")).status_code == 200  # the server is still up


async def test_a_stuck_batch_makes_the_service_not_ready(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    gate = DeviceGate()
    settings = make_settings(batching={"request_timeout": 0.2})
    client = await client_for(settings, FakeLoader(before_forward=gate))
    assert (await client.post(EMBED, json={"model": "fast", "input": "warm"})).status_code == 200
    gate.close()
    timed_out = await client.post(EMBED, json={"model": "fast", "input": "stuck"})
    assert timed_out.status_code == 504
    assert timed_out.json()["error"]["code"] == "timeout"
    async with asyncio.timeout(10):
        while (ready := await client.get("/ready")).status_code == 200:
            await asyncio.sleep(0.05)
    assert "batch running for" in ready.json()["error"]
    gate.open()
    async with asyncio.timeout(10):
        while (await client.get("/ready")).status_code != 200:
            await asyncio.sleep(0.05)


async def test_the_concurrency_limit_sheds_load_before_reading_bodies(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    gate = DeviceGate()
    settings = make_settings(server={"max_concurrent_requests": 1})
    client = await client_for(settings, FakeLoader(before_forward=gate))
    assert (await client.post(EMBED, json={"model": "fast", "input": "warm"})).status_code == 200
    gate.close()
    held = asyncio.ensure_future(client.post("/embed", json={"input_text": "held"}))
    await gate.entered()
    refused = await client.post("/embed", json={"input_text": "one too many"})
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {
        "error": "the server is overloaded: 1 requests are in progress "
        "(max_concurrent_requests 1); retry later",
        "detail": None,
    }
    openai_style = await client.post(EMBED, json={"model": "fast", "input": "x"})
    assert openai_style.status_code == 429
    assert openai_style.json()["error"]["code"] == "rate_limit_exceeded"
    assert (await client.get("/health")).status_code == 200  # probes are never shed
    assert (await client.get("/ready")).status_code == 200
    gate.open()
    assert (await held).status_code == 200
    assert (await client.post("/embed", json={"input_text": "room again"})).status_code == 200


async def test_a_trickling_body_gets_408_and_holds_no_concurrency_slot(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(server={"max_concurrent_requests": 1, "body_timeout_s": 0.3})
    client = await client_for(settings, FakeLoader())
    arrived = asyncio.Event()
    stop = asyncio.Event()

    async def slow_loris() -> AsyncIterator[bytes]:
        yield b'{"input_text": "'
        arrived.set()
        await stop.wait()  # then nothing more, for as long as the server lets it hang
        yield b'x"}'

    trickling = asyncio.ensure_future(
        client.post("/embed", content=slow_loris(), headers={"content-type": "application/json"})
    )
    await asyncio.wait_for(arrived.wait(), 5)
    # The half-sent request holds no slot: others are served meanwhile.
    assert (await client.post("/embed", json={"input_text": "served"})).status_code == 200
    response = await asyncio.wait_for(trickling, 10)
    stop.set()
    assert response.status_code == 408
    assert response.json()["error"] == (
        "the request body did not arrive within 0.3 s (body_timeout_s)"
    )
