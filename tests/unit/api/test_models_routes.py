from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest

from clipserve.testing import FakeLoader


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(), FakeLoader())


async def test_list_hides_disabled_models_and_all_shows_them(client: Any) -> None:
    listed = (await client.get("/v1/system/models")).json()
    names = [m["name"] for m in listed["models"]]
    assert names == ["fast", "accurate", "blip", "minilm", "broken"]
    assert listed["default_model"] == "fast"
    assert listed["total"] == 5
    fast = listed["models"][0]
    assert fast["status"] == "not_loaded"
    assert fast["loaded"] is False
    for key in (
        "model_name",
        "pretrained",
        "description",
        "memory_gb",
        "avg_inference_time_ms",
        "accuracy_score",
        "enabled",
        "backend",
    ):
        assert key in fast
    everything = (await client.get("/v1/system/models/all")).json()
    assert "hidden" in [m["name"] for m in everything["models"]]


async def test_specs_are_in_the_config_file_shape(client: Any) -> None:
    specs = (await client.get("/v1/system/models/specs")).json()
    assert set(specs) == {"fast", "accurate", "blip", "minilm", "broken"}
    assert specs["fast"]["model_name"] == "fake-fast"
    assert specs["fast"]["backend"] == "open_clip"


async def test_info_reports_runtime_after_first_use(
    client: Any, photo_bytes: Callable[..., bytes]
) -> None:
    before = (await client.get("/v1/system/models/fast/info")).json()
    assert before["runtime"]["loaded"] is False
    uri = "data:image/jpeg;base64," + base64.b64encode(photo_bytes("coffee")).decode()
    await client.post(
        "/evaluator/v1/evaluation/single", json={"image_input": uri, "text_prompt": "coffee"}
    )
    info = (await client.get("/v1/system/models/fast/info")).json()
    runtime = info["runtime"]
    assert info["name"] == "fast"
    assert info["spec"]["model_name"] == "fake-fast"
    assert runtime["loaded"] is True
    assert runtime["status"] == "loaded"
    assert runtime["device"] == "cpu"
    assert runtime["dtype"] == "float32"
    assert runtime["load_time_s"] >= 0
    assert runtime["memory_mb"] > 0
    assert runtime["embed_dim"] == 16
    assert runtime["modalities"] == ["image", "text"]


async def test_info_of_unknown_model_is_404_listing_names(client: Any) -> None:
    response = await client.get("/v1/system/models/nope/info")
    assert response.status_code == 404
    body = response.json()
    assert body["detail"]["available_models"] == ["fast", "accurate", "blip", "minilm", "broken"]


async def test_info_of_broken_model_shows_the_error(client: Any) -> None:
    await client.post(
        "/evaluator/v1/evaluation/single",
        json={"image_input": "x.png", "text_prompt": "x", "model_config_name": "broken"},
    )
    runtime = (await client.get("/v1/system/models/broken/info")).json()["runtime"]
    assert runtime["status"] == "error"
    assert "simulated load failure" in runtime["error"]


async def test_reload_endpoint_applies_file_changes(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    fake_models: dict[str, Any],
) -> None:
    settings = make_settings()
    client = await client_for(settings, FakeLoader())
    fake_models["hidden"]["enabled"] = True
    del fake_models["broken"]
    settings.config_path.write_text(json.dumps(fake_models))
    response = await client.post("/v1/system/models/reload")
    assert response.status_code == 200
    body = response.json()
    assert body["removed"] == ["broken"]
    assert body["updated"] == ["hidden"]  # enabling needs no weights reload
    assert "hidden" in body["models"]
    names = [m["name"] for m in (await client.get("/v1/system/models")).json()["models"]]
    assert "hidden" in names
    assert "broken" not in names

    settings.config_path.write_text("{oops")
    failed = await client.post("/v1/system/models/reload")
    assert failed.status_code == 422
    assert "not valid JSON" in failed.json()["error"]
    status = (await client.get("/v1/system/status")).json()
    assert "not valid JSON" in status["last_reload_error"]
