"""Long batch work as jobs: submit, follow, read results, cancel.

Without ``jobs.redis_url`` jobs run in this process: each job is a task this service owns (kept
in a set, at most ``max_running`` running, the others waiting their turn), gone with the process.
With it, jobs live in Redis (:class:`~clipserve.engine.jobs.store.RedisJobStore`) and their
chunks are queued with arq (a Redis job queue): this process runs an arq worker, and so does every
replica sharing the Redis, so a job survives a restart. A chunk interrupted by a graceful stop is
put back on the queue at once (arq re-queues a cancelled job); one interrupted by a crash is
picked up again once its in-progress mark expires (``chunk_timeout_s`` + 10 s). Chunks already
stored are never run again, so a job resumes where it stopped.

Contract: every task is owned and stopped by :meth:`Jobs.close` within its timeout; a chunk's
failure fails its items (per-item errors in the results), never the service; a job whose runner
fails unexpectedly ends ``failed`` with the reason, never stays ``running`` in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Worker, func

from clipserve.config import JobsSettings
from clipserve.engine.jobs.records import ChunkResult, JobKind, JobSpec, JobState, JobStatus
from clipserve.engine.jobs.store import JobStore, MemoryJobStore, RedisJobStore, finishing, started
from clipserve.errors import (
    ClipServeError,
    InvalidInputError,
    JobNotFoundError,
    QueueFullError,
)

logger = logging.getLogger(__name__)

ChunkRunner = Callable[[JobSpec, int], Awaitable[ChunkResult]]
"""Runs chunk ``index`` of a job and returns its results (item failures inside, as lines)."""

_CHUNK_FUNCTION = "clipserve_job_chunk"
_PREFETCH = 4
"""arq starts one job per worker slot per poll, so the worker holds this many chunks per running
one (they wait their turn here): short chunks are not paced by the poll interval."""
_MAX_TRIES = 20
"""A chunk interrupted this many times (a crash or a stop each time) fails its items."""


def _dumps(data: dict[str, Any]) -> bytes:
    return orjson.dumps(data)


class Jobs:
    def __init__(self, settings: JobsSettings, run_chunk: ChunkRunner) -> None:
        self.settings = settings
        self._run_chunk = run_chunk
        self._store: JobStore = MemoryJobStore(settings.keep_finished)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._turns = asyncio.Semaphore(settings.max_running)
        self._queue: ArqRedis | None = None
        self._worker: Worker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[Any]] = set()
        self._stopping = False

    @property
    def durable(self) -> bool:
        return self.settings.redis_url is not None

    async def start(self) -> None:
        url = self.settings.redis_url
        if url is None:
            return
        redis_settings = RedisSettings.from_dsn(url)
        redis_settings.conn_retries = 2
        self._queue = await create_pool(
            redis_settings, job_serializer=_dumps, job_deserializer=orjson.loads
        )
        self._store = RedisJobStore(
            self._queue, prefix=self.settings.key_prefix, keep_s=self.settings.keep_s
        )
        self._worker = Worker(
            [func(self._chunk_job, name=_CHUNK_FUNCTION)],
            queue_name=self.settings.key_prefix + "queue",
            redis_settings=redis_settings,
            handle_signals=False,
            max_jobs=self.settings.max_running * _PREFETCH,
            job_timeout=self.settings.chunk_timeout_s * _PREFETCH,
            max_tries=_MAX_TRIES,
            keep_result=0,
            poll_delay=0.1,
            job_serializer=_dumps,
            job_deserializer=orjson.loads,
            log_results=False,
        )
        self._worker_task = asyncio.create_task(self._worker.async_run(), name="jobs-worker")
        self._worker_task.add_done_callback(self._worker_done)

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the jobs worker stopped", exc_info=task.exception())

    # --- the API -------------------------------------------------------------------------------

    async def submit(
        self, kind: JobKind, model: str, items: list[dict[str, str]], *, owner: str
    ) -> JobStatus:
        limit = self.settings.max_items
        if not items:
            raise InvalidInputError("a job needs at least one item")
        if len(items) > limit:
            raise InvalidInputError(
                f"the job has {len(items)} items; the limit is {limit} (jobs.max_items)",
                detail={"max_items": limit},
            )
        if await self._store.active() >= self.settings.max_active:
            raise QueueFullError(
                f"{self.settings.max_active} jobs are queued or running (jobs.max_active); "
                "retry when one has finished",
                retry_after_s=5.0,
            )
        spec = JobSpec.new(kind, model, items, chunk_size=self.settings.chunk_size, owner=owner)
        status = await self._store.create(spec)
        if self._queue is not None:
            for index in range(spec.chunks):
                await self._queue.enqueue_job(
                    _CHUNK_FUNCTION,
                    spec.id,
                    index,
                    _job_id=f"{spec.id}:{index}",
                    _queue_name=self.settings.key_prefix + "queue",
                )
        else:
            task = asyncio.create_task(self._run_here(spec), name=f"job-{spec.id}")
            self._tasks[spec.id] = task
            task.add_done_callback(lambda _: self._tasks.pop(spec.id, None))
        logger.info("job %s: %s of %d items on '%s' queued", spec.id, kind, len(items), model)
        return status

    async def status(self, job_id: str, caller: str) -> JobStatus:
        await self._owned(job_id, caller)
        status = await self._store.status(job_id)
        if status is None:
            raise JobNotFoundError(job_id)
        return status

    async def results(self, job_id: str, caller: str) -> tuple[JobStatus, AsyncIterator[bytes]]:
        """The job's status and its result lines so far (JSON Lines, input order)."""
        status = await self.status(job_id, caller)
        return status, self._store.lines(job_id, status.chunks)

    async def cancel(self, job_id: str, caller: str) -> JobStatus:
        """Cancel a queued or running job (a finished one is left as it is); results stored so
        far stay readable."""
        await self._owned(job_id, caller)
        status = await self._store.update(
            job_id, finishing(JobState.cancelled, "cancelled by the client")
        )
        if status is None:
            raise JobNotFoundError(job_id)
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
        return status

    async def _owned(self, job_id: str, caller: str) -> None:
        """A job submitted with an API key is visible to that key only (to others it does not
        exist); without keys, jobs are shared like the rest of the service."""
        spec = await self._store.spec(job_id)
        if spec is None or (spec.owner.startswith("key:") and spec.owner != caller):
            raise JobNotFoundError(job_id)

    # --- running -------------------------------------------------------------------------------

    async def _run_here(self, spec: JobSpec) -> None:
        try:
            async with self._turns:
                for index in range(spec.chunks):
                    if not await self._run_one(spec, index):
                        return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error("job %s failed", spec.id, exc_info=exc)
            await self._store.update(spec.id, finishing(JobState.failed, "internal error"))

    async def _run_one(self, spec: JobSpec, index: int) -> bool:
        """Run one chunk unless the job is finished (cancelled) or has it; False when the job is
        over."""
        status = await self._store.update(spec.id, started)
        if status is None or status.state.finished:
            return False
        if await self._store.has_chunk(spec.id, index):
            return True
        try:
            chunk = await self._run_chunk(spec, index)
        except ClipServeError as exc:  # the whole chunk failed (its model was removed...)
            chunk = failed_chunk(spec, index, exc.message)
        status = await self._store.add_chunk(spec.id, chunk)
        if status is not None and status.state.finished:
            logger.info(
                "job %s %s: %d succeeded, %d failed",
                spec.id,
                status.state,
                status.succeeded,
                status.failed,
            )
        return status is not None and not status.state.finished

    async def _chunk_job(self, ctx: dict[str, Any], job_id: str, index: int) -> None:
        """The arq function: one chunk of a job stored in Redis, at most ``max_running`` at
        once."""
        async with self._turns:
            if self._stopping:  # arq puts a cancelled job back on the queue, for the next worker
                raise asyncio.CancelledError
            spec = await self._store.spec(job_id)
            if spec is None:
                return
            if ctx["job_try"] >= _MAX_TRIES:
                message = f"the chunk was interrupted {_MAX_TRIES - 1} times; not retried again"
                await self._store.add_chunk(job_id, failed_chunk(spec, index, message))
                return
            task = asyncio.current_task()
            assert task is not None
            self._running.add(task)
            try:
                await self._run_one(spec, index)
            finally:
                self._running.discard(task)

    async def close(self, timeout: float = 10.0) -> None:
        """Stop the runners: in-process jobs are cancelled (they do not outlive the process);
        the arq worker takes no new chunk, lets the running ones finish within ``timeout``, and
        puts back on the queue any it had to interrupt."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if self._worker is not None and self._worker_task is not None:
            await self._stop_worker(self._worker, timeout)
            tasks.append(self._worker_task)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self._store.close()

    async def _stop_worker(self, worker: Worker, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        worker.allow_pick_jobs = False
        self._stopping = True  # chunks waiting their turn go back on the queue
        if self._running:
            await asyncio.wait(set(self._running), timeout=max(0.0, deadline - loop.time()))
        started = dict(worker.tasks)
        with contextlib.suppress(Exception):  # a Redis gone at shutdown: the marks expire
            await asyncio.wait_for(worker.close(), max(0.1, deadline - loop.time()))
        assert self._worker_task is not None
        self._worker_task.cancel()
        # A chunk cancelled before arq's own handler ran still carries arq's "in progress"
        # mark, which would keep every worker off it until the mark expires: clear it now.
        # (Should another worker have started it since, it runs twice: stored and counted once.)
        interrupted = [job_id for job_id, task in started.items() if task.cancelled()]
        if interrupted and self._queue is not None:
            with contextlib.suppress(Exception):
                await self._queue.delete(*(in_progress_key_prefix + i for i in interrupted))


def failed_chunk(spec: JobSpec, index: int, message: str) -> ChunkResult:
    start, items = spec.chunk(index)
    lines = b"".join(
        orjson.dumps({"index": start + i, "error": message}) + b"\n" for i in range(len(items))
    )
    return ChunkResult(
        index, lines, 0, len(items), tuple((start + i, message) for i in range(len(items)))
    )
