"""Ray Serve mode on a real local Ray cluster (loopback, 2 CPUs, no dashboard): the tiny model on
two replicas answers as the single-process service does, per-item errors and our own 429 come
through unchanged, and the scaling and backpressure settings reached Serve. Skipped, saying why,
without ``ray[serve]``."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipserve.config import Settings
from clipserve.testing.servers import free_port

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None, reason="needs Ray Serve (pip install 'ray[serve]')"
    ),
    pytest.mark.timeout(420),
]

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"
DISABLED = {
    name: {"model_name": model, "enabled": False}
    for name, model in (
        ("accurate", "ViT-L-14"),
        ("blip", "Salesforce/blip-image-captioning-base"),
        ("minilm", "sentence-transformers/all-MiniLM-L6-v2"),
    )
}


@pytest.fixture
def uri(photo_bytes: Callable[..., bytes]) -> Callable[[str], str]:
    def make(name: str) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(photo_bytes(name)).decode()

    return make


def _settings(config: Path, media_root: Path) -> Settings:
    return Settings(
        config_path=config,
        config_reload_interval_s=0.5,  # every replica watches the registry file
        media={"media_root": media_root, "allow_private_urls": True},
        # Our own limit, per replica: a replica that got two 600-text requests refuses the second.
        rate_limit={"items": "1000/minute"},
        ray={
            "deployment_name": "clipserve-test",
            "min_replicas": 2,
            "max_replicas": 2,
            "target_ongoing_requests": 5,
            "max_ongoing_requests": 16,
            "max_queued_requests": 50,
            "retry_after_s": 2,
            "num_cpus": 0.5,
            "memory_gb": 0.5,
            "health_check_period_s": 2,
        },
    )


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_registry: dict[str, dict[str, Any]]
) -> Iterator[tuple[str, Settings]]:
    import ray
    from ray import serve

    from clipserve.ray_serve import application

    root = tmp_path_factory.mktemp("ray")
    config = root / "models.json"
    config.write_text(json.dumps({"models": {"fast": tiny_registry["tiny"], **DISABLED}}))
    settings = _settings(config, root)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(Path("/tmp") / f"ray-{os.getpid()}"),
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings), name="clipserve", route_prefix="/", blocking=False)
        _wait_running(serve, timeout_s=240)
        yield f"http://127.0.0.1:{port}", settings
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_running(serve: Any, timeout_s: float) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get("clipserve")
        if status is not None and status.status == "RUNNING":
            return
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AssertionError(f"deploy failed: {status.message}")
        assert time.monotonic() < deadline, f"not running in {timeout_s} s: {status}"
        time.sleep(0.5)  # polling Serve's controller; no result depends on it


async def _local_scores(settings: Settings, client_for: Callable[..., Any], body: Any) -> Any:
    client = await client_for(settings)
    answer = await client.post(BATCH, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()


async def test_concurrent_requests_score_as_the_single_process_service(
    served: tuple[str, Settings],
    client_for: Callable[..., Any],
    uri: Callable[[str], str],
    assert_scores_close: Callable[[Any, Any], None],
) -> None:
    url, settings = served
    images = [uri(name) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    texts = ["a cat", "a cup of coffee", "an astronaut", "a rocket on its pad"]
    body = {
        "evaluations": [
            {"image_input": image, "text_prompt": text} for image in images for text in texts
        ]
    }
    expected = await _local_scores(settings, client_for, body)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        answers = await asyncio.gather(*(client.post(BATCH, json=body) for _ in range(8)))
        singles = await asyncio.gather(
            *(
                client.post(SINGLE, json={"image_input": images[i], "text_prompt": texts[i]})
                for i in range(4)
            )
        )
    for answer in answers:
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["total_successful"] == 16
        assert_scores_close(
            [r["clip_score"] for r in got["results"]],
            [r["clip_score"] for r in expected["results"]],
        )
    for i, single in enumerate(singles):
        assert single.status_code == 200, single.text
        assert_scores_close(
            single.json()["clip_score"], expected["results"][i * 4 + i]["clip_score"]
        )


async def test_per_item_errors_and_http_errors_come_through(
    served: tuple[str, Settings], uri: Callable[[str], str]
) -> None:
    url, _ = served
    body = {
        "evaluations": [
            {"image_input": uri("chelsea"), "text_prompt": "a cat"},
            {"image_input": "data:image/png;base64,bm90IGFuIGltYWdl", "text_prompt": "a cat"},
            {"image_input": uri("chelsea"), "text_prompt": "a cat", "model_config_name": "nope"},
        ]
    }
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        batch = await client.post(BATCH, json=body)
        invalid = await client.post(SINGLE, json={"image_input": uri("chelsea")})
        missing = await client.get("/v1/system/models/nope/info")
        ready = await client.get("/ready")
    assert batch.status_code == 200, batch.text
    results = batch.json()["results"]
    assert results[0]["error"] is None
    assert results[0]["clip_score"] >= 0
    assert "image" in results[1]["error"].lower()
    assert "nope" in results[2]["error"]
    assert invalid.status_code == 422
    assert invalid.json()["error"].startswith("request validation failed: text_prompt")
    assert missing.status_code == 404
    assert "nope" in missing.json()["error"]
    assert ready.status_code == 200, ready.text


async def test_a_registry_change_reaches_the_replicas(
    served: tuple[str, Settings],
    tiny_registry: dict[str, dict[str, Any]],
    uri: Callable[[str], str],
) -> None:
    url, settings = served
    assert settings.config_path is not None
    models = json.loads(settings.config_path.read_text())["models"]
    models["added"] = tiny_registry["tiny"]
    settings.config_path.write_text(json.dumps({"models": models}))
    body = {"image_input": uri("chelsea"), "text_prompt": "a cat", "model_config_name": "added"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(120):  # each replica checks the file every 0.5 s
            listed = await asyncio.gather(*(client.get("/v1/system/models") for _ in range(4)))
            if all("added" in {m["name"] for m in r.json()["models"]} for r in listed):
                break
            await asyncio.sleep(0.5)  # waiting for the replicas' file watch, not for a result
        answers = await asyncio.gather(*(client.post(SINGLE, json=body) for _ in range(8)))
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_used"] == "added"
        assert answer.json()["error"] is None


def test_scaling_and_backpressure_settings_reached_serve(served: tuple[str, Settings]) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client

    status = serve.status().applications["clipserve"]
    deployment = status.deployments["clipserve-test"]
    assert deployment.status == "HEALTHY"
    assert deployment.replica_states.get("RUNNING", 0) == 2
    details = _get_global_client().get_serve_details()
    config = details["applications"]["clipserve"]["deployments"]["clipserve-test"][
        "deployment_config"
    ]
    assert config["autoscaling_config"]["min_replicas"] == 2
    assert config["autoscaling_config"]["max_replicas"] == 2
    assert config["autoscaling_config"]["target_ongoing_requests"] == 5
    assert config["max_ongoing_requests"] == 16
    assert config["max_queued_requests"] == 50
    # Over the queue, Serve's own answer: a 429 with our Retry-After.
    assert config["backpressure_config"] == {"status_code": 429, "retry_after_s": 2}
    assert config["health_check_period_s"] == 2
    actor = config["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (0.5, 0.0)
    assert actor["memory"] == int(0.5 * 1024**3)


async def test_our_429_comes_through_with_retry_after(served: tuple[str, Settings]) -> None:
    url, _ = served
    body = {"input": [f"text number {i}" for i in range(600)], "model": "fast"}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        # Two replicas, 1000 items a minute each: of three 600-item requests, two reach one
        # replica, and it refuses the second.
        answers = [await client.post("/v1/embeddings", json=body) for _ in range(3)]
    codes = [a.status_code for a in answers]
    assert 200 in codes, [a.text[:300] for a in answers]
    assert 429 in codes, [a.text[:300] for a in answers]
    refused = answers[codes.index(429)]
    assert float(refused.headers["retry-after"]) >= 1
    assert "rate limit exceeded" in refused.json()["error"]["message"]
