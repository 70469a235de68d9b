"""Collections from the Python API and `clipserve search` (in-process and through a service):
the same hits as the HTTP API, on the tiny real model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import clipserve
from clipserve.cli import app
from clipserve.errors import CollectionNotFoundError, InvalidInputError


@pytest.fixture
def config(tmp_path: Path, tiny_registry: dict[str, Any]) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"tiny": tiny_registry["tiny"]}))
    return path


def test_the_python_api_and_the_cli_search_one_collection(
    make_settings: Callable[..., Any],
    tiny_registry: dict[str, Any],
    photos: dict[str, Any],
    config: Path,
    tmp_path: Path,
    serve: Callable[..., str],
) -> None:
    data = tmp_path / "collections"
    settings = make_settings(tiny_registry, collections={"data_dir": data})
    photos["chelsea"].save(tmp_path / "cat.png")
    names = ["astronaut", "coffee", "chelsea"]
    with clipserve.load_model("tiny", settings=settings) as model:
        created = model.create_collection("pics", index="flat")
        assert (created.info.size, created.info.model, created.store) == (0, "tiny", "local")
        added = model.add_to_collection(
            "pics", names, images=[photos[n] for n in names], metadata=[{"n": n} for n in names]
        )
        assert (added.added, added.errors) == (3, ())
        model.add_to_collection("pics", ["caption"], texts=["a photo of a cat"])
        hits = model.search("pics", image=photos["chelsea"], top_k=2)
        assert hits[0].id == "chelsea"
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert model.search("pics", text="a photo of a cat", top_k=1)[0].id == "caption"
        with pytest.raises(CollectionNotFoundError, match="collection 'nope' does not exist"):
            model.search("nope", text="x")
        with pytest.raises(InvalidInputError, match="give texts or images"):
            model.add_to_collection("pics", ["x"])
    # the model is closed: its collections were saved and the data directory released
    result = CliRunner().invoke(
        app,
        ["search", "pics", "--image", str(tmp_path / "cat.png"), "-k", "2", "--json"]
        + ["--data-dir", str(data), "--config", str(config)],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["id"] == "chelsea"
    assert lines[0]["metadata"] == {"n": "chelsea"}
    assert lines[0]["score"] == pytest.approx(1.0, abs=1e-4)  # PNG round trip of the photo

    url = serve(settings, clipserve.models.loader.load_backend)
    remote = CliRunner().invoke(
        app,
        ["search", "pics", "-t", "a photo of a cat", "-k", "1", "--service-url", url, "--json"],
    )
    assert remote.exit_code == 0, remote.output
    assert json.loads(remote.stdout.splitlines()[0])["id"] == "caption"
    missing = CliRunner().invoke(app, ["search", "nope", "-t", "x", "--service-url", url])
    assert missing.exit_code == 1
    assert "404: collection 'nope' does not exist" in missing.output
