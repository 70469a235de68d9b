from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from clipserve.config import Settings
from clipserve.engine.executor import Executors
from clipserve.engine.registry import ModelRegistry, ModelState
from clipserve.errors import ConfigError, ModelNotFoundError, ModelUnavailableError
from clipserve.model_specs import ModelSpec
from clipserve.models.quantize import INT8
from clipserve.observability.metrics import Metrics
from clipserve.testing import FakeBackend, FakeLoader


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def registry_for(clock: Clock) -> AsyncIterator[Callable[..., ModelRegistry]]:
    made: list[tuple[ModelRegistry, Executors]] = []

    def make(settings: Settings, loader: FakeLoader | None = None) -> ModelRegistry:
        executors = Executors(2)
        registry = ModelRegistry(
            settings,
            loader=loader or FakeLoader(),
            executors=executors,
            metrics=Metrics(),
            clock=clock,
        )
        made.append((registry, executors))
        return registry

    yield make
    for registry, executors in made:
        await registry.close()
        executors.shutdown(5.0)


def _touch(path: Path, models: dict[str, Any]) -> None:
    """Rewrite the config with a distinct mtime (file systems may have coarse timestamps)."""
    stat = path.stat()
    path.write_text(json.dumps(models))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


async def test_concurrent_first_requests_load_once(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = FakeLoader()
    registry = registry_for(make_settings(), loader)
    handles = await asyncio.gather(*(registry.get("fast") for _ in range(10)))
    assert loader.load_count == 1
    assert len({id(h) for h in handles}) == 1
    status = registry.status("fast")
    assert status.state is ModelState.LOADED
    assert status.device == "cpu"
    assert status.dtype == "float32"
    assert status.load_time_s is not None


async def test_unknown_and_disabled_models_are_not_found(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    registry = registry_for(make_settings())
    with pytest.raises(ModelNotFoundError, match="'nope' is unknown; available models: fast"):
        await registry.get("nope")
    with pytest.raises(ModelNotFoundError, match="'hidden' is disabled"):
        await registry.get("hidden")
    assert "hidden" not in registry.names()
    assert "hidden" in registry.names(include_disabled=True)


async def test_load_failure_is_recorded_and_retried_after_the_interval(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    clock: Clock,
) -> None:
    loader = FakeLoader()
    registry = registry_for(make_settings(model_retry_interval_s=30), loader)
    with pytest.raises(ModelUnavailableError, match="simulated load failure") as first:
        await registry.get("broken")
    assert first.value.retry_after_s == 30
    status = registry.status("broken")
    assert status.state is ModelState.ERROR
    assert status.error is not None
    assert "weights not found" in status.error

    clock.now += 10  # inside the interval: fail fast without another attempt
    with pytest.raises(ModelUnavailableError) as second:
        await registry.get("broken")
    assert second.value.retry_after_s == pytest.approx(20)
    assert loader.load_count == 1

    clock.now += 25  # past it: try again
    with pytest.raises(ModelUnavailableError):
        await registry.get("broken")
    assert loader.load_count == 2


async def test_reload_adds_removes_changes_and_updates(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    settings = make_settings()
    registry = registry_for(settings)
    fast = await registry.get("fast")
    accurate = await registry.get("accurate")
    assert settings.config_path is not None
    models = {k: v for k, v in fake_models.items() if k != "broken"}
    models["fast"] = {**models["fast"], "description": "new words"}  # metadata only
    models["accurate"] = {**models["accurate"], "model_name": "fake-accurate-v2"}  # weights
    models["new"] = {"model_name": "fake-new"}
    _touch(settings.config_path, models)

    result = await registry.check_for_changes()
    assert result is not None
    assert result.added == ["new"]
    assert result.removed == ["broken"]
    assert result.changed == ["accurate"]
    assert result.updated == ["fast"]
    assert await registry.get("fast") is fast  # kept loaded
    assert registry.spec("fast").description == "new words"
    assert await registry.drain(10)
    assert accurate.backend.closed  # type: ignore[attr-defined]
    assert registry.status("accurate").state is ModelState.NOT_LOADED
    assert (await registry.get("accurate")).spec.model_name == "fake-accurate-v2"
    with pytest.raises(ModelNotFoundError):
        await registry.get("broken")
    assert await registry.check_for_changes() is None  # unchanged file: nothing to do


async def test_disabling_a_model_unloads_it_after_in_flight_requests(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    settings = make_settings()
    registry = registry_for(settings)
    assert settings.config_path is not None
    async with registry.use("fast") as handle:
        fake_models["fast"]["enabled"] = False
        _touch(settings.config_path, fake_models)
        result = await registry.reload()
        assert result.changed == ["fast"]
        assert handle.retired
        assert not handle.backend.closed  # type: ignore[attr-defined]  # still serving
        with pytest.raises(ModelNotFoundError, match="disabled"):
            await registry.get("fast")
    assert await registry.drain(10)  # the close runs on a task the registry owns
    assert handle.backend.closed  # type: ignore[attr-defined]  # released after the lease


async def test_broken_reload_keeps_the_previous_config(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    settings = make_settings()
    registry = registry_for(settings)
    assert settings.config_path is not None
    settings.config_path.write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        await registry.reload()
    assert registry.last_reload_error is not None
    assert "fast" in registry.names()
    assert (await registry.get("fast")).name == "fast"
    assert await registry.check_for_changes() is None  # the same broken file isn't retried


async def test_preload_loads_enabled_models_and_records_failures(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    registry = registry_for(make_settings())
    await registry.preload()
    states = {s.name: s.state for s in registry.statuses()}
    assert states["fast"] is ModelState.LOADED
    assert states["broken"] is ModelState.ERROR
    assert "hidden" not in states


# --- hot reload with the seed's {"models": {...}} config shape and the bare one -----------------


async def test_hot_reload_of_the_seeds_wrapped_config_keeps_env_overrides(
    registry_for: Callable[..., ModelRegistry],
    write_config: Callable[[dict[str, Any]], Path],
    fake_models: dict[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_CONFIG_HIDDEN", json.dumps({"enabled": True}))
    path = write_config({"models": fake_models})
    registry = registry_for(Settings(config_path=path, config_reload_interval_s=0))
    assert "hidden" in registry.names()  # MODEL_CONFIG_ beats the file's enabled: false
    fast = await registry.get("fast")

    models = {k: v for k, v in fake_models.items() if k != "broken"}
    models["fast"] = {**models["fast"], "description": "edited"}
    models["accurate"] = {**models["accurate"], "enabled": False}
    models["new"] = {"model_name": "fake-new"}
    _touch(path, {"models": models})
    result = await registry.check_for_changes()
    assert result is not None
    assert (result.added, result.removed) == (["new"], ["broken"])
    assert (result.changed, result.updated) == (["accurate"], ["fast"])
    assert await registry.get("fast") is fast
    assert registry.spec("fast").description == "edited"
    with pytest.raises(ModelNotFoundError, match="'accurate' is disabled"):
        await registry.get("accurate")
    assert "hidden" in registry.names()  # the override survives the reload
    assert (await registry.get("new")).spec.model_name == "fake-new"
    assert await registry.check_for_changes() is None


async def test_hot_reload_between_the_bare_and_the_wrapped_shape(
    registry_for: Callable[..., ModelRegistry],
    write_config: Callable[[dict[str, Any]], Path],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    path = write_config(fake_models)  # bare
    registry = registry_for(Settings(config_path=path, config_reload_interval_s=0))
    accurate = await registry.get("accurate")

    fake_models["accurate"]["model_name"] = "fake-accurate-v2"
    _touch(path, {"models": fake_models})  # the same models, now wrapped, one changed
    result = await registry.reload()
    assert (result.added, result.removed, result.changed) == ([], [], ["accurate"])
    assert accurate.retired
    assert (await registry.get("accurate")).spec.model_name == "fake-accurate-v2"

    fake_models["fast"]["description"] = "bare again"
    _touch(path, fake_models)
    result = await registry.reload()
    assert (result.added, result.removed, result.updated) == ([], [], ["fast"])
    assert registry.spec("fast").description == "bare again"


async def test_a_bad_wrapped_reload_names_the_file_and_model_and_keeps_the_config(
    registry_for: Callable[..., ModelRegistry],
    write_config: Callable[[dict[str, Any]], Path],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    path = write_config({"models": fake_models})
    registry = registry_for(Settings(config_path=path, config_reload_interval_s=0))
    _touch(path, {"models": {**fake_models, "fast": {"memory_gb": -1}}})
    assert await registry.check_for_changes() is None
    assert registry.last_reload_error == (
        f"{path}: model 'fast': memory_gb: Input should be greater than or equal to 0"
    )
    _touch(path, {"models": fake_models, "fast": {}})
    with pytest.raises(ConfigError, match='a top-level "models" cannot be mixed'):
        await registry.reload()
    assert registry.spec("fast").model_name == "fake-fast"  # the previous config stays


async def test_a_request_cancelled_after_a_reload_still_gets_the_model_closed(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    settings = make_settings()
    registry = registry_for(settings)
    leased = asyncio.Event()

    async def request() -> None:
        async with registry.use("fast"):
            leased.set()
            await asyncio.Event().wait()  # a long request, until its client goes away

    task = asyncio.ensure_future(request())
    await asyncio.wait_for(leased.wait(), 10)
    handle = await registry.get("fast")
    assert settings.config_path is not None
    _touch(settings.config_path, {**fake_models, "fast": {"model_name": "fake-fast-v2"}})
    await registry.reload()
    task.cancel()  # the client disconnects: its `finally` must not be what closes the model
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await registry.drain(10)
    assert handle.closed
    assert handle.backend.closed  # type: ignore[attr-defined]


async def test_a_model_replaced_while_loading_is_never_handed_out(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    entered, release = threading.Event(), threading.Event()

    def hold_first_load(spec: Any) -> None:
        if spec.model_name == "fake-fast":
            entered.set()
            assert release.wait(10)

    loader = FakeLoader(before_load=hold_first_load)
    settings = make_settings()
    registry = registry_for(settings, loader)
    waiting = asyncio.ensure_future(registry.get("fast"))
    assert await asyncio.to_thread(entered.wait, 10)  # the old spec is loading
    assert settings.config_path is not None
    _touch(settings.config_path, {**fake_models, "fast": {"model_name": "fake-fast-v2"}})
    await registry.reload()
    release.set()
    handle = await asyncio.wait_for(waiting, 10)
    assert handle.spec.model_name == "fake-fast-v2"
    assert not handle.retired
    assert await registry.drain(10)
    assert loader.loaded["fake-fast"].closed  # the superseded load was closed, not handed out


async def test_int8_is_passed_to_the_loader_on_the_cpu_and_falls_back_on_cuda(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a mocked CUDA device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked: dict[str, tuple[str, torch.dtype]] = {}

    def load(spec: ModelSpec, *, device: str, dtype: torch.dtype) -> FakeBackend:
        asked[spec.model_name] = (device, dtype)
        return FakeBackend()

    models = {
        "on-cpu": {"model_name": "real-cpu", "precision": "int8", "device": "cpu"},
        "on-cuda": {"model_name": "real-cuda", "precision": "int8", "device": "cuda"},
    }
    registry = registry_for(make_settings(models, cuda_precision="bf16"), FakeLoader(load))
    with caplog.at_level(logging.WARNING, logger="clipserve.models.loader"):
        await registry.get("on-cpu")
        await registry.get("on-cuda")
    assert asked == {"real-cpu": ("cpu", INT8), "real-cuda": ("cuda", torch.bfloat16)}
    assert "int8 (dynamic quantization) runs on the CPU only; using bfloat16 on cuda" in (
        caplog.text
    )
