"""One real `clipserve serve` process (uvicorn) on loopback: starts, serves, stops on SIGTERM."""

from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipserve.testing.servers import clipserve_process


@pytest.fixture
def server(
    tmp_path: Path, tiny_registry: dict[str, Any]
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    config = tmp_path / "models.json"
    config.write_text(json.dumps(tiny_registry))
    env = {"CLIPSERVE_DEFAULT_MODEL": "tiny"}
    with clipserve_process(config, env=env, log_level="info") as running:
        yield running


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


def test_sigterm_finishes_in_flight_work_before_exit(
    server: tuple[str, subprocess.Popen[str]], photos: dict[str, Any]
) -> None:
    base, process = server
    pairs = []
    for i in range(120):  # distinct images: seconds of work on the tiny model
        buffer = io.BytesIO()
        photos["coffee"].rotate(i * 3).resize((160, 160)).save(buffer, format="JPEG")
        uri = "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
        pairs.append({"image_input": uri, "text_prompt": f"a cup of coffee #{i}"})
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        answer["batch"] = httpx.post(
            f"{base}/evaluator/v1/evaluation/batch",
            json={"evaluations": pairs, "batch_size": 8, "show_progress": False},
            timeout=120,
        )

    sender = threading.Thread(target=send)
    sender.start()
    deadline = time.monotonic() + 60
    while True:  # until the server is visibly working on it
        health = httpx.get(f"{base}/health", timeout=5).json()
        if health["queue_size"] or health["inflight_batches"]:
            break
        assert sender.is_alive(), "the batch finished before the signal could be sent"
        assert time.monotonic() < deadline, "the server never started on the batch"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    sender.join(120)

    response = answer["batch"]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["total_processed"] == 120
    assert body["total_successful"] == 120
    assert [r["text_prompt"] for r in body["results"]] == [p["text_prompt"] for p in pairs]
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    assert process.stdout is not None
    log = process.stdout.read()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
    with pytest.raises(httpx.TransportError):  # and it accepts nothing more
        httpx.get(f"{base}/health", timeout=2)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_inference_port_serves_the_same_app(
    tmp_path: Path, tiny_registry: dict[str, Any], workers: str
) -> None:
    from clipserve.testing.servers import free_port

    config = tmp_path / "models.json"
    config.write_text(json.dumps(tiny_registry))
    extra = free_port()
    env = {"CLIPSERVE_DEFAULT_MODEL": "tiny"}
    args = ["--inference-port", str(extra), "--workers", workers]
    with clipserve_process(config, env=env, args=args) as (base, process):
        main = httpx.get(f"{base}/api/v1/capabilities", timeout=30)
        second = httpx.get(f"http://127.0.0.1:{extra}/api/v1/capabilities", timeout=30)
        assert main.status_code == 200, main.text
        assert second.status_code == 200, second.text
        assert second.json()["max_batch_size"] == main.json()["max_batch_size"]
        health = httpx.get(f"http://127.0.0.1:{extra}/evaluator/health", timeout=30)
        assert health.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)
