"""One real `clipserve serve` process (uvicorn) on loopback: starts, serves, stops on SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(
    tmp_path: Path, tiny_registry: dict[str, Any]
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    config = tmp_path / "models.json"
    config.write_text(json.dumps(tiny_registry))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CLIPSERVE_DEFAULT_MODEL": "tiny"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clipserve",
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "info",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            assert process.poll() is None, (
                f"server exited early:\n{process.stdout.read() if process.stdout else ''}"
            )
            try:
                if httpx.get(f"{base}/evaluator/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become healthy in 90 s"
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_serves_an_evaluation_and_stops_gracefully(
    server: tuple[str, subprocess.Popen[str]], photo_bytes: Callable[..., bytes]
) -> None:
    base, process = server
    uri = "data:image/jpeg;base64," + base64.b64encode(photo_bytes("chelsea")).decode()
    response = httpx.post(
        f"{base}/evaluator/v1/evaluation/single",
        json={"image_input": uri, "text_prompt": "a cat"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_used"] == "tiny"
    assert 0.0 <= body["clip_score"] <= 100.0
    assert "x-request-id" in response.headers
    metrics = httpx.get(f"{base}/evaluator/metrics", timeout=10).text
    assert 'clip_score_distribution_count{model="tiny"} 1.0' in metrics

    process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells of it.
    assert process.wait(timeout=30) in (0, -signal.SIGTERM)
    assert process.stdout is not None
    log = process.stdout.read()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
