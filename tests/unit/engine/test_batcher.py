from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipserve.config import BatchingSettings
from clipserve.engine.batcher import Batcher, BatchQueue
from clipserve.engine.executor import WorkerThreads
from clipserve.errors import (
    EngineNotReadyError,
    InferenceError,
    InferenceTimeoutError,
    QueueFullError,
)
from clipserve.observability.metrics import Metrics

WAIT = 10.0  # generous bound on any single await in these tests; never reached when they pass


@dataclass
class FakeModel:
    """Doubles its payloads on a 'device' thread; records batches; can be held by a gate."""

    gate: threading.Event = field(default_factory=threading.Event)
    batches: list[list[int]] = field(default_factory=list)
    fail_on: frozenset[int] = frozenset()
    oom_above: int | None = None
    wrong_length: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)
    start_times: list[float] = field(default_factory=list)
    """perf_counter() at the start of each forward pass (appended on the event loop)."""
    loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def _mark_started(self, at: float) -> None:
        self.start_times.append(at)
        self.started.set()

    async def wait_started(self, n: int) -> None:
        """Until ``n`` forward passes have started."""
        async with asyncio.timeout(WAIT):
            while len(self.start_times) < n:
                self.started.clear()
                await self.started.wait()

    def run(self, payloads: list[int]) -> list[int]:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._mark_started, time.perf_counter())
        assert self.gate.wait(WAIT), "test gate never released"
        self.batches.append(list(payloads))
        if self.oom_above is not None and len(payloads) > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.fail_on.intersection(payloads):
            raise ValueError("poison input")
        if self.wrong_length:
            return [p * 2 for p in payloads][1:]
        return [p * 2 for p in payloads]

    def seen(self) -> list[int]:
        return [p for batch in self.batches for p in batch]


@pytest.fixture
async def make_queue() -> AsyncIterator[Callable[..., tuple[BatchQueue[int, int], FakeModel]]]:
    made: list[tuple[Batcher, FakeModel, WorkerThreads]] = []
    cpu = WorkerThreads(2, "cpu")

    def make(
        model: FakeModel | None = None,
        probe: Callable[[], int] | None = None,
        release_memory: Callable[[], None] | None = None,
        **options: Any,
    ) -> tuple[BatchQueue[int, int], FakeModel]:
        model = model or FakeModel()
        model.loop = asyncio.get_running_loop()
        options.setdefault("batch_timeout", 0.005)
        batcher = Batcher(BatchingSettings(**options), Metrics(), cpu)
        # As many device threads as slots: only the slots limit what runs at once.
        device = WorkerThreads(batcher.settings.concurrent_batches("cpu"), "device")
        made.append((batcher, model, device))
        queue: BatchQueue[int, int] = batcher.queue(
            "owner",
            model="m",
            modality="text",
            device="cpu",
            device_executor=device,
            run=model.run,
            probe=probe,
            release_memory=release_memory,
        )
        return queue, model

    yield make
    for batcher, model, device in made:
        model.release()
        await batcher.close()
        device.shutdown()
    cpu.shutdown()


def deadline(seconds: float = WAIT) -> float:
    return asyncio.get_running_loop().time() + seconds


async def results(futures: Sequence[asyncio.Future[int]]) -> list[Any]:
    async with asyncio.timeout(WAIT):
        return await asyncio.gather(*futures, return_exceptions=True)


async def test_a_full_batch_runs_without_waiting_for_the_timeout(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=4, batch_timeout=30.0)
    started = time.perf_counter()
    futures = await queue.submit([1, 2, 3, 4], deadline=deadline())
    assert await results(futures) == [2, 4, 6, 8]
    assert time.perf_counter() - started < 15.0  # far below the 30 s batch timeout
    assert model.batches == [[1, 2, 3, 4]]


async def test_an_idle_device_runs_a_partial_batch_at_once(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=8, batch_timeout=30.0)
    started = time.perf_counter()
    (future,) = await queue.submit([7], deadline=deadline())
    assert await results([future]) == [14]
    assert time.perf_counter() - started < 15.0  # did not wait out the 30 s batch timeout
    assert model.batches == [[7]]


