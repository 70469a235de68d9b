"""The embedding cache's shared tier: Redis, through ``redis.asyncio``.

Entries are a 16-byte header (magic ``CSE1``, flags, dimensions, token count) and the raw
little-endian float32s (:func:`pack`), never pickles, under ``<prefix><key>`` with the TTL
``cache.redis_ttl_s``. Every call is bounded by ``cache.redis_timeout_s``; an error or a slow call
is a miss (logged, counted in ``clipserve_cache_errors_total``), never a failed request, and Redis
is then left alone for :data:`COOLDOWN_S`. A model's entries are not deleted when it reloads: new
weights have a new identity in the key, and the old entries expire.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import numpy as np
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from clipserve.engine.cache import CachedEmbedding, CacheKey
from clipserve.observability.metrics import Metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

COOLDOWN_S: Final = 2.0
"""After a Redis call failed: how long lookups and writes skip Redis."""
MAX_REDIS_CALLS: Final = 64
"""Redis calls in flight at once; more are skipped (a miss, a write not made)."""

_HEADER: Final = struct.Struct("<4sB3xII")  # magic, flags, padding, dimensions, token count
_MAGIC: Final = b"CSE1"
_TRUNCATED: Final = 1


def pack(value: CachedEmbedding) -> bytes:
    """The 16-byte header (magic, flags, dimensions, token count) and the little-endian float32s."""
    vector = np.ascontiguousarray(value.vector, dtype="<f4").reshape(-1)
    flags = _TRUNCATED if value.truncated else 0
    return _HEADER.pack(_MAGIC, flags, vector.shape[0], value.token_count) + vector.tobytes()


def unpack(data: bytes) -> CachedEmbedding:
    """The inverse of :func:`pack`; raises ValueError for anything else."""
    if len(data) < _HEADER.size:
        raise ValueError(f"a cache entry of {len(data)} bytes is shorter than its header")
    magic, flags, dim, token_count = _HEADER.unpack_from(data)
    if magic != _MAGIC or len(data) != _HEADER.size + 4 * dim or flags & ~_TRUNCATED:
        raise ValueError("not a cache entry of this version")
    vector = np.frombuffer(data, "<f4", count=dim, offset=_HEADER.size).astype(np.float32)
    return CachedEmbedding(vector, token_count, bool(flags & _TRUNCATED))


class RedisCache:
    """The shared tier: ``redis.asyncio``, every call bounded by ``timeout_s``, a failure a miss."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        metrics: Metrics,
        ttl_s: int = 0,
        timeout_s: float = 0.1,
        prefix: str = "clipserve:emb:",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # a retry would double the time a miss may take
            health_check_interval=0,
        )
        self._metrics = metrics
        self._ttl_s = ttl_s or None
        self._timeout_s = timeout_s
        self._prefix = prefix
        self._clock = clock
        self._down_until = float("-inf")
        self._calls = 0

    async def get(self, key: CacheKey) -> CachedEmbedding | None:
        name = self._prefix + str(key)
        data = await self._call("get", lambda: self._client.get(name))
        if data is None:
            return None
        try:
            return unpack(bytes(data) if isinstance(data, bytes) else data.encode())
        except ValueError as exc:
            self._metrics.cache_errors_total.labels("redis", "decode").inc()
            logger.warning("redis cache: ignoring the entry at %s (%s)", name, exc)
            return None

    async def put(self, key: CacheKey, value: CachedEmbedding) -> None:
        name, data = self._prefix + str(key), pack(value)
        await self._call("put", lambda: self._client.set(name, data, ex=self._ttl_s))

    def forget(self, model: str) -> None:
        """Nothing: a model's new weights have a new identity, and old entries expire."""

    async def close(self) -> None:
        try:
            await self._client.aclose()
        except Exception as exc:  # closing a broken connection must not fail the shutdown
            logger.info("redis cache: closing the client failed (%s)", exc)

    async def _call(self, operation: str, call: Callable[[], Awaitable[T]]) -> T | None:
        if self._calls >= MAX_REDIS_CALLS or self._clock() < self._down_until:
            return None
        self._calls += 1
        try:
            async with asyncio.timeout(self._timeout_s):
                return await call()
        except Exception as exc:  # whatever Redis does, the request goes on: a miss
            self._down_until = self._clock() + COOLDOWN_S
            self._metrics.cache_errors_total.labels("redis", operation).inc()
            logger.warning(
                "redis cache: %s failed (%s: %s); Redis is skipped for %.0f s",
                operation,
                type(exc).__name__,
                exc,
                COOLDOWN_S,
            )
            return None
        finally:
            self._calls -= 1
