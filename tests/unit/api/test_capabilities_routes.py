"""POST /api/v1/warmup and GET /api/v1/capabilities."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from clipserve.models.loader import load_backend
from clipserve.testing import FakeLoader

_WARMUP = "/api/v1/warmup"
_CAPABILITIES = "/api/v1/capabilities"
_METRIC = "clipserve_model_warmup_time_seconds"


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
async def client(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], loader: FakeLoader
) -> Any:
    return await client_for(make_settings(), loader)


def _passes(model: dict[str, Any]) -> list[tuple[str, int]]:
    return [(p["modality"], p["batch_size"]) for p in model["passes"]]


async def test_warmup_loads_and_runs_the_named_model(client: Any, loader: FakeLoader) -> None:
    response = await client.post(_WARMUP, json={"models": ["fast", "fast"]})
    assert response.status_code == 200
    body = response.json()
    assert body["total_ms"] > 0
    (fast,) = body["models"]  # deduplicated
    assert fast["model"] == "fast"
    assert fast["status"] == "ok"
    assert fast["error"] is None
    assert fast["device"] == "cpu"
    assert fast["modalities"] == ["image", "text"]
    assert _passes(fast) == [("image", 1), ("image", 32), ("text", 1), ("text", 32)]
    assert all(p["duration_ms"] > 0 for p in fast["passes"])
    assert fast["duration_ms"] >= sum(p["duration_ms"] for p in fast["passes"])
    backend = loader.loaded["fake-fast"]
    assert backend.forwards("image") == [1, 32]  # the passes really ran on the model
    assert backend.forwards("text") == [1, 32]


async def test_warmup_without_a_body_warms_every_loaded_model(
    client: Any, loader: FakeLoader
) -> None:
    assert (await client.post(_WARMUP)).json()["models"] == []  # nothing loaded yet
    await client.post(_WARMUP, json={"models": ["fast", "minilm"]})
    for body in ({}, {"models": []}, None):
        response = await client.post(_WARMUP, json=body)
        assert response.status_code == 200
        models = response.json()["models"]
        assert [m["model"] for m in models] == ["fast", "minilm"]
        assert _passes(models[1]) == [("text", 1), ("text", 32)]  # text-only: one queue
    assert loader.loaded["fake-text"].forwards("text") == [1, 32] * 4
    assert "fake-accurate" not in loader.loaded  # not loaded, so not warmed


@pytest.mark.parametrize("names", [["nope"], ["fast", "nope"], ["hidden"]])
async def test_warmup_of_an_unknown_model_is_a_404_before_any_work(
    client: Any, loader: FakeLoader, names: list[str]
) -> None:
    response = await client.post(_WARMUP, json={"models": names})
    assert response.status_code == 404
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert f"model config '{names[-1]}' is" in body["error"]
    assert "available models: fast, accurate, blip, minilm, broken" in body["error"]
    assert body["detail"]["model"] == names[-1]
    assert loader.loaded == {}  # nothing was loaded or warmed


async def test_warmup_rejects_a_malformed_body(client: Any) -> None:
    response = await client.post(_WARMUP, json={"models": "fast"})
    assert response.status_code == 422
    assert "error" in response.json()


async def test_a_model_that_fails_to_load_gets_an_error_entry(client: Any) -> None:
    response = await client.post(_WARMUP, json={"models": ["broken", "fast"]})
    assert response.status_code == 200
    broken, fast = response.json()["models"]
    assert broken["status"] == "error"
    assert "simulated load failure" in broken["error"]
    assert broken["passes"] == []
    assert fast["status"] == "ok"


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (RuntimeError("kaboom"), "the text pass at batch size 1 failed (RuntimeError)"),
        (
            torch.OutOfMemoryError("CUDA out of memory"),
            "out of device memory in the text pass at batch size 1",
        ),
    ],
)
async def test_a_failing_forward_pass_is_an_error_entry_not_a_failed_request(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    failure: Exception,
    expected: str,
) -> None:
    def before_forward(modality: str, n: int) -> None:
        if modality == "text":
            raise failure

    client = await client_for(make_settings(), FakeLoader(before_forward=before_forward))
    response = await client.post(_WARMUP, json={"models": ["fast"]})
    assert response.status_code == 200
    (fast,) = response.json()["models"]
    assert fast["status"] == "error"
    assert expected in fast["error"]
    assert "kaboom" not in fast["error"]  # the library's text stays in the log
    assert _passes(fast) == [("image", 1), ("image", 32)]  # what ran before the failure
    assert fast["modalities"] == ["image", "text"]
    capabilities = (await client.get(_CAPABILITIES)).json()
    assert capabilities["models"][0]["warmup_time_ms"] is None  # no successful warm-up


async def test_capabilities_report_the_service_and_loaded_models(client: Any) -> None:
    body = (await client.get(_CAPABILITIES)).json()
    assert body["device"] == "cpu"
    assert body["dtype"] == "float32"
    assert body["runtime"] == "eager"
    assert body["compiled"] is False
    assert body["image_decoder"] == "pillow"
    assert body["pillow_version"]
    assert body["torch_version"] == torch.__version__
    assert body["cuda_available"] is False
    assert body["gpu"] is None
    assert body["max_batch_size"] == 32
    assert set(body["backends"]) == {"open_clip", "transformers", "sentence_transformers"}
    assert body["backends"]["open_clip"] is True
    assert body["models"] == []  # nothing loaded yet

    await client.post(_WARMUP, json={"models": ["fast"]})
    (fast,) = (await client.get(_CAPABILITIES)).json()["models"]
    assert fast["name"] == "fast"
    assert (fast["device"], fast["dtype"]) == ("cpu", "float32")
    assert (fast["runtime"], fast["compiled"]) == ("eager", False)
    assert fast["modalities"] == ["image", "text"]
    assert fast["queues"] == [
        {"modality": "image", "max_batch_size": 32, "probed_batch_size": None},  # no CPU probe
        {"modality": "text", "max_batch_size": 32, "probed_batch_size": None},
    ]
    assert fast["load_time_ms"] >= 0
    assert fast["warmup_time_ms"] > 0
    assert fast["warmed_up_at"] is not None


async def test_a_tiny_real_model_warms_up_and_reports_cpu_float32(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    tiny_registry: dict[str, Any],
) -> None:
    client = await client_for(
        make_settings(tiny_registry, batching={"max_batch_size": 4}), FakeLoader(load_backend)
    )
    response = await client.post(_WARMUP, json={"models": ["tiny"]})
    assert response.status_code == 200
    (tiny,) = response.json()["models"]
    assert tiny["status"] == "ok", tiny["error"]
    assert _passes(tiny) == [("image", 1), ("image", 4), ("text", 1), ("text", 4)]
    assert all(p["duration_ms"] > 0 for p in tiny["passes"])
    body = (await client.get(_CAPABILITIES)).json()
    (model,) = body["models"]
    assert (model["name"], model["backend"]) == ("tiny", "open_clip")
    assert (model["device"], model["dtype"]) == ("cpu", "float32")
    assert [q["max_batch_size"] for q in model["queues"]] == [4, 4]
    assert model["load_time_ms"] > 0
    assert model["warmup_time_ms"] > 0


async def test_an_int8_model_reports_int8_in_capabilities_and_model_info(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    tiny_registry: dict[str, Any],
) -> None:
    models = {"tiny-int8": {**tiny_registry["tiny"], "precision": "int8"}}
    client = await client_for(make_settings(models), FakeLoader(load_backend))
    response = await client.post(_WARMUP, json={"models": ["tiny-int8"]})
    (warmed,) = response.json()["models"]
    assert warmed["status"] == "ok", warmed["error"]
    (model,) = (await client.get(_CAPABILITIES)).json()["models"]
    assert (model["name"], model["device"], model["dtype"]) == ("tiny-int8", "cpu", "int8")
    info = (await client.get("/v1/system/models/tiny-int8/info")).json()
    assert info["spec"]["precision"] == "int8"
    assert (info["runtime"]["device"], info["runtime"]["dtype"]) == ("cpu", "int8")
    assert info["runtime"]["memory_mb"] > 0


async def test_the_warmup_metric_is_set_and_removed_on_unload(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    write_config: Callable[[dict[str, Any]], Path],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    client = await client_for(make_settings({"extra": {"model_name": "fake-extra"}}), FakeLoader())
    await client.post(_WARMUP, json={"models": ["extra"]})
    metrics = (await client.get("/metrics")).text
    assert f'{_METRIC}{{model="extra"}}' in metrics
    assert 'model_load_time_seconds{model="extra"}' in metrics

    write_config(fake_models)  # without "extra"
    assert (await client.post("/v1/system/models/reload")).json()["removed"] == ["extra"]
    async with asyncio.timeout(10):  # the unload runs on a registry task
        while f'{_METRIC}{{model="extra"}}' in (await client.get("/metrics")).text:
            await asyncio.sleep(0.01)
    assert 'model_load_time_seconds{model="extra"}' not in (await client.get("/metrics")).text


@pytest.mark.parametrize("export_fails", [False, True])
async def test_capabilities_and_model_info_say_which_runtime_runs(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    tiny_registry: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    export_fails: bool,
) -> None:
    from clipserve.models import runtimes

    if export_fails:

        def broken(*args: Any) -> None:
            raise RuntimeError("exporter crashed")

        monkeypatch.setattr(runtimes, "_export", broken)
    models = {"tiny-onnx": {**tiny_registry["tiny"], "runtime": "onnx"}}
    loader = partial(load_backend, runtime_cache_dir=tmp_path / "runtime-cache")
    client = await client_for(make_settings(models), FakeLoader(loader))
    (warmed,) = (await client.post(_WARMUP, json={"models": ["tiny-onnx"]})).json()["models"]
    assert warmed["status"] == "ok", warmed["error"]

    body = (await client.get(_CAPABILITIES)).json()
    (model,) = body["models"]
    assert body["compiled"] is False
    assert model["compiled"] is False
    assert model["runtime_load_ms"] > 0
    info = (await client.get("/v1/system/models/tiny-onnx/info")).json()
    assert info["spec"]["runtime"] == "onnx"
    if export_fails:  # both towers stayed eager, and both say why
        assert (model["runtime"], model["runtime_towers"]) == ("eager", [])
        assert model["runtime_fallback"] == (
            "image: RuntimeError: exporter crashed; text: RuntimeError: exporter crashed"
        )
        assert info["runtime"]["runtime"] == "eager"
        assert info["runtime"]["runtime_fallback"] == model["runtime_fallback"]
    else:
        assert (model["runtime"], model["runtime_towers"]) == ("onnx", ["image", "text"])
        assert model["runtime_fallback"] is None
        assert (info["runtime"]["runtime"], info["runtime"]["runtime_fallback"]) == ("onnx", None)
