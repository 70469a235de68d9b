"""Jobs in this process: chunks run in order through the runner, counted once; cancel, owners,
limits and failures injected into the runner."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from clipserve.config import JobsSettings
from clipserve.engine.jobs import ChunkResult, Jobs, JobSpec, JobState
from clipserve.engine.jobs.records import JobStatus, result_line
from clipserve.engine.jobs.store import MemoryJobStore
from clipserve.errors import (
    InvalidInputError,
    JobNotFoundError,
    ModelUnavailableError,
    QueueFullError,
)


class Runner:
    """Answers each item with its text's length; ``fail_at`` raises in that chunk; chunks from
    ``hold_from`` on wait for ``gate`` (``held`` is set when one does)."""

    def __init__(
        self,
        *,
        fail_at: int | None = None,
        error: Exception | None = None,
        hold_from: int | None = None,
    ) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail_at = fail_at
        self.error = error or RuntimeError("boom")
        self.hold_from = hold_from
        self.gate = asyncio.Event()
        self.held = asyncio.Event()

    async def __call__(self, spec: JobSpec, index: int) -> ChunkResult:
        self.calls.append((spec.id, index))
        if self.hold_from is not None and index >= self.hold_from:
            self.held.set()
            await self.gate.wait()
        if index == self.fail_at:
            raise self.error
        start, items = spec.chunk(index)
        lines = b"".join(result_line(start + i, n=len(it["text"])) for i, it in enumerate(items))
        bad = tuple((start + i, "empty") for i, it in enumerate(items) if not it["text"])
        return ChunkResult(index, lines, len(items) - len(bad), len(bad), bad)


def texts(n: int) -> list[dict[str, str]]:
    return [{"text": "x" * (i % 5)} for i in range(n)]


async def finished(jobs: Jobs, job_id: str, owner: str = "local") -> JobStatus:
    for _ in range(1000):
        status = await jobs.status(job_id, owner)
        if status.state.finished:
            return status
        await asyncio.sleep(0.001)
    raise AssertionError("the job did not finish")


async def lines(jobs: Jobs, job_id: str, owner: str = "local") -> list[dict[str, Any]]:
    _, chunks = await jobs.results(job_id, owner)
    return [orjson.loads(line) for blob in [b async for b in chunks] for line in blob.splitlines()]


@pytest.fixture
def settings() -> JobsSettings:
    return JobsSettings(chunk_size=4, max_items=50, max_active=3, max_running=1)


async def test_a_job_runs_every_chunk_once_and_counts_failed_items(settings: JobsSettings) -> None:
    runner = Runner()
    jobs = Jobs(settings, runner)
    status = await jobs.submit("embed", "fast", texts(10), owner="local")
    assert (status.state, status.total, status.chunks) == (JobState.queued, 10, 3)
    done = await finished(jobs, status.id)
    assert done.state is JobState.succeeded
    assert (done.succeeded, done.failed, done.chunks_done) == (8, 2, 3)
    assert done.errors == [(0, "empty"), (5, "empty")]
    assert done.progress == 1.0
    assert done.started_at
    assert done.finished_at
    assert runner.calls == [(status.id, 0), (status.id, 1), (status.id, 2)]
    assert [row["index"] for row in await lines(jobs, status.id)] == list(range(10))
    await jobs.close()


async def test_a_chunk_that_raises_an_engine_error_fails_its_items_alone(
    settings: JobsSettings,
) -> None:
    runner = Runner(fail_at=1, error=ModelUnavailableError("fast", "reloading"))
    jobs = Jobs(settings, runner)
    status = await jobs.submit("embed", "fast", texts(12), owner="local")
    done = await finished(jobs, status.id)
    assert done.state is JobState.succeeded
    assert done.failed == 4 + 2  # chunk 1 whole, plus the two empty texts elsewhere
    rows = await lines(jobs, status.id)
    assert [r["index"] for r in rows] == list(range(12))
    assert rows[5]["error"] == "model 'fast' is unavailable: reloading"
    await jobs.close()


async def test_an_unexpected_runner_failure_fails_the_job_with_a_reason(
    settings: JobsSettings,
) -> None:
    jobs = Jobs(settings, Runner(fail_at=0))
    status = await jobs.submit("embed", "fast", texts(8), owner="local")
    done = await finished(jobs, status.id)
    assert (done.state, done.reason) == (JobState.failed, "internal error")
    await jobs.close()


async def test_every_item_failing_is_a_failed_job(settings: JobsSettings) -> None:
    jobs = Jobs(settings, Runner())
    status = await jobs.submit("embed", "fast", [{"text": ""}] * 3, owner="local")
    done = await finished(jobs, status.id)
    assert (done.state, done.failed) == (JobState.failed, 3)
    await jobs.close()


async def test_cancel_stops_a_running_job_and_keeps_what_was_done(settings: JobsSettings) -> None:
    runner = Runner(hold_from=1)
    jobs = Jobs(settings, runner)
    status = await jobs.submit("embed", "fast", texts(12), owner="local")
    await runner.held.wait()  # chunk 0 stored, chunk 1 running
    cancelled = await jobs.cancel(status.id, "local")
    assert (cancelled.state, cancelled.reason) == (JobState.cancelled, "cancelled by the client")
    runner.gate.set()
    after = await jobs.status(status.id, "local")
    assert after.state is JobState.cancelled
    assert after.chunks_done == 1
    assert runner.calls == [(status.id, 0), (status.id, 1)]  # nothing ran after the cancel
    assert [r["index"] for r in await lines(jobs, status.id)] == [0, 1, 2, 3]
    again = await jobs.cancel(status.id, "local")  # finished: left as it is
    assert again.state is JobState.cancelled
    await jobs.close()


async def test_jobs_of_an_api_key_are_invisible_to_other_callers(settings: JobsSettings) -> None:
    jobs = Jobs(settings, Runner())
    status = await jobs.submit("embed", "fast", texts(2), owner="key:alice")
    await finished(jobs, status.id, "key:alice")
    for other in ("key:bob", "ip:127.0.0.1"):
        with pytest.raises(JobNotFoundError, match="does not exist"):
            await jobs.status(status.id, other)
        with pytest.raises(JobNotFoundError):
            await jobs.cancel(status.id, other)
    shared = await jobs.submit("embed", "fast", texts(2), owner="ip:10.0.0.1")
    assert (await jobs.status(shared.id, "ip:10.0.0.2")).id == shared.id  # no keys: shared
    await jobs.close()


async def test_limits_refuse_clearly(settings: JobsSettings) -> None:
    jobs = Jobs(settings, Runner(hold_from=0))
    with pytest.raises(InvalidInputError, match="51 items; the limit is 50"):
        await jobs.submit("embed", "fast", texts(51), owner="local")
    with pytest.raises(InvalidInputError, match="at least one item"):
        await jobs.submit("embed", "fast", [], owner="local")
    for _ in range(3):
        await jobs.submit("embed", "fast", texts(1), owner="local")
    with pytest.raises(QueueFullError, match="3 jobs are queued or running"):
        await jobs.submit("embed", "fast", texts(1), owner="local")
    with pytest.raises(JobNotFoundError):
        await jobs.status("nope", "local")
    await jobs.close()  # held jobs are cancelled: close never hangs


async def test_close_cancels_running_jobs_within_its_timeout(settings: JobsSettings) -> None:
    runner = Runner(hold_from=0)
    jobs = Jobs(settings, runner)
    await jobs.submit("embed", "fast", texts(4), owner="local")
    await runner.held.wait()
    await asyncio.wait_for(jobs.close(timeout=2), 5)
    assert not jobs._tasks


async def test_the_memory_store_keeps_a_bounded_number_of_finished_jobs() -> None:
    store = MemoryJobStore(keep=2)
    specs = [JobSpec.new("embed", "m", texts(1), chunk_size=4, owner="local") for _ in range(4)]
    for spec in specs:
        await store.create(spec)
        chunk = ChunkResult(0, result_line(0, n=1), 1, 0)
        assert (await store.add_chunk(spec.id, chunk)).state is JobState.succeeded  # type: ignore[union-attr]
        again = await store.add_chunk(spec.id, chunk)  # counted once
        assert again is not None
        assert again.succeeded == 1
    assert [await store.status(s.id) is None for s in specs] == [True, True, False, False]


def test_a_spec_and_a_status_round_trip_through_json() -> None:
    spec = JobSpec.new("score", "m", [{"image": "a.jpg", "text": "t"}], chunk_size=2, owner="x")
    assert JobSpec.from_json(spec.to_json()) == spec
    status = JobStatus.of(spec)
    status.add(ChunkResult(0, b"", 0, 1, ((0, "bad"),)))
    assert JobStatus.from_json(status.to_json()) == status
