"""The app built from a config file in the seed's ``{"models": {...}}`` shape: every endpoint.

The first app's models are the tiny real models (real loaders, random weights) under the seed's
names, plus the built-in ``minilm`` (offline weights) behind ``/embed``. The second is the seed's
file verbatim, whose hub weights cannot be downloaded here (``HF_HUB_OFFLINE=1``): it still starts
and answers those models' requests with a clear 503.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clipserve.config import Settings

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"

# Seed 000, "Configuration Management", verbatim.
SEED_MODELS_JSON = (Path(__file__).parents[1] / "data" / "seed_models.json").read_text()


def _settings(path: Path) -> Settings:
    return Settings(config_path=path, config_reload_interval_s=0, model_retry_interval_s=60)


@pytest.fixture
def uri(photo_bytes: Callable[..., bytes]) -> Callable[[str], str]:
    def make(name: str) -> str:
        return "data:image/jpeg;base64," + base64.b64encode(photo_bytes(name)).decode()

    return make


@pytest.fixture
def seed_shaped_config(tmp_path: Path, tiny_registry: dict[str, dict[str, Any]]) -> Path:
    """The seed's shape and fields, with the tiny models as fast, accurate and siglip."""

    def entry(tiny: str, description: str) -> dict[str, Any]:
        return {
            **tiny_registry[tiny],
            "pretrained": None,  # the folder carries the weights
            "description": description,
            "memory_gb": 0.01,
            "avg_inference_time_ms": 5,
            "accuracy_score": 0.1,
            "enabled": True,
        }

    models = {
        "fast": entry("tiny", "tiny open_clip CLIP"),
        "accurate": entry("tiny-hf", "tiny transformers CLIP"),
        "siglip": entry("tiny-siglip", "tiny transformers SigLIP"),
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": models}, indent=2))
    return path


async def test_every_endpoint_answers_with_a_seed_shaped_config(
    client_for: Callable[..., Any],
    seed_shaped_config: Path,
    tiny_registry: dict[str, dict[str, Any]],
    uri: Callable[[str], str],
    photo_bytes: Callable[..., bytes],
) -> None:
    client = await client_for(_settings(seed_shaped_config))
    cat, coffee = uri("chelsea"), uri("coffee")

    single = await client.post(
        SINGLE, json={"image_input": cat, "text_prompt": "a cat", "model_config_name": "fast"}
    )
    assert single.status_code == 200, single.text
    assert single.json()["model_used"] == "fast"
    assert single.json()["error"] is None
    assert 0 <= single.json()["clip_score"] <= 100

    evaluations = [
        {"image_input": image, "text_prompt": text, "model_config_name": model}
        for model in ("fast", "accurate", "siglip")
        for image, text in ((cat, "a cat"), (coffee, "a cup of coffee"))
    ]
    batch = await client.post(BATCH, json={"evaluations": evaluations, "batch_size": 4})
    assert batch.status_code == 200, batch.text
    assert (batch.json()["total_processed"], batch.json()["total_successful"]) == (6, 6)
    assert [r["model_used"] for r in batch.json()["results"]] == [
        e["model_config_name"] for e in evaluations
    ]

    listing = await client.get("/v1/system/models")
    assert listing.status_code == 200
    names = {m["name"] for m in listing.json()["models"]}
    assert names == {"fast", "accurate", "siglip", "blip", "minilm"}  # the built-ins stay
    everything = await client.get("/v1/system/models/all")
    assert everything.status_code == 200
    assert {m["name"] for m in everything.json()["models"]} == names
    specs = await client.get("/v1/system/models/specs")
    assert specs.status_code == 200
    assert specs.json()["fast"]["model_name"] == tiny_registry["tiny"]["model_name"]
    assert specs.json()["siglip"]["description"] == "tiny transformers SigLIP"
    assert specs.json()["accurate"]["backend"] == "hf"
    for name in ("fast", "accurate", "siglip"):
        info = await client.get(f"/v1/system/models/{name}/info")
        assert info.status_code == 200, info.text
        assert info.json()["runtime"]["loaded"] is True  # the evaluations loaded it

    embed = await client.post("/embed", json={"input_text": "Hello, world!"})
    assert embed.status_code == 200, embed.text
    assert embed.json()["model"] == "minilm"
    assert len(embed.json()["embedding"]) == 384

    texts = await client.post("/v1/embeddings", json={"model": "fast", "input": ["a", "b"]})
    assert texts.status_code == 200, texts.text
    dim = len(texts.json()["data"][0]["embedding"])
    images = await client.post(
        "/v1/embeddings", json={"model": "fast", "input": [cat], "modality": "image"}
    )
    assert images.status_code == 200, images.text
    assert len(images.json()["data"][0]["embedding"]) == dim
    files = [("files", ("cat.jpg", photo_bytes("chelsea"), "image/jpeg"))]
    uploads = await client.post("/v1/embeddings/images", files=files, data={"model": "siglip"})
    assert uploads.status_code == 200, uploads.text
    assert len(uploads.json()["data"]) == 1

    rank = await client.post(
        "/v1/rank",
        json={
            "model": "accurate",
            "query": "a cat",
            "documents": [coffee, cat],
            "top_n": 1,
            "documents_modality": "image",
        },
    )
    assert rank.status_code == 200, rank.text
    assert len(rank.json()["results"]) == 1
    classify = await client.post(
        "/v1/classify", json={"model": "siglip", "input": [cat, coffee], "labels": ["cat", "cup"]}
    )
    assert classify.status_code == 200, classify.text
    assert len(classify.json()["data"]) == 2

    reload = await client.post("/v1/system/models/reload")
    assert reload.status_code == 200, reload.text
    status = await client.get("/v1/system/status")
    assert status.status_code == 200
    assert status.json()["config_path"] == str(seed_shaped_config)
    health = await client.get("/evaluator/health")
    assert health.status_code == 200
    assert health.json()["status"] == "healthy"
    for path in ("/evaluator/metrics", "/metrics"):
        metrics = await client.get(path)
        assert metrics.status_code == 200
        assert "http_requests_total" in metrics.text
    assert (await client.get("/health")).status_code == 200
    ready = await client.get("/ready")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


async def test_the_seeds_verbatim_file_starts_and_answers_503_for_its_hub_models(
    client_for: Callable[..., Any], tmp_path: Path, uri: Callable[[str], str]
) -> None:
    path = tmp_path / "models.json"
    path.write_text(SEED_MODELS_JSON)
    client = await client_for(_settings(path))  # lazy: nothing is downloaded at start-up

    specs = (await client.get("/v1/system/models/specs")).json()
    assert specs["accurate"]["memory_gb"] == 6.0
    for model in ("fast", "accurate"):
        item = {"image_input": uri("rocket"), "text_prompt": "a rocket", "model_config_name": model}
        response = await client.post(SINGLE, json=item)
        assert response.status_code == 503, response.text
        assert response.json()["error"].startswith(f"model '{model}' is unavailable")
        assert "Retry-After" in response.headers
    health = (await client.get("/evaluator/health")).json()
    assert health["status"] == "degraded"
    assert health["models"]["fast"] == health["models"]["accurate"] == "error"
    assert (await client.get("/ready")).status_code == 503
    assert (await client.post("/embed", json={"input_text": "still works"})).status_code == 200
