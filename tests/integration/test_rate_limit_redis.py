"""Rate limits shared through a real Redis (Debian's redis-server, started here on loopback)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clipserve.testing import FakeLoader

EMBED = {"input_text": "hello"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (Debian package redis-server; .ci/run installs it)"
        )
    port = _free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while not _answers(port):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"redis-server could not start (exit code {process.poll()})")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


async def test_replicas_share_one_limit_through_redis(
    redis_url: str, client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(rate_limit={"requests": "3/minute", "storage_url": redis_url})
    first = await client_for(settings, FakeLoader())
    second = await client_for(settings, FakeLoader())  # another replica, same Redis
    statuses = [(await c.post("/embed", json=EMBED)).status_code for c in (first, second, first)]
    assert statuses == [200, 200, 200]
    limited = await second.post("/embed", json=EMBED)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert "3 per 1 minute requests for ip:127.0.0.1" in limited.json()["error"]


async def test_an_unreachable_redis_lets_requests_through_and_counts_it(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    client = await client_for(
        make_settings(rate_limit={"requests": "1/minute", "storage_url": url}), FakeLoader()
    )
    assert [(await client.post("/embed", json=EMBED)).status_code for _ in range(3)] == [200] * 3
    metrics = (await client.get("/metrics")).text
    assert "clipserve_rate_limit_storage_errors_total 3.0" in metrics
