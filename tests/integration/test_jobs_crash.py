"""A job in Redis survives its server being killed (SIGKILL, no clean-up): a second
`clipserve serve` process on the same Redis finishes it, each item stored once."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from clipserve.testing.servers import clipserve_process


@contextmanager
def serving(config: Path, redis_url: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    env = {
        "CLIPSERVE_DEFAULT_MODEL": "tiny",
        "CLIPSERVE_JOBS__REDIS_URL": redis_url,
        "CLIPSERVE_JOBS__CHUNK_SIZE": "4",
        # arq's in-progress mark of a chunk lives 4 x this + 10 s: a killed server's chunks
        # are taken up again 12 s later
        "CLIPSERVE_JOBS__CHUNK_TIMEOUT_S": "0.5",
    }
    with clipserve_process(config, env=env, args=["--preload"], ready_path="/ready") as running:
        yield running


def poll(
    base: str, job_id: str, done: Callable[[dict[str, Any]], bool], limit_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while True:
        body: dict[str, Any] = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10).json()
        if done(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_a_killed_servers_job_is_finished_by_the_next_one(
    redis_url: str, tmp_path: Path, tiny_registry: dict[str, Any]
) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": {"tiny": tiny_registry["tiny"]}}))
    items = [{"text": f"a photo of thing number {i}"} for i in range(800)]
    with serving(config, redis_url) as (base, process):
        job = httpx.post(
            f"{base}/v1/jobs", json={"type": "embed", "items": items}, timeout=30
        ).json()
        midway = poll(base, job["id"], lambda b: b["counts"]["done"] >= 16, 60)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert midway["state"] == "running", midway
    with serving(config, redis_url) as (base, _):
        finished = poll(base, job["id"], lambda b: b["state"] != "running", 60)
        assert finished["state"] == "succeeded", finished
        assert finished["counts"] == {"total": 800, "done": 800, "succeeded": 800, "failed": 0}
        lines = httpx.get(f"{base}/v1/jobs/{job['id']}/results", timeout=30).text.splitlines()
        assert [json.loads(line)["index"] for line in lines] == list(range(800))
