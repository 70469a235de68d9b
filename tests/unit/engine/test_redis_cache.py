"""The Redis tier on its own: the entry format, and failures that are misses (a real Redis:
tests/integration/test_cache_redis.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import numpy as np
import pytest

from clipserve.engine.cache import CachedEmbedding, CacheKey, EmbeddingCache, MemoryCache
from clipserve.engine.redis_cache import COOLDOWN_S, RedisCache, pack, unpack
from clipserve.observability.metrics import Metrics


def entry(seed: int, dim: int = 8, **fields: object) -> CachedEmbedding:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return CachedEmbedding(vector, **fields)  # type: ignore[arg-type]


def key(digest: str = "d" * 64) -> CacheKey:
    return CacheKey("fast", "identity", "text", digest)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


# --- the entry format ---------------------------------------------------------------------------


def test_pack_round_trips_vectors_token_counts_and_truncation() -> None:
    value = entry(1, 512, token_count=77, truncated=True)
    data = pack(value)
    assert len(data) == 16 + 4 * 512  # a small header and the raw float32s
    back = unpack(data)
    assert back.vector.dtype == np.float32
    assert back.vector.flags.writeable  # torch.from_numpy takes it without a warning
    np.testing.assert_array_equal(back.vector, value.vector)
    assert (back.token_count, back.truncated) == (77, True)
    assert unpack(pack(entry(2))).truncated is False


@pytest.mark.parametrize(
    "data",
    [b"", b"CSE1", b"XXXX" + pack(entry(0))[4:], pack(entry(0))[:-1], pack(entry(0)) + b"\0"],
    ids=["empty", "header only", "magic", "short", "long"],
)
def test_unpack_refuses_what_pack_did_not_write(data: bytes) -> None:
    with pytest.raises(ValueError, match="cache entry"):
        unpack(data)


# --- the Redis tier, failing (a real Redis: tests/integration/test_cache_redis.py) --------------


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A loopback port that accepts connections and never answers."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def test_an_unreachable_redis_is_a_miss_counted_then_left_alone_for_a_while(
    metrics: Metrics,
) -> None:
    now = [0.0]
    redis = RedisCache(
        f"redis://127.0.0.1:{free_port()}/0", metrics=metrics, timeout_s=1, clock=lambda: now[0]
    )
    cache = EmbeddingCache(memory=MemoryCache(1 << 20, metrics), remote=redis, metrics=metrics)
    value = entry(3)

    async def compute() -> CachedEmbedding:
        return value

    assert await cache.get_or_compute(key(), compute) is value  # Redis failed: computed
    assert sample(metrics, "clipserve_cache_errors_total", tier="redis", operation="get") == 1
    # The write after the computation is skipped: Redis cools down after a failure.
    assert sample(metrics, "clipserve_cache_errors_total", tier="redis", operation="put") == 0
    now[0] += COOLDOWN_S
    await redis.put(key("other"), entry(1))  # tried again, failing again: counted, not raised
    assert sample(metrics, "clipserve_cache_errors_total", tier="redis", operation="put") == 1
    await redis.close()


async def test_a_redis_that_does_not_answer_costs_at_most_its_timeout(
    metrics: Metrics, silent_server: int
) -> None:
    redis = RedisCache(f"redis://127.0.0.1:{silent_server}/0", metrics=metrics, timeout_s=0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await redis.get(key()) is None
    assert loop.time() - started < 1.0
    assert sample(metrics, "clipserve_cache_errors_total", tier="redis", operation="get") == 1
    await redis.close()
