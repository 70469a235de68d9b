"""``clipserve embed --service-url`` against a real ``clipserve serve`` process (tiny model on
127.0.0.1): the embeddings equal local mode's, local files travel as data URIs, bad rows fail
alone, and a rerun resumes."""

from __future__ import annotations

import base64
import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import clipserve
from clipserve import bulk
from clipserve.cli import app as cli
from clipserve.config import Settings
from clipserve.testing.servers import clipserve_process, free_port


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_registry: dict[str, Any]) -> Path:
    path = tmp_path_factory.mktemp("bulk-service") / "models.json"
    path.write_text(json.dumps(tiny_registry))
    return path


@pytest.fixture(scope="module")
def service(registry: Path) -> Iterator[str]:
    """A `clipserve serve` process with the tiny models (default: tiny); stopped by its pid."""
    with clipserve_process(registry, env={"CLIPSERVE_DEFAULT_MODEL": "tiny"}) as (base, _):
        yield base


@pytest.fixture
def rows(tmp_path: Path, photos: dict[str, Any]) -> tuple[Path, list[tuple[str, str]]]:
    """A CSV of local files, an inline image and rows that fail on either side."""
    folder = tmp_path / "client"
    folder.mkdir()
    for name in ("chelsea", "rocket", "coffee"):
        photos[name].resize((64, 64)).save(folder / f"{name}.png")
    (folder / "junk.png").write_bytes(b"not an image")
    buffer = io.BytesIO()
    photos["astronaut"].resize((64, 64)).save(buffer, format="PNG")
    inline = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    good = [
        ("chelsea.png", "a cat"),
        (inline, "an astronaut"),
        ("rocket.png", "a rocket"),
        ("coffee.png", "a cup of coffee"),
    ]
    bad = [
        ("missing.png", "read on the client: fails there"),
        ("junk.png", "decoded by the service: fails there"),
        (f"http://127.0.0.1:{free_port()}/x.jpg", "a private URL: the service refuses it"),
    ]
    table = folder / "rows.csv"
    with table.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "path", "caption"])
        ordered = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3]]
        writer.writerows((str(i), image, caption) for i, (image, caption) in enumerate(ordered))
    resolved = [(str(folder / i) if not i.startswith("data:") else i, c) for i, c in good]
    return table, resolved


def test_service_embeddings_equal_local_ones_and_bad_rows_fail_alone(
    service: str,
    registry: Path,
    rows: tuple[Path, list[tuple[str, str]]],
    tmp_path: Path,
    assert_vectors_close: Callable[[Any, Any], None],
) -> None:
    table, good = rows
    output = tmp_path / "out"
    job = bulk.BulkJob(
        source=str(table), output=output, service_url=service, shard_size=3, batch_size=2
    )
    quiet = Console(file=io.StringIO())
    summary = bulk.run(job, Settings(config_path=registry), console=quiet)
    assert (summary.model, summary.items, summary.embedded, summary.failed) == ("tiny", 7, 4, 3)

    import pyarrow.parquet as pq

    tables = sorted((output / "metadata").glob("*.parquet"))
    keys = [k for path in tables for k in pq.read_table(path).column("key").to_pylist()]
    assert keys == ["0", "2", "4", "6"]
    images = np.concatenate([np.load(p) for p in sorted((output / "img_emb").glob("*.npy"))])
    texts = np.concatenate([np.load(p) for p in sorted((output / "text_emb").glob("*.npy"))])
    errors = [
        json.loads(line)
        for path in sorted((output / "errors").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    assert [e["key"] for e in errors] == ["1", "3", "5"]
    assert "not found" in errors[0]["error"]
    assert "could not be decoded" in errors[1]["error"]

    local = Settings(config_path=registry, media={"media_root": tmp_path})
    with clipserve.load_model("tiny", settings=local) as model:
        assert_vectors_close(images, model.embed_images([image for image, _ in good]))
        assert_vectors_close(texts, model.embed_texts([caption for _, caption in good]))


def test_the_embed_command_through_the_service_resumes(
    service: str, rows: tuple[Path, list[tuple[str, str]]], tmp_path: Path
) -> None:
    table, _ = rows
    output = tmp_path / "out"
    args = ["embed", str(table), "-o", str(output), "--service-url", service, "--no-texts"]
    first = CliRunner().invoke(cli, [*args, "--dtype", "float16"], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert "embedded 4 of 7 items" in first.output
    assert "items/s" in first.output
    assert np.load(output / "img_emb" / "img_emb_0000.npy").shape == (4, 32)
    assert not (output / "text_emb").exists()
    again = CliRunner().invoke(cli, [*args, "--dtype", "float16"], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output

    closed = f"http://127.0.0.1:{free_port()}"
    down = CliRunner().invoke(cli, [*args[:-2], closed, "-o", str(tmp_path / "o2")])
    assert down.exit_code == 1
    assert "cannot connect" in down.output
