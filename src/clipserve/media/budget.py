"""A budget of decoded pixels: how many may be held at once by the whole process, and by one
request's window.

An image is decoded and preprocessed as one job (:mod:`clipserve.media.loader`): its pixels are
decoded only after its header has been read and the job holds its share of the budget, and they
are freed when the job ends (the model's input tensor is all that is left). So a batch of a
thousand small files that each declare a huge size never has more than the budget decoded at once:
the other jobs wait.

Contract: every grant is released (``hold`` is a context manager); a wait ends at the caller's
deadline (:class:`~clipserve.errors.InferenceTimeoutError`) and never holds anything; an image
larger than a whole budget is granted alone (when nothing else holds that budget), so it waits but
is never refused here (``max_image_pixels`` is the per-image limit). Only jobs that hold pixels
are decoding, so every wait ends. The waits block the calling thread (the decode jobs run on
worker threads); a :class:`threading.Condition` guards the counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from clipserve.errors import InferenceTimeoutError


class PixelWindow:
    """One request's share: at most ``limit`` decoded pixels at once (a request window's images
    are decoded in parallel; this keeps them from taking the whole process budget)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


TRIM_ABOVE_PIXELS = 4_000_000
"""After an image this big is freed, the C allocator is asked to give free memory back to the OS
(``malloc_trim``): Pillow allocates pixels in 16 MB blocks below glibc's mmap threshold, and each
decode thread's malloc arena would otherwise keep its high-water mark for good."""


class Reservation:
    """Pixels taken of a budget (and of a request's window) until the reservation ends."""

    __slots__ = ("_budget", "_until", "_window", "pixels")

    def __init__(
        self, budget: PixelBudget, window: PixelWindow | None, until: float | None
    ) -> None:
        self._budget, self._window, self._until = budget, window, until
        self.pixels = 0

    def take(self, pixels: int) -> None:
        """Wait (until the reservation's deadline) for room, then take ``pixels``."""
        self._budget._take(pixels, self._window, self._until)
        self.pixels += pixels


class PixelBudget:
    """The process's decoded pixels held at once, at most ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        """The most pixels held at once since start (for tests and benchmarks)."""
        self._changed = threading.Condition()
        self._trim = _malloc_trim()

    @contextmanager
    def reserve(
        self, window: PixelWindow | None = None, *, until: float | None = None
    ) -> Iterator[Reservation]:
        """A reservation for the block: what it takes (waiting until ``until``, on the
        :func:`time.monotonic` clock) is given back when the block ends. Take the pixels once the
        size is known and free them inside the block."""
        reservation = Reservation(self, window, until)
        try:
            yield reservation
        finally:
            if reservation.pixels:
                self._give_back(reservation.pixels, window)
                if reservation.pixels >= TRIM_ABOVE_PIXELS and self._trim is not None:
                    self._trim(0)

    @contextmanager
    def hold(
        self, pixels: int, window: PixelWindow | None = None, *, until: float | None = None
    ) -> Iterator[None]:
        """Hold ``pixels`` for the block (:meth:`reserve` for a size known up front)."""
        with self.reserve(window, until=until) as reservation:
            reservation.take(pixels)
            yield

    def _fits(self, pixels: int, window: PixelWindow | None) -> bool:
        if self.used and self.used + pixels > self.limit:
            return False
        return window is None or not window.used or window.used + pixels <= window.limit

    def _take(self, pixels: int, window: PixelWindow | None, until: float | None) -> None:
        with self._changed:
            while not self._fits(pixels, window):
                remaining = None if until is None else until - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise InferenceTimeoutError(
                        f"the request's deadline passed while its image ({pixels} pixels) "
                        f"waited for decode memory (max_decoded_pixels {self.limit}, "
                        f"{self.used} in use)"
                    )
                self._changed.wait(remaining)
            self.used += pixels
            self.peak = max(self.peak, self.used)
            if window is not None:
                window.used += pixels

    def _give_back(self, pixels: int, window: PixelWindow | None) -> None:
        with self._changed:
            self.used -= pixels
            if window is not None:
                window.used -= pixels
            self._changed.notify_all()


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
