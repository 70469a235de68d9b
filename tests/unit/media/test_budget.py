"""PixelBudget: grants within the process limit and a request window's, waits bounded by a
deadline, an oversized image granted alone, every grant released (also on errors)."""

from __future__ import annotations

import threading
import time

import pytest

from clipserve.errors import InferenceTimeoutError
from clipserve.media.budget import PixelBudget, PixelWindow

WAIT = 10.0


def test_grants_within_the_limit_and_releases() -> None:
    budget = PixelBudget(100)
    with budget.hold(60), budget.hold(40):
        assert budget.used == 100
    assert budget.used == 0
    assert budget.peak == 100


def test_a_release_happens_when_the_block_raises() -> None:
    budget, window = PixelBudget(100), PixelWindow(50)
    with pytest.raises(ValueError, match="decode failed"), budget.hold(30, window):
        raise ValueError("decode failed")
    assert budget.used == 0
    assert window.used == 0


def test_an_image_larger_than_the_budget_is_granted_alone() -> None:
    budget = PixelBudget(100)
    with budget.hold(500):
        assert budget.used == 500
        with (
            pytest.raises(InferenceTimeoutError, match="waited for decode memory"),
            budget.hold(1, until=time.monotonic() + 0.01),
        ):
            pass
    with budget.hold(500):  # alone again: granted at once
        pass


def test_a_wait_ends_at_the_deadline_and_holds_nothing() -> None:
    budget = PixelBudget(100)
    with budget.hold(80):
        started = time.monotonic()
        with (
            pytest.raises(InferenceTimeoutError, match="max_decoded_pixels 100, 80 in use"),
            budget.hold(30, until=started + 0.05),
        ):
            pass
        assert time.monotonic() - started < WAIT
        assert budget.used == 80


def test_a_waiter_is_granted_when_room_is_freed() -> None:
    budget = PixelBudget(100)
    first = budget.hold(80)
    first.__enter__()
    granted = threading.Event()

    def second() -> None:
        with budget.hold(30, until=time.monotonic() + WAIT):
            granted.set()

    thread = threading.Thread(target=second)
    thread.start()
    assert not granted.wait(0.05)  # waiting: 80 + 30 > 100
    first.__exit__(None, None, None)
    assert granted.wait(WAIT)
    thread.join(WAIT)
    assert budget.used == 0
    assert budget.peak == 80


def test_a_request_window_is_bounded_below_the_process_budget() -> None:
    budget, window, other = PixelBudget(1000), PixelWindow(100), PixelWindow(100)
    with budget.hold(80, window):
        with (  # the window is full, the process is not
            pytest.raises(InferenceTimeoutError, match="waited for decode memory"),
            budget.hold(30, window, until=time.monotonic() + 0.01),
        ):
            pass
        with budget.hold(90, other):  # another request's window is unaffected
            assert budget.used == 170
    assert window.used == other.used == 0


def test_many_threads_never_exceed_the_budget() -> None:
    budget = PixelBudget(100)
    seen: list[int] = []
    lock = threading.Lock()

    def work(pixels: int) -> None:
        for _ in range(50):
            with budget.hold(pixels, until=time.monotonic() + WAIT), lock:
                seen.append(budget.used)

    threads = [threading.Thread(target=work, args=(p,)) for p in (10, 30, 45, 60, 99)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert max(seen) <= 100
    assert budget.peak <= 100
    assert budget.used == 0
