"""Device slots and the wake-up signal the batcher's queues share.

A :class:`DeviceSlots` bounds the batches in flight on one device (``max_concurrent_batches``);
only a batch that is ready to run takes a slot, and every release fires :attr:`DeviceSlots.freed`,
so queues waiting out their ``batch_timeout`` re-check at once when the device goes idle.
"""

from __future__ import annotations

import asyncio
import contextlib

from clipserve.observability.metrics import Metrics


class Signal:
    """Wakes every coroutine waiting on it (see :func:`wait_any`)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def fire(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


async def wait_any(*signals: Signal, timeout: float | None = None) -> None:
    """Until one of ``signals`` fires, or ``timeout`` seconds have passed."""
    waiter = asyncio.get_running_loop().create_future()
    for signal in signals:
        signal._waiters.append(waiter)  # noqa: SLF001 - the two are one mechanism
    try:
        if timeout is None:
            await waiter
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await waiter
    finally:
        for signal in signals:
            with contextlib.suppress(ValueError):
                signal._waiters.remove(waiter)  # noqa: SLF001


class DeviceSlots:
    """At most ``limit`` batches in flight on one device (taken by ready batches only)."""

    def __init__(self, device: str, limit: int, metrics: Metrics) -> None:
        self.device = device
        self.limit = limit
        self.inflight = 0
        self.freed = Signal()
        """Fires whenever a batch on this device finishes."""
        self._semaphore = asyncio.Semaphore(limit)
        self._gauge = metrics.batcher_inflight_batches.labels(device)

    @property
    def idle(self) -> bool:
        return self.inflight == 0

    async def acquire(self) -> None:
        await self._semaphore.acquire()
        self.inflight += 1
        self._gauge.set(self.inflight)

    def release(self) -> None:
        self.inflight -= 1
        self._gauge.set(self.inflight)
        self._semaphore.release()
        self.freed.fire()
