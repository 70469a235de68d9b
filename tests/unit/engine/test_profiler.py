"""The profiler: POST /v1/system/profile (admin only when keys are on), its Chrome trace, and
`clipserve profile` on the tiny real model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from clipserve.cli import app
from clipserve.testing import FakeLoader


def digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def test_profile_reports_operators_and_serves_its_trace(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    settings = make_settings(server={"profile_dir": tmp_path / "profiles"})
    client = await client_for(settings, FakeLoader())
    response = await client.post(
        "/v1/system/profile",
        json={"model": "fast", "modality": "text", "batch_size": 4, "passes": 3},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["modality"], body["batch_size"], body["passes"]) == (
        "fast",
        "text",
        4,
        3,
    )
    assert body["operators"]
    assert body["operators"][0]["self_cpu_ms"] >= body["operators"][-1]["self_cpu_ms"]
    assert body["peak_memory_mb"] is None  # CPU: no device memory to report
    trace = await client.get(body["trace_url"])
    assert trace.status_code == 200
    assert "traceEvents" in trace.json()
    assert len(list((tmp_path / "profiles").glob("fast-text-*.json"))) == 1
    for bad in ("../secret.json", "nope.json"):
        assert (await client.get(f"/v1/system/profiles/{bad}")).status_code == 404
    too_many = await client.post("/v1/system/profile", json={"passes": 1000})
    assert too_many.status_code == 422
    text_only = await client.post("/v1/system/profile", json={"model": "minilm"})
    assert text_only.status_code == 400
    assert "cannot encode image inputs" in text_only.json()["error"]


async def test_with_keys_on_only_an_admin_key_may_profile(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    settings = make_settings(
        auth={"api_keys": [digest("user")], "admin_keys": [digest("boss")]},
        server={"profile_dir": tmp_path},
    )
    client = await client_for(settings, FakeLoader())
    body = {"modality": "text", "passes": 1}
    user = await client.post("/v1/system/profile", json=body, headers={"X-API-Key": "user"})
    assert user.status_code == 403
    assert user.json()["error"] == "this endpoint needs an admin key (auth.admin_keys)"
    none = await client.post("/v1/system/profile", json=body)
    assert none.status_code == 401
    boss = await client.post("/v1/system/profile", json=body, headers={"X-API-Key": "boss"})
    assert boss.status_code == 200, boss.text
    trace = await client.get(boss.json()["trace_url"], headers={"X-API-Key": "user"})
    assert trace.status_code == 403
    served = await client.post(
        "/v1/embeddings", json={"model": "fast", "input": "x"}, headers={"X-API-Key": "boss"}
    )
    assert served.status_code == 200  # an admin key is an API key too


def test_the_cli_profiles_the_tiny_model(tmp_path: Path, tiny_registry: dict[str, Any]) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"models": {"tiny": tiny_registry["tiny"]}}))
    result = CliRunner().invoke(
        app,
        [
            "profile",
            "-m",
            "tiny",
            "--batch-size",
            "2",
            "--passes",
            "2",
            "--output",
            str(tmp_path / "t"),
        ]
        + ["--config", str(config)],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.exit_code == 0, result.output
    assert "tiny image: 2 passes of batch 2" in result.stdout
    assert "aten::" in result.stdout
    assert len(list((tmp_path / "t").glob("tiny-image-*.json"))) == 1
