"""Where jobs live: in this process (:class:`MemoryJobStore`) or in Redis (:class:`RedisJobStore`,
so they survive a restart and any replica can answer for them).

Contract: a chunk's results are added once (:meth:`JobStore.add_chunk` on a chunk already
stored changes nothing), so a chunk run twice (a retry after a crash) is counted once; a finished
job's state never changes again (a late chunk of a cancelled job is dropped). The Redis store makes
each change one optimistic transaction (``WATCH`` the status, write status and chunk in one
``MULTI``), so concurrent replicas cannot lose an update.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from clipserve.engine.jobs.records import ChunkResult, JobSpec, JobState, JobStatus

T = TypeVar("T")
Change = Callable[[JobStatus], bool]
"""Updates a status in place; returns False to leave it as it was."""


class JobStore(Protocol):
    async def create(self, spec: JobSpec) -> JobStatus: ...
    async def spec(self, job_id: str) -> JobSpec | None: ...
    async def status(self, job_id: str) -> JobStatus | None: ...
    async def has_chunk(self, job_id: str, index: int) -> bool: ...
    async def add_chunk(self, job_id: str, chunk: ChunkResult) -> JobStatus | None: ...
    async def update(self, job_id: str, change: Change) -> JobStatus | None: ...
    def lines(self, job_id: str, chunks: int) -> AsyncIterator[bytes]:
        """The stored chunks' result lines, in input order (chunks not done yet are skipped)."""
        ...

    async def active(self) -> int:
        """Jobs queued or running."""
        ...

    async def close(self) -> None: ...


def started(status: JobStatus) -> bool:
    """queued → running (the first chunk to start stamps the time)."""
    if status.state is not JobState.queued:
        return False
    status.state = JobState.running
    status.started_at = time.time()
    return True


def finishing(state: JobState, reason: str | None = None) -> Change:
    def change(status: JobStatus) -> bool:
        if status.state.finished:
            return False
        status.finish(state, reason)
        return True

    return change


