"""A clipserve .mar served by a real TorchServe (Java) on loopback: the same score as the engine.
Skipped, saying why, without torchserve or Java."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from clipserve.engine.engine import Engine
from clipserve.engine.tasks.evaluate import EvalItem
from clipserve.export.torchserve import export_torchserve
from clipserve.model_specs import ModelSpec
from clipserve.testing.servers import free_port

TORCHSERVE = Path(sys.executable).parent / "torchserve"
pytestmark = pytest.mark.skipif(
    not TORCHSERVE.exists() or shutil.which("java") is None,
    reason="needs torchserve (pip install torchserve) and Java (openjdk-17-jre-headless)",
)


async def test_torchserve_serves_the_archive_with_the_engines_scores(
    tmp_path: Path,
    tiny_registry: dict[str, dict[str, Any]],
    photo_bytes: Callable[..., bytes],
    make_settings: Callable[..., Any],
    assert_scores_close: Callable[[Any, Any], None],
) -> None:
    store = tmp_path / "store"
    export_torchserve("tiny", ModelSpec(**tiny_registry["tiny"]), store)
    inference, management, metrics = free_port(), free_port(), free_port()
    config = tmp_path / "config.properties"
    config.write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{inference}",
                f"management_address=http://127.0.0.1:{management}",
                f"metrics_address=http://127.0.0.1:{metrics}",
                "default_workers_per_model=1",
                "install_py_dep_per_model=false",
                "disable_token_authorization=true",
                f"model_store={store}",
                "load_models=tiny=tiny.mar",
            ]
        )
    )
    log = tmp_path / "torchserve.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [str(TORCHSERVE), "--start", "--foreground", "--ncs", "--ts-config", str(config)],
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Java and its Python workers: stopped as one group
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                status = httpx.get(f"http://127.0.0.1:{management}/models/tiny", timeout=2)
                if status.status_code == 200 and "READY" in status.text:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready in 120 s: " + log.read_text()[-3000:]
            time.sleep(0.5)  # polling a starting server; no result depends on it
        cat = photo_bytes("chelsea")
        uri = "data:image/jpeg;base64," + base64.b64encode(cat).decode()
        answer = httpx.post(
            f"http://127.0.0.1:{inference}/predictions/tiny",
            json={"image_input": uri, "text_prompt": "a cat"},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["error"] is None
        assert body["model_used"] == "tiny"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    async with Engine(make_settings({"tiny": tiny_registry["tiny"]})) as engine:
        (expected,) = await engine.evaluate([EvalItem(cat, "a cat", "tiny")])
    assert_scores_close(body["clip_score"], expected.score)
