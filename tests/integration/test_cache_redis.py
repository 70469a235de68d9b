"""The embedding cache's Redis tier against a real Redis (Debian's redis-server, started here on
loopback and stopped by its pid): replicas share embeddings, entries are compact and expire,
``"cache": false`` writes nothing, and a broken entry or a Redis gone away is a miss."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from redis.asyncio import Redis

from clipserve.engine.redis_cache import unpack
from clipserve.testing import FakeLoader
from clipserve.testing.servers import RedisServer

EMBEDDINGS = "/v1/embeddings"
TTL_S = 3600


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def settings(make_settings: Callable[..., Any], redis_server: RedisServer) -> Any:
    return make_settings(cache={"redis_url": redis_server.url, "redis_ttl_s": TTL_S})


def metric(text: str, name: str, **labels: str) -> float:
    inside = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{inside}}} " if labels else f"{name} "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].split()[-1]) if lines else 0.0


async def test_replicas_share_embeddings_through_redis(
    client_for: Callable[..., Any], settings: Any, photo_bytes: Callable[..., bytes]
) -> None:
    image = "data:image/png;base64," + base64.b64encode(photo_bytes("rocket", "PNG")).decode()
    body = {"model": "fast", "input": [{"text": "a rocket"}, {"image": image}]}
    first_loader, second_loader = FakeLoader(), FakeLoader()
    first = await client_for(settings, first_loader)
    second = await client_for(settings, second_loader)  # another replica, the same Redis
    computed = await first.post(EMBEDDINGS, json=body)
    assert computed.status_code == 200, computed.text
    shared = await second.post(EMBEDDINGS, json=body)
    assert shared.status_code == 200, shared.text
    backend = second_loader.loaded["fake-fast"]
    assert backend.forwards("text") == backend.forwards("image") == []  # nothing computed
    for a, b in zip(computed.json()["data"], shared.json()["data"], strict=True):
        np.testing.assert_array_equal(a["embedding"], b["embedding"])  # float32, exactly
    assert shared.json()["usage"] == computed.json()["usage"]  # token counts travel too
    assert (await second.post(EMBEDDINGS, json=body)).status_code == 200  # now in memory

    metrics = (await second.get("/metrics")).text
    for modality in ("text", "image"):
        labels = {"model": "fast", "modality": modality}
        assert metric(metrics, "clipserve_cache_hits_total", **labels, tier="redis") == 1
        assert metric(metrics, "clipserve_cache_hits_total", **labels, tier="memory") == 1
        assert metric(metrics, "clipserve_cache_misses_total", **labels, tier="memory") == 1
    first_metrics = (await first.get("/metrics")).text
    labels = {"model": "fast", "modality": "text", "tier": "redis"}
    assert metric(first_metrics, "clipserve_cache_misses_total", **labels) == 1


async def test_entries_are_compact_expire_and_are_not_written_for_cache_false(
    client_for: Callable[..., Any], settings: Any, redis: Redis
) -> None:
    client = await client_for(settings, FakeLoader())
    opted_out = {"model": "fast", "input": "not cached", "cache": False}
    assert (await client.post(EMBEDDINGS, json=opted_out)).status_code == 200
    assert await redis.keys("clipserve:emb:*") == []
    assert (await client.post(EMBEDDINGS, json={"model": "fast", "input": "cached"})).is_success
    (key,) = await redis.keys("clipserve:emb:*")
    assert key.startswith(b"clipserve:emb:v1:fast:")
    assert b":text:" in key
    value = await redis.get(key)
    assert value is not None
    assert len(value) == 16 + 4 * 16  # a header and 16 float32s
    assert unpack(value).token_count == 3
    assert 0 < await redis.ttl(key) <= TTL_S


async def test_a_broken_entry_is_a_miss_and_is_written_again(
    client_for: Callable[..., Any], settings: Any, redis: Redis
) -> None:
    body = {"model": "fast", "input": "a cat"}
    first = await client_for(settings, FakeLoader())
    assert (await first.post(EMBEDDINGS, json=body)).is_success
    (key,) = await redis.keys("clipserve:emb:*")
    await redis.set(key, b"not an embedding")
    loader = FakeLoader()
    second = await client_for(settings, loader)
    assert (await second.post(EMBEDDINGS, json=body)).is_success
    assert sum(loader.loaded["fake-fast"].forwards("text")) == 1  # computed again
    metrics = (await second.get("/metrics")).text
    assert metric(metrics, "clipserve_cache_errors_total", tier="redis", operation="decode") == 1
    value = await redis.get(key)
    assert value is not None
    assert unpack(value).vector.shape == (16,)  # and written again


async def test_a_redis_gone_away_turns_into_misses_and_requests_go_on(
    client_for: Callable[..., Any], settings: Any, redis_server: RedisServer
) -> None:
    loader = FakeLoader()
    client = await client_for(settings, loader)
    assert (await client.post(EMBEDDINGS, json={"model": "fast", "input": "before"})).is_success
    redis_server.stop()
    for text in ("after", "after", "later"):
        response = await client.post(EMBEDDINGS, json={"model": "fast", "input": text})
        assert response.status_code == 200, response.text
    assert sum(loader.loaded["fake-fast"].forwards("text")) == 3  # "after" once: from memory
    metrics = (await client.get("/metrics")).text
    errors = metric(metrics, "clipserve_cache_errors_total", tier="redis", operation="get")
    assert errors >= 1
