"""The real app with the real loaders and tiny random models built at test time."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"


def png_uri(photo_bytes: Callable[..., bytes], name: str) -> str:
    return "data:image/png;base64," + base64.b64encode(photo_bytes(name, "PNG")).decode()


@pytest.fixture
async def client(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    tiny_registry: dict[str, Any],
) -> Any:
    return await client_for(make_settings(tiny_registry))


def hf_reference_score(model_dir: Path, image: Any, text: str) -> float:
    """max(100 * cos, 0) straight from transformers' CLIPModel + CLIPProcessor."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    inputs = processor(text=[text], images=[image], return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    return max(100.0 * float(cos[0]), 0.0)


async def test_hf_score_over_http_matches_transformers(
    client: Any,
    tiny_dirs: dict[str, Path],
    photos: dict[str, Any],
    photo_bytes: Callable[..., bytes],
) -> None:
    for name, caption in (
        ("astronaut", "an astronaut"),
        ("chelsea", "a cat"),
        ("coffee", "coffee"),
    ):
        response = await client.post(
            SINGLE,
            json={
                "image_input": png_uri(photo_bytes, name),
                "text_prompt": caption,
                "model_config_name": "tiny-hf",
            },
        )
        assert response.status_code == 200, response.text
        expected = hf_reference_score(tiny_dirs["hf_clip"], photos[name], caption)
        assert response.json()["clip_score"] == pytest.approx(expected, abs=1e-4)


async def test_open_clip_batch_equals_singles(
    client: Any, photo_bytes: Callable[..., bytes]
) -> None:
    evaluations = [
        {
            "image_input": png_uri(photo_bytes, name),
            "text_prompt": f"a photo of {name}",
            "model_config_name": model,
        }
        for name in ("astronaut", "chelsea", "rocket")
        for model in ("tiny", "tiny-hf", "tiny-siglip")
    ]
    batch = await client.post(BATCH, json={"evaluations": evaluations, "batch_size": 2})
    assert batch.status_code == 200
    body = batch.json()
    assert body["total_successful"] == 9
    for item, result in zip(evaluations, body["results"], strict=True):
        single = (await client.post(SINGLE, json=item)).json()
        assert result["model_used"] == item["model_config_name"]
        assert result["clip_score"] == pytest.approx(single["clip_score"], abs=1e-4)


async def test_long_prompts_are_truncated_not_fatal(
    client: Any, photo_bytes: Callable[..., bytes]
) -> None:
    for model in ("tiny", "tiny-hf", "tiny-siglip"):
        response = await client.post(
            SINGLE,
            json={
                "image_input": png_uri(photo_bytes, "rocket"),
                "text_prompt": "rocket " * 300,
                "model_config_name": model,
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["text_truncated"] is True
        info = await client.get(f"/v1/system/models/{model}/info")
        # The answer names the limit that applied: the model's own context.
        context = info.json()["runtime"]["context_length"]
        assert response.json()["text_context_length"] == context
        assert context == (64 if model == "tiny-siglip" else 77)


async def test_hub_models_fail_fast_offline_with_a_clear_503(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    photo_bytes: Callable[..., bytes],
) -> None:
    from clipserve.model_specs import BUILTIN_MODELS

    client = await client_for(make_settings({"fast": dict(BUILTIN_MODELS["fast"])}))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    started = time.monotonic()
    response = await client.post(
        SINGLE,
        json={
            "image_input": png_uri(photo_bytes, "rocket"),
            "text_prompt": "x",
            "model_config_name": "fast",
        },
    )
    assert time.monotonic() - started < 30
    assert response.status_code == 503
    body = response.json()
    assert body["error"].startswith("model 'fast' is unavailable")
    assert "download" in body["error"]
    health = (await client.get("/evaluator/health")).json()
    assert health["status"] == "degraded"
    assert health["models"]["fast"] == "error"


async def test_text_only_model_refuses_images(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    photo_bytes: Callable[..., bytes],
) -> None:
    from clipserve.model_specs import BUILTIN_MODELS

    client = await client_for(make_settings({"minilm": dict(BUILTIN_MODELS["minilm"])}))
    response = await client.post(
        SINGLE,
        json={
            "image_input": png_uri(photo_bytes, "rocket"),
            "text_prompt": "a rocket",
            "model_config_name": "minilm",
        },
    )
    assert response.status_code == 400
    assert response.json()["error"] == (
        "model 'minilm' cannot encode image inputs (it supports: text)"
    )
    info = (await client.get("/v1/system/models/minilm/info")).json()["runtime"]
    assert info["loaded"] is True  # the real offline weights loaded
    assert info["embed_dim"] == 384


async def test_config_file_changes_are_picked_up_by_the_watcher(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    tiny_registry: dict[str, Any],
    fake_models: dict[str, Any],
    photo_bytes: Callable[..., bytes],
) -> None:
    settings = make_settings(tiny_registry, config_reload_interval_s=0.05)
    client = await client_for(settings)
    item = {
        "image_input": png_uri(photo_bytes, "coffee"),
        "text_prompt": "coffee",
        "model_config_name": "tiny",
    }
    assert (await client.post(SINGLE, json=item)).status_code == 200
    disabled = {**fake_models, **tiny_registry, "tiny": {**tiny_registry["tiny"], "enabled": False}}
    settings.config_path.write_text(json.dumps(disabled))
    stat = settings.config_path.stat()
    os.utime(settings.config_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    deadline = time.monotonic() + 10
    names: list[str] = ["tiny"]
    while "tiny" in names and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        listing = (await client.get("/v1/system/models")).json()
        names = [m["name"] for m in listing["models"]]
    assert "tiny" not in names
    response = await client.post(SINGLE, json=item)
    assert response.status_code == 404
    assert "disabled" in response.json()["error"]
