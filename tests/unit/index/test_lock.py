"""The readers-writer lock: readers together, writers alone, writers first."""

from __future__ import annotations

import threading
import time

from clipserve.index.lock import ReadWriteLock

WAIT = 10.0  # bound on every wait; never reached when the tests pass


def test_readers_share_the_lock() -> None:
    lock = ReadWriteLock()
    inside = threading.Barrier(3, timeout=WAIT)

    def reader() -> None:
        with lock.read():
            inside.wait()  # all three are inside at once, or this times out

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)
    assert not inside.broken


def test_a_waiting_writer_blocks_new_readers_and_goes_first() -> None:
    lock = ReadWriteLock()
    order: list[str] = []
    reader_in, writer_waiting = threading.Event(), threading.Event()
    release_reader = threading.Event()

    def first_reader() -> None:
        with lock.read():
            reader_in.set()
            release_reader.wait(WAIT)
        order.append("reader-1 out")

    def writer() -> None:
        writer_waiting.set()
        with lock.write():
            order.append("writer")

    def late_reader() -> None:
        with lock.read():
            order.append("reader-2")

    t1 = threading.Thread(target=first_reader)
    t1.start()
    assert reader_in.wait(WAIT)
    t2 = threading.Thread(target=writer)
    t2.start()
    assert writer_waiting.wait(WAIT)
    deadline = time.monotonic() + WAIT
    while not lock._writers_waiting:  # until the writer is queued (bounded)
        assert time.monotonic() < deadline
        threading.Event().wait(0.001)
    t3 = threading.Thread(target=late_reader)
    t3.start()
    release_reader.set()
    for t in (t1, t2, t3):
        t.join(WAIT)
    assert order.index("writer") < order.index("reader-2")


def test_writers_exclude_each_other() -> None:
    lock = ReadWriteLock()
    counter = {"n": 0, "max": 0}

    def writer() -> None:
        for _ in range(200):
            with lock.write():
                counter["n"] += 1
                counter["max"] = max(counter["max"], counter["n"])
                counter["n"] -= 1

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert counter["max"] == 1
