"""`clipserve export torchserve`: a .mar built with torch-model-archiver, its bundled weights,
and its handler run in-process as TorchServe runs it: the same scores as the engine."""

from __future__ import annotations

import base64
import importlib.util
import json
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from typer.testing import CliRunner

from clipserve.cli import app
from clipserve.engine.engine import Engine
from clipserve.engine.tasks.evaluate import EvalItem

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("model_archiver") is None,
    reason="torch-model-archiver is not installed (pip install torch-model-archiver)",
)


@dataclass
class _Context:
    """What TorchServe hands a handler (the part ours reads)."""

    model_dir: str
    system_properties: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.system_properties = {"model_dir": self.model_dir, "gpu_id": None}


@pytest.fixture
def registry(tmp_path: Path, tiny_registry: dict[str, dict[str, Any]]) -> Path:
    path = tmp_path / "models.json"
    models = {
        "tiny": tiny_registry["tiny"],
        "cap": {"model_name": "x/y", "backend": "hf", "task": "caption"},
    }
    path.write_text(json.dumps({"models": models}))
    return path


@pytest.fixture
def served(registry: Path, tmp_path: Path) -> Iterator[tuple[ModuleType, Path]]:
    """The archive built by the CLI, extracted as TorchServe does, its handler imported."""
    store = tmp_path / "store"
    result = CliRunner().invoke(
        app, ["export", "torchserve", "tiny", "--to", str(store), "-c", str(registry)]
    )
    assert result.exit_code == 0, result.output
    archive = store / "tiny.mar"
    model_dir = tmp_path / "extracted"
    with zipfile.ZipFile(archive) as mar:
        names = mar.namelist()
        assert "handler.py" in names
        assert "clipserve_model.json" in names
        assert any(n.startswith("weights/model_name/") for n in names)
        mar.extractall(model_dir)
    spec = importlib.util.spec_from_file_location("clipserve_mar_handler", model_dir / "handler.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield module, model_dir
    finally:
        module._service.close()


async def test_the_handler_scores_as_the_engine(
    served: tuple[ModuleType, Path],
    registry: Path,
    photo_bytes: Callable[..., bytes],
    make_settings: Callable[..., Any],
    tiny_registry: dict[str, dict[str, Any]],
    assert_scores_close: Callable[[Any, Any], None],
) -> None:
    module, model_dir = served
    manifest = json.loads((model_dir / "clipserve_model.json").read_text())
    assert manifest["spec"]["model_name"] == "local-dir:weights/model_name"  # bundled
    cat = photo_bytes("chelsea")
    uri = "data:image/jpeg;base64," + base64.b64encode(cat).decode()
    requests = [
        {"body": json.dumps({"image_input": uri, "text_prompt": "a cat"}).encode()},
        {"body": {"image_input": uri, "text_prompt": "a dog"}},
        {"body": cat, "text_prompt": b"a cat"},  # raw image bytes, the prompt in a field
        {"body": json.dumps({"image_input": "data:image/png;base64,AAAA", "text_prompt": "x"})},
        {"body": 42},
    ]
    answers = module.handle(requests, _Context(str(model_dir)))
    assert len(answers) == 5
    assert [a["model_used"] for a in answers[:4]] == ["tiny"] * 4
    assert answers[3]["clip_score"] is None
    assert answers[3]["error"].startswith("image could not be decoded")
    assert answers[4]["error"] == "expected a JSON body {image_input, text_prompt} or image bytes"
    async with Engine(make_settings({"tiny": tiny_registry["tiny"]})) as engine:
        expected = await engine.evaluate(
            [
                EvalItem(cat, "a cat", "tiny"),
                EvalItem(cat, "a dog", "tiny"),
                EvalItem(cat, "a cat", "tiny"),
            ]
        )
    assert_scores_close([a["clip_score"] for a in answers[:3]], [r.score for r in expected])
    assert module.handle(None, _Context(str(model_dir))) is None  # TorchServe's warm-up ping


def test_caption_and_unknown_models_are_refused(registry: Path, tmp_path: Path) -> None:
    caption = CliRunner().invoke(
        app, ["export", "torchserve", "cap", "--to", str(tmp_path), "-c", str(registry)]
    )
    assert caption.exit_code == 1
    assert "model 'cap' is a caption model: only embedding models export" in caption.output
    unknown = CliRunner().invoke(
        app, ["export", "torchserve", "nope", "--to", str(tmp_path), "-c", str(registry)]
    )
    assert unknown.exit_code == 2
    assert "unknown model 'nope'" in unknown.output