async def test_while_the_device_is_busy_a_partial_batch_waits_for_the_timeout(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=8, batch_timeout=0.2, max_concurrent_batches=2)
    model.hold()
    first = await queue.submit([1], deadline=deadline())
    await model.wait_started(1)  # the device is busy (one of its two slots taken)
    submitted = time.perf_counter()
    second = await queue.submit([2], deadline=deadline())
    await model.wait_started(2)  # a free slot, but the batch waited for its timeout first
    assert model.start_times[1] - submitted >= 0.2
    model.release()
    assert await results(first + second) == [2, 4]


async def test_items_queued_while_the_device_is_busy_share_the_next_batch(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=8)
    model.hold()
    first = await queue.submit([0], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)  # batch [0] is on the device
    later = [await queue.submit([i], deadline=deadline()) for i in range(1, 6)]
    model.release()
    assert await results(first + [f for (f,) in later]) == [0, 2, 4, 6, 8, 10]
    assert model.batches == [[0], [1, 2, 3, 4, 5]]  # order kept, five requests in one pass


async def test_expired_items_are_answered_504_and_never_run(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=8)
    model.hold()
    busy = await queue.submit([1], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    (doomed,) = await queue.submit([2], deadline=deadline(0.02))
    (fine,) = await queue.submit([3], deadline=deadline())
    with pytest.raises(InferenceTimeoutError, match=r"deadline \(request_timeout\)"):
        await asyncio.wait_for(asyncio.shield(doomed), WAIT)  # answered while the device is held
    model.release()
    outcome = await results([*busy, doomed, fine])
    assert outcome[0] == 2
    assert outcome[2] == 6
    assert isinstance(outcome[1], InferenceTimeoutError)
    assert 2 not in model.seen()


async def test_cancelled_items_are_dropped_before_inference(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=8)
    model.hold()
    busy = await queue.submit([1], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    gone, kept = await queue.submit([2, 3], deadline=deadline())
    gone.cancel()  # the client went away
    model.release()
    assert await results([*busy, kept]) == [2, 6]
    assert model.seen() == [1, 3]


async def test_a_full_queue_rejects_with_a_retry_after_estimate(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=1, max_queue_size=2)
    model.hold()
    busy = await queue.submit([0], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    queued = await queue.submit([1, 2], deadline=deadline())
    with pytest.raises(QueueFullError, match="overloaded") as caught:
        await queue.admit("reject", deadline())
    assert caught.value.retry_after_s >= 1.0
    model.release()
    assert await results(busy + queued) == [0, 2, 4]
    await queue.admit("reject", deadline())  # room again


async def test_wait_overflow_waits_for_room_then_runs(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=1, max_queue_size=1)
    model.hold()
    busy = await queue.submit([0], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    queued = await queue.submit([1], deadline=deadline())
    admitted = asyncio.ensure_future(queue.admit("wait", deadline()))
    await asyncio.sleep(0)
    assert not admitted.done()  # held: the queue is full
    model.release()
    await asyncio.wait_for(admitted, WAIT)
    later = await queue.submit([5], deadline=deadline())
    assert await results(busy + queued + later) == [0, 2, 10]


async def test_waiting_for_room_is_bounded_by_the_deadline(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=1, max_queue_size=1)
    model.hold()
    busy = await queue.submit([0], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    queued = await queue.submit([1], deadline=deadline())
    with pytest.raises(InferenceTimeoutError, match="waiting for room"):
        await queue.admit("wait", deadline(0.02))
    with pytest.raises(InferenceTimeoutError, match="waiting for room"):
        await queue.submit([2], deadline=deadline(0.02))
    model.release()
    assert await results(busy + queued) == [0, 2]


async def test_out_of_memory_splits_the_batch_and_lowers_the_batch_size(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(FakeModel(oom_above=2), max_batch_size=8, batch_timeout=30.0)
    futures = await queue.submit(list(range(8)), deadline=deadline())
    assert await results(futures) == [2 * i for i in range(8)]
    assert [len(b) for b in model.batches] == [8, 4, 2, 2, 4, 2, 2]
    assert queue.max_batch_size == 2
    model.batches.clear()
    assert await results(await queue.submit([1, 2, 3, 4], deadline=deadline())) == [2, 4, 6, 8]
    assert all(len(b) <= 2 for b in model.batches)


async def test_out_of_memory_on_one_item_fails_that_item_alone(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, _ = make_queue(FakeModel(oom_above=0), max_batch_size=2, batch_timeout=30.0)
    outcome = await results(await queue.submit([1, 2], deadline=deadline()))
    for error in outcome:
        assert isinstance(error, InferenceError)
        assert "ran out of device memory on a single text input" in error.message


async def test_a_poison_input_fails_alone(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, _ = make_queue(FakeModel(fail_on=frozenset({3})), max_batch_size=8, batch_timeout=30.0)
    outcome = await results(await queue.submit(list(range(8)), deadline=deadline()))
    assert [o for i, o in enumerate(outcome) if i != 3] == [0, 2, 4, 8, 10, 12, 14]
    assert isinstance(outcome[3], InferenceError)
    assert outcome[3].message == "inference failed for model 'm' (text): ValueError"


async def test_a_wrong_number_of_outputs_fails_the_batch(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, _ = make_queue(FakeModel(wrong_length=True), max_batch_size=2, batch_timeout=30.0)
    outcome = await results(await queue.submit([1, 2], deadline=deadline()))
    assert all(
        isinstance(o, InferenceError) and "returned 1 text results" in o.message for o in outcome
    )


async def test_the_probe_caps_the_batch_size(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(probe=lambda: 3, max_batch_size=8)
    assert await results(await queue.submit(list(range(7)), deadline=deadline())) == [
        2 * i for i in range(7)
    ]
    assert queue.max_batch_size == 3
    assert [len(b) for b in model.batches][:2] == [3, 3]


async def test_shutdown_drains_queued_and_running_work(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=2)
    model.hold()
    futures = await queue.submit([1, 2, 3, 4, 5], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    closing = asyncio.ensure_future(queue.close(deadline()))
    await asyncio.sleep(0)
    with pytest.raises(EngineNotReadyError, match="shutting down"):
        await queue.submit([9], deadline=deadline())
    with pytest.raises(EngineNotReadyError, match="shutting down"):
        await queue.admit("reject", deadline())
    model.release()
    await asyncio.wait_for(closing, WAIT)
    assert await results(futures) == [2, 4, 6, 8, 10]


async def test_shutdown_fails_what_the_drain_timeout_leaves(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=1)
    model.hold()
    futures = await queue.submit([1, 2], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    await asyncio.wait_for(queue.close(deadline(0.05)), WAIT)
    outcome = await results(futures)
    assert all(isinstance(o, EngineNotReadyError) for o in outcome)
    assert "shut down before" in outcome[0].message
    assert "shut down before" in outcome[1].message


async def test_device_slots_bound_the_batches_in_flight() -> None:
    cpu, device = WorkerThreads(1, "cpu"), WorkerThreads(2, "device")  # 2 threads: only slots
    model = FakeModel(loop=asyncio.get_running_loop())
    model.hold()
    batcher = Batcher(
        BatchingSettings(max_batch_size=1, batch_timeout=0, max_concurrent_batches=2),
        Metrics(),
        cpu,
    )
    queue: BatchQueue[int, int] = batcher.queue(
        "o", model="m", modality="image", device="cpu", device_executor=device, run=model.run
    )
    futures = await queue.submit([1, 2, 3, 4], deadline=deadline())
    await asyncio.wait_for(model.started.wait(), WAIT)
    for _ in range(20):  # let the collector try to start more batches
        await asyncio.sleep(0)
    assert batcher.stats().inflight_batches == 2
    assert batcher.stats().queue_size == 2
    model.release()
    assert await results(futures) == [2, 4, 6, 8]
    await batcher.close()
    cpu.shutdown()
    device.shutdown()


async def test_a_queue_waiting_out_its_timeout_never_holds_the_only_slot() -> None:
    """A text queue forming its batch (30 s timeout, device busy) must not keep an image batch
    off the device's one slot: once the device frees, both run, far within the timeout."""
    loop = asyncio.get_running_loop()
    cpu, device = WorkerThreads(1, "cpu"), WorkerThreads(1, "device")
    images, texts = FakeModel(loop=loop), FakeModel(loop=loop)
    batcher = Batcher(BatchingSettings(max_batch_size=8, batch_timeout=30.0), Metrics(), cpu)
    image_queue: BatchQueue[int, int] = batcher.queue(
        "o", model="m", modality="image", device="cpu", device_executor=device, run=images.run
    )
    text_queue: BatchQueue[int, int] = batcher.queue(
        "o", model="m", modality="text", device="cpu", device_executor=device, run=texts.run
    )
    images.hold()
    running = await image_queue.submit([1], deadline=deadline())
    await images.wait_started(1)  # the only CPU slot is taken
    waiting_text = await text_queue.submit([10], deadline=deadline())
    ready_images = await image_queue.submit(list(range(2, 10)), deadline=deadline())  # full
    images.release()
    assert await results(running + ready_images + waiting_text) == [
        *(2 * i for i in range(1, 10)),
        20,
    ]
    assert images.batches == [[1], list(range(2, 10))]
    await batcher.close()
    cpu.stop(timeout=5)
    device.stop(timeout=5)


async def test_a_batch_task_that_fails_unexpectedly_settles_all_its_items_at_once(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue, _ = make_queue(max_batch_size=4, batch_timeout=30.0)

    async def bug(items: list[Any]) -> None:
        raise KeyError("a bug in the batcher")

    monkeypatch.setattr(queue, "_execute", bug)
    far = deadline(3600)  # were they left to their deadline timers, results() would time out
    outcome = await results(await queue.submit([1, 2, 3, 4], deadline=far))
    for error in outcome:
        assert isinstance(error, InferenceError)
        assert error.message.startswith(
            "internal error while running a batch of text inputs for model 'm' (KeyError)"
        )
    monkeypatch.undo()
    assert await results(await queue.submit([5], deadline=deadline())) == [10]  # slot was freed


async def test_a_failure_while_freeing_memory_settles_the_batch(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    def broken_release() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    queue, _ = make_queue(
        FakeModel(oom_above=1), release_memory=broken_release, max_batch_size=4, batch_timeout=30
    )
    outcome = await results(await queue.submit([1, 2, 3, 4], deadline=deadline(3600)))
    assert all(
        isinstance(o, InferenceError)
        and "(RuntimeError); the details are in the server log" in o.message
        for o in outcome
    ), outcome


async def test_a_collector_that_dies_fails_its_items_and_is_replaced(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queue, model = make_queue(max_batch_size=2)
    real_take = queue._take  # noqa: SLF001
    calls = 0

    def take_once_broken() -> list[Any]:
        nonlocal calls
        calls += 1
        taken = real_take()  # items already off the queue: the failure path must answer them
        if calls == 1:
            raise RuntimeError("a bug while forming a batch")
        return taken

    monkeypatch.setattr(queue, "_take", take_once_broken)
    outcome = await results(await queue.submit([1, 2, 3], deadline=deadline(3600)))
    assert len(outcome) == 3
    assert all(
        isinstance(o, InferenceError) and "internal error while" in o.message for o in outcome
    ), outcome
    assert await results(await queue.submit([3], deadline=deadline())) == [6]  # a new collector
    assert model.seen() == [3]


async def test_outcomes_are_counted_in_metrics(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, _ = make_queue(FakeModel(fail_on=frozenset({2})), max_batch_size=4, batch_timeout=30.0)
    await results(await queue.submit([1, 2, 3, 4], deadline=deadline()))
    counter = queue._m_requests  # noqa: SLF001
    assert counter.labels("m", "text", "ok")._value.get() == 3  # noqa: SLF001
    assert counter.labels("m", "text", "error")._value.get() == 1  # noqa: SLF001
    assert queue.stats().items == 3
    assert queue.stats().batches == 1


# --- property: every submitted item gets exactly one answer --------------------------------------

_requests = st.lists(
    st.tuples(
        st.lists(st.integers(0, 30), min_size=1, max_size=6),  # payloads of one request
        st.sampled_from(["normal", "short-deadline", "cancel"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    requests=_requests,
    max_batch_size=st.integers(1, 8),
    max_queue_size=st.integers(1, 10),
    poison=st.sets(st.integers(0, 30), max_size=3),
)
def test_every_submitted_item_gets_exactly_one_answer(
    requests: list[tuple[list[int], str]],
    max_batch_size: int,
    max_queue_size: int,
    poison: set[int],
) -> None:
    asyncio.run(_exactly_one_answer(requests, max_batch_size, max_queue_size, poison))


async def _exactly_one_answer(
    requests: list[tuple[list[int], str]],
    max_batch_size: int,
    max_queue_size: int,
    poison: set[int],
) -> None:
    loop = asyncio.get_running_loop()
    model = FakeModel(fail_on=frozenset(poison), loop=loop)
    cpu, device = WorkerThreads(1, "cpu"), WorkerThreads(1, "device")
    batcher = Batcher(
        BatchingSettings(
            max_batch_size=max_batch_size, max_queue_size=max_queue_size, batch_timeout=0.001
        ),
        Metrics(),
        cpu,
    )
    queue: BatchQueue[int, int] = batcher.queue(
        "o", model="m", modality="text", device="cpu", device_executor=device, run=model.run
    )
    answers: list[tuple[int, object]] = []

    async def client(payloads: list[int], kind: str) -> None:
        limit = 0.002 if kind == "short-deadline" else WAIT
        try:
            await queue.admit("reject", deadline(limit))
            futures = await queue.submit(payloads, deadline=deadline(limit))
        except (QueueFullError, InferenceTimeoutError) as exc:
            answers.extend((p, exc) for p in payloads)
            return
        if kind == "cancel":
            futures[0].cancel()
        outcome = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT)
        answers.extend(zip(payloads, outcome, strict=True))

    async with asyncio.timeout(WAIT):
        await asyncio.gather(*(client(p, k) for p, k in requests))
        await batcher.close()
    cpu.shutdown()
    device.shutdown()

    assert len(answers) == sum(len(p) for p, _ in requests)  # one answer per item, none lost
    for payload, answer in answers:
        if isinstance(answer, int):
            assert answer == payload * 2
            assert payload not in poison
        else:
            assert isinstance(
                answer,
                QueueFullError | InferenceTimeoutError | InferenceError | asyncio.CancelledError,
            ), answer
    succeeded = {p for p, a in answers if isinstance(a, int)}
    assert succeeded <= set(model.seen())  # a result always comes from a real forward pass


async def test_one_client_fills_only_its_share_and_others_still_find_room(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=1, max_queue_size=8, client_queue_share=0.5)
    assert queue.client_share == 4
    model.hold()
    busy = await queue.submit([0], deadline=deadline(), client="greedy")
    await asyncio.wait_for(model.started.wait(), WAIT)
    greedy = [await queue.submit([i], deadline=deadline(), client="greedy") for i in range(1, 5)]
    with pytest.raises(QueueFullError, match="too many requests from this client") as caught:
        await queue.admit("reject", deadline(), "greedy")
    assert "4 items" in caught.value.message
    assert caught.value.retry_after_s >= 1.0
    await queue.admit("reject", deadline(), "polite")  # the queue itself still has room
    polite = await queue.submit([9], deadline=deadline(), client="polite")
    with pytest.raises(InferenceTimeoutError, match="waiting for room"):  # over its share
        await queue.submit([5], deadline=deadline(0.02), client="greedy")
    model.release()
    assert await results([*busy, *(f for fs in greedy for f in fs), *polite]) == [
        0,
        2,
        4,
        6,
        8,
        18,
    ]
    await queue.admit("reject", deadline(), "greedy")  # its items ran: room again
    assert not queue._by_client  # no entry is kept per client once its items have left


async def test_a_client_over_its_share_waits_for_its_own_items_when_overflow_waits(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=1, max_queue_size=4, client_queue_share=0.25)
    model.hold()
    busy = await queue.submit([0], deadline=deadline(), client="a")
    await asyncio.wait_for(model.started.wait(), WAIT)
    queued = await queue.submit([1], deadline=deadline(), client="a")
    admitted = asyncio.ensure_future(queue.admit("wait", deadline(), "a"))
    others = await queue.submit([2], deadline=deadline(), client="b")  # b is not held back
    await asyncio.sleep(0)
    assert not admitted.done()
    model.release()
    await asyncio.wait_for(admitted, WAIT)
    assert await results([*busy, *queued, *others]) == [0, 2, 4]


async def test_a_submission_larger_than_the_share_runs_alone(
    make_queue: Callable[..., tuple[BatchQueue[int, int], FakeModel]],
) -> None:
    queue, model = make_queue(max_batch_size=2, max_queue_size=4, client_queue_share=0.25)
    futures = await queue.submit([1, 2, 3], deadline=deadline(), client="a")
    assert await results(futures) == [2, 4, 6]
