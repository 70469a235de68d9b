"""`clipserve serve --workers 2`: one scrape, whichever worker answers it, counts every
worker's requests and sums their queues' capacities (PROMETHEUS_MULTIPROC_DIR); and the same
with one worker."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipserve.testing.servers import clipserve_process

SERIES = re.compile(
    r'^http_requests_total\{endpoint="/v1/embeddings",method="POST",status="200"\} ([0-9.e+]+)$',
    re.MULTILINE,
)


def served(metrics: str) -> float:
    match = SERIES.search(metrics)
    assert match is not None, metrics[:2000]
    return float(match.group(1))


@pytest.mark.parametrize("workers", [1, 2])
def test_one_scrape_counts_every_workers_requests(
    workers: int, tmp_path: Path, tiny_registry: dict[str, Any]
) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": {"tiny": tiny_registry["tiny"]}}))
    env = {"CLIPSERVE_DEFAULT_MODEL": "tiny", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    if workers == 1:
        del env["PROMETHEUS_MULTIPROC_DIR"]
    args = ["--workers", str(workers), "--preload"]
    with clipserve_process(config, env=env, args=args, ready_path="/ready") as (base, _):
        for i in range(24):  # a new connection each: the kernel spreads them over the workers
            with httpx.Client(base_url=base, timeout=30) as client:
                response = client.post("/v1/embeddings", json={"input": f"text {i}"})
                assert response.status_code == 200, response.text
        scrapes = []
        for _ in range(6):
            with httpx.Client(base_url=base, timeout=30) as client:
                scrapes.append(served(client.get("/metrics").text))
        assert scrapes == [24.0] * 6
        metrics = httpx.get(f"{base}/metrics", timeout=30).text
        assert 'batcher_queue_size{modality="text",model="tiny"} 0.0' in metrics
        # every worker's queue holds max_queue_size (1000): the server's capacity is their sum
        capacity = f'batcher_queue_capacity{{modality="text",model="tiny"}} {1000.0 * workers}'
        assert capacity in metrics
