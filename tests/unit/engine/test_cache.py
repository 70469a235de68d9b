"""The embedding cache: keys that never collide, the LRU's byte bound, single flight when the first
computation fails or is cancelled (the Redis tier: test_redis_cache.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import unicodedata
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clipserve.config import CacheSettings
from clipserve.engine.cache import (
    ENTRY_OVERHEAD_BYTES,
    CachedEmbedding,
    CacheKey,
    EmbeddingCache,
    MemoryCache,
    text_digest,
    weights_identity,
)
from clipserve.engine.redis_cache import RedisCache
from clipserve.errors import (
    InferenceTimeoutError,
    InvalidImageError,
    QueueFullError,
)
from clipserve.model_specs import ModelSpec
from clipserve.observability.metrics import Metrics
from clipserve.testing import FakeBackend


def entry(seed: int, dim: int = 8, **fields: Any) -> CachedEmbedding:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return CachedEmbedding(vector, **fields)


def key(digest: str = "d" * 64, *, model: str = "fast", kind: str = "text") -> CacheKey:
    return CacheKey(model, "identity", kind, digest)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class Computation:
    """A ``compute`` for ``get_or_compute`` that counts its calls and runs until released."""

    def __init__(self, value: CachedEmbedding | None = None) -> None:
        self.value = value or entry(0)
        self.calls = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.error: BaseException | None = None

    async def __call__(self) -> CachedEmbedding:
        self.calls += 1
        self.started.set()
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.001)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def cache(metrics: Metrics) -> EmbeddingCache:
    return EmbeddingCache(memory=MemoryCache(1 << 20, metrics), remote=None, metrics=metrics)


# --- keys ---------------------------------------------------------------------------------------


def test_a_text_and_bytes_of_the_same_digest_never_share_a_key() -> None:
    digest = text_digest("abc")
    assert digest == hashlib.sha256(b"abc").hexdigest()  # the same digest...
    text, exact, fast = (key(digest, kind=k) for k in ("text", "image/exact", "image/fast"))
    assert len({str(text), str(exact), str(fast)}) == 3  # ...never the same key
    assert str(key(digest, model="fast")) != str(key(digest, model="accurate"))
    assert (text.modality, fast.modality) == ("text", "image")


def test_text_digests_fold_nothing() -> None:
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    variants = ["cat", "Cat", "cat ", " cat", "cat\n", nfc, nfd]
    assert len({text_digest(v) for v in variants}) == len(variants)
    assert text_digest("a photo of a cat") == text_digest("a photo " + "of a cat")


def test_weights_identity_follows_the_weights_precision_and_device_type() -> None:
    info = FakeBackend().info
    spec = ModelSpec(model_name="fake-fast", pretrained="tag")
    identity = weights_identity(spec, info)
    assert identity == weights_identity(ModelSpec(model_name="fake-fast", pretrained="tag"), info)
    assert identity == weights_identity(spec.model_copy(update={"description": "new"}), info)
    for changed in ({"pretrained": "other"}, {"precision": "int8"}, {"model_name": "fake-b"}):
        assert identity != weights_identity(spec.model_copy(update=changed), info)
    on = {d: dataclasses.replace(info, device=d) for d in ("cuda:0", "cuda:1")}
    assert weights_identity(spec, on["cuda:0"]) == weights_identity(spec, on["cuda:1"])
    assert weights_identity(spec, on["cuda:0"]) != identity
    assert weights_identity(spec, dataclasses.replace(info, dtype="float16")) != identity


def test_weights_identity_of_local_weights_follows_their_files(tmp_path: Path) -> None:
    weights = tmp_path / "model"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(b"1" * 10)
    spec = ModelSpec(model_name=f"local-dir:{weights}")
    info = FakeBackend().info
    before = weights_identity(spec, info)
    assert before == weights_identity(spec, info)
    (weights / "model.safetensors").write_bytes(b"2" * 11)  # new weights, same path
    assert weights_identity(spec, info) != before


# --- the in-process tier ------------------------------------------------------------------------


def test_the_lru_stays_within_its_byte_bound_and_evicts_the_least_recently_used(
    metrics: Metrics,
) -> None:
    size = 8 * 4 + len(str(key("a"))) + ENTRY_OVERHEAD_BYTES  # every key here is as long
    memory = MemoryCache(3 * size, metrics)
    for name in "abc":
        memory.store(key(name), entry(ord(name)))
    assert (len(memory), memory.bytes) == (3, 3 * size)
    assert memory.lookup(str(key("a"))) is not None  # a is now the most recently used
    memory.store(key("d"), entry(4))
    assert memory.lookup(str(key("b"))) is None  # the least recently used went
    assert all(memory.lookup(str(key(n))) is not None for n in "acd")
    assert memory.bytes == 3 * size <= memory.max_bytes
    assert sample(metrics, "clipserve_cache_evictions_total") == 1
    assert sample(metrics, "clipserve_cache_bytes") == 3 * size
    assert sample(metrics, "clipserve_cache_entries") == 3

    memory.store(key("huge"), entry(5, dim=3 * size))  # over the whole bound: not stored
    assert memory.lookup(str(key("huge"))) is None
    assert len(memory) == 3  # and nothing evicted for it
    memory.store(key("a"), entry(6))  # replacing an entry does not count it twice
    assert memory.bytes == 3 * size


def test_forget_drops_only_that_models_entries(metrics: Metrics) -> None:
    memory = MemoryCache(1 << 20, metrics)
    memory.store(key("a", model="fast"), entry(1))
    memory.store(key("b", model="fast"), entry(2))
    memory.store(key("a", model="accurate"), entry(3))
    memory.forget("fast")
    assert len(memory) == 1
    assert memory.lookup(str(key("a", model="accurate"))) is not None
    assert sample(metrics, "clipserve_cache_entries") == 1


# --- single flight ------------------------------------------------------------------------------


async def test_concurrent_lookups_of_one_key_compute_once(
    cache: EmbeddingCache, metrics: Metrics
) -> None:
    compute = Computation()
    lookups = [asyncio.create_task(cache.get_or_compute(key(), compute)) for _ in range(3)]
    await until(lambda: cache.waiters() == 2)
    compute.release.set()
    results = await asyncio.gather(*lookups)
    assert compute.calls == 1
    assert all(r is compute.value for r in results)
    assert await cache.get_or_compute(key(), compute) is compute.value  # now from memory
    labels = {"model": "fast", "modality": "text"}
    assert sample(metrics, "clipserve_cache_misses_total", **labels, tier="memory") == 1
    assert sample(metrics, "clipserve_cache_hits_total", **labels, tier="inflight") == 2
    assert sample(metrics, "clipserve_cache_hits_total", **labels, tier="memory") == 1
    assert (cache.in_flight(), cache.waiters()) == (0, 0)


async def test_a_failed_computation_is_not_cached_and_its_waiters_get_the_error(
    cache: EmbeddingCache,
) -> None:
    compute = Computation()
    compute.error = InvalidImageError("cannot identify image file")
    leader = asyncio.create_task(cache.get_or_compute(key(), compute))
    await compute.started.wait()
    waiter = asyncio.create_task(cache.get_or_compute(key(), compute))
    await until(lambda: cache.waiters() == 1)
    compute.release.set()
    results = await asyncio.gather(leader, waiter, return_exceptions=True)
    assert all(isinstance(r, InvalidImageError) for r in results)
    assert results[0] is not results[1]  # each request gets its own copy to name
    assert compute.calls == 1
    assert (cache.in_flight(), cache.waiters()) == (0, 0)

    compute.error = None  # not cached: the next lookup computes again
    assert await cache.get_or_compute(key(), compute) is compute.value
    assert compute.calls == 2


async def test_a_cancelled_first_computation_hands_over_to_a_waiter(
    cache: EmbeddingCache,
) -> None:
    first = Computation()  # never released: its request goes away
    leader = asyncio.create_task(cache.get_or_compute(key(), first))
    await first.started.wait()
    second = Computation(entry(7))
    second.release.set()
    waiter = asyncio.create_task(cache.get_or_compute(key(), second))
    await until(lambda: cache.waiters() == 1)
    leader.cancel()
    assert await asyncio.wait_for(waiter, 5) is second.value  # computed by the waiter itself
    assert leader.cancelled()
    assert (first.calls, second.calls) == (1, 1)
    assert (cache.in_flight(), cache.waiters()) == (0, 0)
    assert await cache.get_or_compute(key(), Computation()) is second.value  # and cached


@pytest.mark.parametrize(
    "error",
    [QueueFullError("the queue is full"), InferenceTimeoutError("too late"), TimeoutError()],
    ids=["queue full", "deadline", "timeout"],
)
async def test_a_failure_of_the_first_request_itself_lets_a_waiter_retry(
    cache: EmbeddingCache, error: Exception
) -> None:
    first = Computation()
    first.error = error
    leader = asyncio.create_task(cache.get_or_compute(key(), first))
    await first.started.wait()
    second = Computation(entry(8))
    second.release.set()
    waiter = asyncio.create_task(cache.get_or_compute(key(), second))
    await until(lambda: cache.waiters() == 1)
    first.release.set()
    with pytest.raises(type(error)):
        await leader
    assert await asyncio.wait_for(waiter, 5) is second.value
    assert (cache.in_flight(), cache.waiters()) == (0, 0)


async def test_a_waiter_that_goes_away_leaves_the_computation_alone(
    cache: EmbeddingCache,
) -> None:
    compute = Computation()
    leader = asyncio.create_task(cache.get_or_compute(key(), compute))
    await compute.started.wait()
    waiter = asyncio.create_task(cache.get_or_compute(key(), compute))
    await until(lambda: cache.waiters() == 1)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    compute.release.set()
    assert await leader is compute.value
    assert cache.memory is not None
    assert cache.memory.lookup(str(key())) is compute.value


# --- settings -----------------------------------------------------------------------------------


def test_the_cache_is_built_from_its_settings(metrics: Metrics) -> None:
    assert EmbeddingCache.from_settings(CacheSettings(enabled=False), metrics) is None
    assert EmbeddingCache.from_settings(CacheSettings(max_bytes=0), metrics) is None
    built = EmbeddingCache.from_settings(CacheSettings(), metrics)
    assert built is not None
    assert built.memory is not None
    assert built.remote is None
    assert built.memory.max_bytes == 512 * 1024 * 1024
    remote_only = EmbeddingCache.from_settings(
        CacheSettings(max_bytes=0, redis_url="redis://127.0.0.1:1/0"), metrics
    )
    assert remote_only is not None
    assert remote_only.memory is None
    assert isinstance(remote_only.remote, RedisCache)


async def test_without_a_memory_tier_identical_lookups_still_compute_once(
    metrics: Metrics,
) -> None:
    cache = EmbeddingCache(memory=None, remote=None, metrics=metrics)
    compute = Computation()
    lookups: list[Awaitable[CachedEmbedding]] = [
        asyncio.create_task(cache.get_or_compute(key(), compute)) for _ in range(2)
    ]
    await until(lambda: cache.waiters() == 1)
    compute.release.set()
    await asyncio.gather(*lookups)
    assert compute.calls == 1
