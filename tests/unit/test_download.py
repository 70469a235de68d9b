"""`clipserve download` against a stand-in hub on loopback (never the network): repositories and
open_clip checkpoints land in the folder, models.json points at them, and the downloaded models
load offline and score as the originals do."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from clipserve.cli import app
from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.engine.tasks.evaluate import EvalItem
from clipserve.testing.fake_hub import FakeHub


@pytest.fixture
def hub(
    tmp_path: Path,
    tiny_dirs: dict[str, Path],
    tiny_blip_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[FakeHub]:
    import huggingface_hub.constants

    root = tmp_path / "hub"
    shutil.copytree(tiny_dirs["hf_clip"], root / "org" / "tiny-clip")
    shutil.copytree(tiny_dirs["open_clip"], root / "org" / "tiny-open-clip")
    shutil.copytree(tiny_blip_dirs["caption"], root / "org" / "tiny-blip")
    laion = root / "laion" / "CLIP-ViT-B-32-laion2B-s34B-b79K"
    laion.mkdir(parents=True)
    (laion / "open_clip_pytorch_model.bin").write_bytes(b"checkpoint bytes")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # only for the hub
    with FakeHub(root) as running:
        yield running


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    models = {
        "clip": {"model_name": "org/tiny-clip", "backend": "hf"},
        "oc": {"model_name": "hf-hub:org/tiny-open-clip"},
        "laion": {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        "cap": {"model_name": "org/tiny-blip", "backend": "hf", "task": "caption"},
        "remote": {"backend": "openai-vision", "model_name": "m", "base_url": "https://x.test/v1"},
        "missing": {"model_name": "org/not-there", "backend": "hf"},
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": models}))
    return path


def _download(registry: Path, hub: FakeHub, to: Path, *names: str) -> Any:
    args = ["download", *names, "--to", str(to), "-c", str(registry), "--endpoint", hub.url]
    return CliRunner().invoke(app, args)


async def test_downloads_load_offline_and_score_as_the_originals(
    registry: Path,
    hub: FakeHub,
    tmp_path: Path,
    tiny_dirs: dict[str, Path],
    photo_bytes: Callable[..., bytes],
    assert_scores_close: Callable[[Any, Any], None],
) -> None:
    to = tmp_path / "offline"
    result = _download(registry, hub, to, "clip", "oc", "laion", "cap", "remote")
    assert result.exit_code == 0, result.output
    assert "remote: skipped (a remote model: nothing to download)" in result.output
    written = json.loads((to / "models.json").read_text())["models"]
    assert written["clip"]["model_name"] == str(to / "clip")
    assert written["oc"]["model_name"] == f"local-dir:{to / 'oc'}"
    assert written["laion"]["pretrained"] == str(to / "laion" / "open_clip_pytorch_model.bin")
    assert (to / "laion" / "open_clip_pytorch_model.bin").read_bytes() == b"checkpoint bytes"
    assert written["cap"]["model_name"] == str(to / "cap")
    assert written["cap"]["task"] == "caption"
    assert written["remote"]["base_url"] == "https://x.test/v1"
    assert any(p.endswith("/resolve/" + "0" * 40 + "/config.json") for p in hub.requests)

    image = photo_bytes("chelsea")
    pairs = [EvalItem(image, "a cat", "clip"), EvalItem(image, "a cat", "oc")]
    del written["laion"]  # its checkpoint is a stand-in: not loadable
    (to / "models.json").write_text(json.dumps({"models": written}))
    async with Engine(Settings(config_path=to / "models.json")) as engine:
        downloaded = await engine.evaluate(pairs)
        caption = await engine.caption("cap", [image])
    originals = {
        "clip": {"model_name": str(tiny_dirs["hf_clip"]), "backend": "hf"},
        "oc": {"model_name": f"local-dir:{tiny_dirs['open_clip']}"},
    }
    original_config = tmp_path / "original.json"
    original_config.write_text(json.dumps(originals))
    async with Engine(Settings(config_path=original_config)) as engine:
        expected = await engine.evaluate(pairs)
    assert all(r.error is None for r in downloaded)
    assert_scores_close([r.score for r in downloaded], [r.score for r in expected])
    assert caption.captions[0].caption


def test_failures_say_which_model_and_why(registry: Path, hub: FakeHub, tmp_path: Path) -> None:
    missing = _download(registry, hub, tmp_path / "a", "missing")
    assert missing.exit_code == 1
    assert "model 'missing': could not download 'org/not-there'" in missing.output
    unknown = _download(registry, hub, tmp_path / "b", "nope")
    assert unknown.exit_code == 2
    assert "unknown model 'nope'" in unknown.output
