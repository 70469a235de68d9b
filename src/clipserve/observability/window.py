"""Recent requests, for health and status: counts over the last minutes, in one-second buckets
(bounded memory: one bucket per second of the window, whatever the traffic)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RecentRequests:
    window_s: float
    requests: int
    server_errors: int
    """Answered 5xx."""

    @property
    def error_rate(self) -> float | None:
        """The share of 5xx answers; None without requests."""
        return self.server_errors / self.requests if self.requests else None


class RequestWindow:
    def __init__(self, seconds: int = 300, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, requests, 5xx]

    def record(self, status: int) -> None:
        second = int(self._clock())
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
            self._trim(second)
        bucket = self._buckets[-1]
        bucket[1] += 1
        bucket[2] += status >= 500

    def _trim(self, now: int) -> None:
        while self._buckets and self._buckets[0][0] <= now - self.seconds:
            self._buckets.popleft()

    def recent(self) -> RecentRequests:
        self._trim(int(self._clock()))
        return RecentRequests(
            float(self.seconds),
            sum(b[1] for b in self._buckets),
            sum(b[2] for b in self._buckets),
        )
