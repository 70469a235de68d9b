"""Ray Serve mode without a cluster: the settings (the seed's defaults, USE_RAY_SERVE), the
deployment options they become, the replica's health check, and `clipserve serve --ray`."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from clipserve import ray_serve
from clipserve.cli import app
from clipserve.config import RaySettings, Settings
from clipserve.engine.core import Readiness
from clipserve.engine.registry import ModelState

pytest.importorskip("ray.serve", reason="needs Ray Serve (pip install 'ray[serve]')")


def test_the_defaults_are_the_seeds() -> None:
    ray = RaySettings()
    assert (ray.min_replicas, ray.max_replicas, ray.target_ongoing_requests) == (1, 4, 10)
    assert (ray.num_cpus, ray.num_gpus, ray.enabled) == (1, 0, False)
    assert ray.deployment_name == "vision-similarity-service"


@pytest.mark.parametrize(("raw", "enabled"), [("true", True), ("1", True), ("false", False)])
def test_use_ray_serve_turns_the_mode_on(
    monkeypatch: pytest.MonkeyPatch, raw: str, enabled: bool
) -> None:
    monkeypatch.setenv("USE_RAY_SERVE", raw)
    assert Settings().ray.enabled is enabled


def test_min_replicas_above_max_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ray.min_replicas \(5\) exceeds ray.max_replicas \(4\)"):
        RaySettings(min_replicas=5)


def _registry(tmp_path: Path, models: dict[str, Any]) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": models}))
    return path


def test_replica_memory_is_the_enabled_models_memory(tmp_path: Path) -> None:
    config = _registry(
        tmp_path,
        {
            "fast": {"model_name": "ViT-B-32", "memory_gb": 0.6},
            "accurate": {"model_name": "ViT-L-14", "memory_gb": 1.7, "enabled": False},
            "blip": {"model_name": "b", "memory_gb": 0.9, "enabled": False},
            "minilm": {"model_name": "m", "memory_gb": 0.1},
        },
    )
    settings = Settings(config_path=config)
    assert ray_serve.replica_memory_gb(settings) == pytest.approx(0.7)
    options = ray_serve.deployment_options(settings)
    assert options["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
        "memory": int(0.7 * 1024**3),
    }
    explicit = Settings(config_path=config, ray={"memory_gb": 3})
    assert ray_serve.deployment_options(explicit)["ray_actor_options"]["memory"] == 3 * 1024**3


def test_no_stated_memory_asks_for_the_seeds_4_gb(tmp_path: Path) -> None:
    unstated = {
        name: {"model_name": name, "memory_gb": None}
        for name in ("fast", "accurate", "blip", "minilm")
    }
    settings = Settings(config_path=_registry(tmp_path, unstated))
    assert ray_serve.replica_memory_gb(settings) == 4.0


def test_deployment_options_carry_scaling_and_backpressure() -> None:
    settings = Settings(
        ray={
            "min_replicas": 0,
            "max_replicas": 8,
            "target_ongoing_requests": 3,
            "max_ongoing_requests": 12,
            "max_queued_requests": 40,
            "retry_after_s": 5,
            "num_gpus": 1,
            "memory_gb": 0,
        }
    )
    options = ray_serve.deployment_options(settings)
    assert options["autoscaling_config"] == {
        "min_replicas": 0,
        "initial_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 3,
    }
    assert (options["max_ongoing_requests"], options["max_queued_requests"]) == (12, 40)
    backpressure = options["backpressure_config"]
    assert (backpressure.status_code, backpressure.retry_after_s) == (429, 5)
    assert "memory" not in options["ray_actor_options"]  # 0: no memory reservation
    assert options["ray_actor_options"]["num_gpus"] == 1


def _replica_with(readiness: Readiness, state: ModelState = ModelState.LOADED) -> Any:
    replica = ray_serve.ClipServeReplica(Settings().model_dump_json())
    registry = SimpleNamespace(status=lambda name, include_disabled: SimpleNamespace(state=state))
    engine = SimpleNamespace(
        readiness=lambda: readiness, registry=registry, settings=replica._settings
    )
    replica._app = SimpleNamespace(state=SimpleNamespace(engine=engine))  # type: ignore[assignment]
    return replica


def test_the_replica_preloads_its_models() -> None:
    replica = ray_serve.ClipServeReplica(Settings().model_dump_json())
    assert replica._settings.preload is True


async def test_health_fails_when_ready_would_answer_503() -> None:
    await _replica_with(Readiness(True)).check_health()
    loading = Readiness(False, "default model 'fast' is loading", 1.0)
    await _replica_with(loading, ModelState.LOADING).check_health()  # a reload: not a failure
    failed = Readiness(False, "default model 'fast' failed to load: boom", 30.0)
    with pytest.raises(RuntimeError, match="not ready: default model 'fast' failed to load: boom"):
        await _replica_with(failed, ModelState.ERROR).check_health()
    with pytest.raises(RuntimeError, match="shutting down"):
        await _replica_with(Readiness(False, "the server is shutting down")).check_health()


def test_build_app_reads_args_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Settings] = []
    monkeypatch.setattr(ray_serve, "application", seen.append)
    ray_serve.build_app({"device": "cpu", "ray": {"max_replicas": 8}})
    assert seen[0].ray.max_replicas == 8
    assert seen[0].device == "cpu"


def test_serve_ray_refuses_workers() -> None:
    result = CliRunner().invoke(app, ["serve", "--ray", "--workers", "2"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "--ray replaces --workers and --inference-port" in result.output


def test_serve_ray_runs_serve_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[Settings] = []
    monkeypatch.setattr(ray_serve, "run", ran.append)
    result = CliRunner().invoke(app, ["serve", "--ray", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert ran[0].ray.enabled
    assert ran[0].server.port == 8123
