from __future__ import annotations

import logging
import threading
import time

import pytest

from clipserve.engine.executor import Executors, WorkerThreads


def test_work_runs_in_submission_order_on_its_one_thread() -> None:
    pool = WorkerThreads(1, "device-test")
    seen: list[tuple[int, str]] = []
    futures = [
        pool.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
        for i in range(20)
    ]
    for future in futures:
        future.result(timeout=10)
    assert [i for i, _ in seen] == list(range(20))
    assert {name for _, name in seen} == {"device-test-0"}
    assert pool.stop(timeout=10) == []


def test_system_exit_in_model_code_becomes_a_runtime_error() -> None:
    pool = WorkerThreads(1, "device-test")

    def exits() -> None:
        raise SystemExit(3)

    with pytest.raises(RuntimeError, match="the worker thread raised SystemExit"):
        pool.submit(exits).result(timeout=10)
    assert pool.submit(lambda: 42).result(timeout=10) == 42  # the thread lives on
    pool.stop(timeout=10)


def stuck_job(began: threading.Event, release: threading.Event) -> bool:
    began.set()
    return release.wait(30)


def test_stop_abandons_a_stuck_thread_within_its_time_limit() -> None:
    pool = WorkerThreads(1, "device-test")
    began, stuck = threading.Event(), threading.Event()
    running = pool.submit(stuck_job, began, stuck)
    assert began.wait(10)
    queued = pool.submit(lambda: 1)
    started = time.monotonic()
    assert pool.stop(timeout=0.2) == ["device-test-0"]
    assert time.monotonic() - started < 5
    assert queued.cancelled()  # queued work is dropped, not run after the stop
    with pytest.raises(RuntimeError, match="cannot take new work after shutdown"):
        pool.submit(lambda: 2)
    stuck.set()  # let the abandoned thread end
    assert running.result(timeout=10) is True


def test_executors_shutdown_reports_what_it_abandons(caplog: pytest.LogCaptureFixture) -> None:
    executors = Executors(2)
    began, stuck = threading.Event(), threading.Event()
    executors.device("cuda:1").submit(stuck_job, began, stuck)
    assert began.wait(10)
    with caplog.at_level(logging.WARNING, logger="clipserve.engine.executor"):
        abandoned = executors.shutdown(0.2)
    assert abandoned == ["clipserve-device-cuda1-0"]
    assert "still busy after 0.2 s, abandoned: clipserve-device-cuda1-0" in caplog.text
    stuck.set()