class MemoryJobStore:
    """Jobs in this process's memory, gone with it. At most ``keep`` finished jobs are kept (the
    oldest finished go first); the service bounds the active ones."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._specs: dict[str, JobSpec] = {}
        self._status: OrderedDict[str, JobStatus] = OrderedDict()
        self._chunks: dict[str, dict[int, bytes]] = {}

    async def create(self, spec: JobSpec) -> JobStatus:
        status = JobStatus.of(spec)
        self._specs[spec.id] = spec
        self._status[spec.id] = status
        self._chunks[spec.id] = {}
        self._evict()
        return status

    def _evict(self) -> None:
        finished = [k for k, s in self._status.items() if s.state.finished]
        for job_id in finished[: max(0, len(finished) - self._keep)]:
            del self._specs[job_id], self._status[job_id], self._chunks[job_id]

    async def spec(self, job_id: str) -> JobSpec | None:
        return self._specs.get(job_id)

    async def status(self, job_id: str) -> JobStatus | None:
        status = self._status.get(job_id)
        return None if status is None else JobStatus.from_json(status.to_json())  # a copy

    async def has_chunk(self, job_id: str, index: int) -> bool:
        return index in self._chunks.get(job_id, {})

    async def add_chunk(self, job_id: str, chunk: ChunkResult) -> JobStatus | None:
        status, chunks = self._status.get(job_id), self._chunks.get(job_id)
        if status is None or chunks is None:
            return None
        if chunk.index not in chunks and not status.state.finished:
            chunks[chunk.index] = chunk.lines
            status.add(chunk)
            self._evict()
        return await self.status(job_id)

    async def update(self, job_id: str, change: Change) -> JobStatus | None:
        status = self._status.get(job_id)
        if status is None:
            return None
        if change(status):
            self._evict()
        return await self.status(job_id)

    async def lines(self, job_id: str, chunks: int) -> AsyncIterator[bytes]:
        stored = self._chunks.get(job_id, {})
        for index in range(chunks):
            lines = stored.get(index)
            if lines is not None:
                yield lines

    async def active(self) -> int:
        return sum(not s.state.finished for s in self._status.values())

    async def close(self) -> None:
        return None


async def _done(call: Awaitable[T] | T) -> T:
    """redis-py types its commands as "an awaitable or a value" (one class serves both
    clients); on the asyncio client they are awaitables."""
    return await cast("Awaitable[T]", call)


class RedisJobStore:
    """Jobs in Redis under ``{prefix}{id}:spec`` / ``:status`` / ``:chunks`` (a hash of chunk
    index to result lines); a finished job's keys expire after ``keep_s``."""

    def __init__(self, client: aioredis.Redis, *, prefix: str, keep_s: float) -> None:
        self._redis = client
        self._prefix = prefix
        self._keep_ms = int(keep_s * 1000)

    def _key(self, job_id: str, part: str) -> str:
        return f"{self._prefix}{job_id}:{part}"

    async def create(self, spec: JobSpec) -> JobStatus:
        status = JobStatus.of(spec)
        async with self._redis.pipeline(transaction=True) as tx:
            tx.set(self._key(spec.id, "spec"), spec.to_json())
            tx.set(self._key(spec.id, "status"), status.to_json())
            tx.sadd(self._prefix + "active", spec.id)
            await tx.execute()
        return status

    async def spec(self, job_id: str) -> JobSpec | None:
        raw = await self._redis.get(self._key(job_id, "spec"))
        return None if raw is None else JobSpec.from_json(raw)

    async def status(self, job_id: str) -> JobStatus | None:
        raw = await self._redis.get(self._key(job_id, "status"))
        return None if raw is None else JobStatus.from_json(raw)

    async def has_chunk(self, job_id: str, index: int) -> bool:
        return bool(await _done(self._redis.hexists(self._key(job_id, "chunks"), str(index))))

    async def add_chunk(self, job_id: str, chunk: ChunkResult) -> JobStatus | None:
        def change(status: JobStatus) -> bool:
            if status.state.finished:
                return False
            status.add(chunk)
            return True

        return await self._transact(job_id, change, chunk)

    async def update(self, job_id: str, change: Change) -> JobStatus | None:
        return await self._transact(job_id, change, None)

    async def _transact(
        self, job_id: str, change: Change, chunk: ChunkResult | None
    ) -> JobStatus | None:
        status_key, chunks_key = self._key(job_id, "status"), self._key(job_id, "chunks")
        async with self._redis.pipeline(transaction=True) as tx:
            while True:
                try:
                    await tx.watch(status_key, chunks_key)
                    raw = await tx.get(status_key)
                    if raw is None:
                        return None
                    status = JobStatus.from_json(raw)
                    if chunk is not None and await _done(tx.hexists(chunks_key, str(chunk.index))):
                        return status  # stored already: counted once
                    if not change(status):
                        return status
                    tx.multi()  # type: ignore[no-untyped-call]
                    tx.set(status_key, status.to_json())
                    if chunk is not None:
                        tx.hset(chunks_key, str(chunk.index), cast(Any, chunk.lines))
                    if status.state.finished:
                        tx.srem(self._prefix + "active", job_id)
                        for part in ("spec", "status", "chunks"):
                            tx.pexpire(self._key(job_id, part), self._keep_ms)
                    await tx.execute()
                    return status
                except WatchError:
                    continue

    async def lines(self, job_id: str, chunks: int) -> AsyncIterator[bytes]:
        key = self._key(job_id, "chunks")
        step = 16
        for first in range(0, chunks, step):
            fields = [str(i) for i in range(first, min(first + step, chunks))]
            for lines in await _done(self._redis.hmget(key, fields)):
                if lines is not None:
                    yield lines

    async def active(self) -> int:
        return int(await _done(self._redis.scard(self._prefix + "active")))

    async def close(self) -> None:
        await self._redis.aclose()
