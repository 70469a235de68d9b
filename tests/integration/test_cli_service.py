"""``clipserve score --service-url`` against a real service (uvicorn on 127.0.0.1, fake models):
the scores equal local mode's, local files travel as data URIs, failures stay per row."""

from __future__ import annotations

import base64
import csv
import io
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from clipserve.cli import app as cli
from clipserve.config import MediaSettings, Settings
from clipserve.engine.tasks.evaluate import EvalItem
from clipserve.scoring import RemoteScorer, ScoringJob, run_job
from clipserve.testing import FakeLoader


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens here any more


@pytest.fixture
def service_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    """The service sees only its own (empty) media root, so client paths must come inline."""
    (tmp_path / "service-root").mkdir()
    return make_settings(media={"media_root": tmp_path / "service-root", "fetch_retries": 0})


@pytest.fixture
def pairs(tmp_path: Path, photos: dict[str, Any], photo_bytes: Callable[..., bytes]) -> Path:
    folder = tmp_path / "client"
    folder.mkdir()
    photos["chelsea"].save(folder / "cat.png")
    photos["rocket"].save(folder / "rocket.jpg")
    astronaut = base64.b64encode(photo_bytes("astronaut", "PNG")).decode()
    rows = [
        ("cat.png", "a photo of a cat"),
        (f"data:image/png;base64,{astronaut}", "an astronaut"),
        ("missing.png", "read on the client: fails there"),
        ("data:text/plain;base64,aGVsbG8=", "refused by the service"),
        (f"http://127.0.0.1:{closed_port()}/photo.jpg", "fetched by the service: fails there"),
        ("rocket.jpg", "a rocket"),
        ("cat.png", ""),
    ]
    path = folder / "pairs.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["n", "path", "caption"])
        writer.writerows((str(i), image, caption) for i, (image, caption) in enumerate(rows, 1))
    return path


def score(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["score", *map(str, args)], env={"COLUMNS": "160"})


async def score_locally(job: ScoringJob, settings: Settings) -> list[dict[str, Any]]:
    quiet = Console(file=io.StringIO())
    await run_job(job, settings, console=quiet, out=quiet, loader=FakeLoader())
    assert job.output is not None
    return [json.loads(line) for line in Path(job.output).read_text().splitlines()]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_rows(remote: list[dict[str, Any]], local: list[dict[str, Any]]) -> None:
    assert len(remote) == len(local)
    for r, lo in zip(remote, local, strict=True):
        assert list(r) == list(lo)
        for key, value in lo.items():
            if key.startswith("clip_score") and value is not None:
                assert r[key] == pytest.approx(value, abs=1e-4), (r["n"], key)
            else:
                assert r[key] == value, (r["n"], key)


async def test_remote_scores_equal_local_scores(
    serve: Callable[[Settings], str],
    service_settings: Settings,
    make_settings: Callable[..., Settings],
    pairs: Path,
    tmp_path: Path,
) -> None:
    url = serve(service_settings)
    out = tmp_path / "remote.jsonl"
    result = score(pairs, "--service-url", url, "--output", out, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    remote = read_jsonl(out)

    local_settings = make_settings(media={"fetch_retries": 0})
    local = await score_locally(
        ScoringJob(str(pairs), str(tmp_path / "local.jsonl")), local_settings
    )
    assert_same_rows(remote, local)

    by_n = {row["n"]: row for row in remote}
    for n in ("1", "2", "6"):
        assert by_n[n]["error"] is None
        assert 0.0 <= by_n[n]["clip_score"] <= 100.0
        assert by_n[n]["model"] == "fast"
    assert by_n["1"]["clip_score"] != by_n["6"]["clip_score"]
    assert by_n["3"]["error"] == f"image file not found: {pairs.parent / 'missing.png'}"
    assert "text/plain" in by_n["4"]["error"]  # the service's own message
    assert by_n["5"]["error"] is not None  # a URL goes to the service, which cannot fetch it
    assert by_n["7"]["error"] == "caption is empty (caption)"
    assert "clipserve score: 7 rows" in result.stderr


async def test_remote_compare_mode(
    serve: Callable[[Settings], str],
    service_settings: Settings,
    make_settings: Callable[..., Settings],
    pairs: Path,
    tmp_path: Path,
) -> None:
    url = serve(service_settings)
    out = tmp_path / "remote.jsonl"
    result = score(pairs, "--service-url", url, "--compare", "fast,accurate", "-o", out)
    assert result.exit_code == 0, result.output
    job = ScoringJob(
        str(pairs), str(tmp_path / "local.jsonl"), models=("fast", "accurate"), compare=True
    )
    local = await score_locally(job, make_settings(media={"fetch_retries": 0}))
    remote = read_jsonl(out)
    assert_same_rows(remote, local)
    assert "clip_score_accurate" in remote[0]
    assert "fast vs accurate" in result.stderr


async def test_remote_scorer_follows_a_lower_service_limit(
    serve: Callable[[Settings], str],
    make_settings: Callable[..., Settings],
    pairs: Path,
) -> None:
    url = serve(make_settings(server={"max_batch_items": 2}))
    scorer = RemoteScorer(url, media=MediaSettings(media_root=pairs.parent))
    await scorer.start(["fast", None])
    assert scorer.model_name(None) == "fast"
    items = [EvalItem(str(pairs.parent / "cat.png"), f"caption {i}") for i in range(5)]
    try:
        results = await scorer.score(items, batch_size=4)
    finally:
        await scorer.close()
    assert scorer.max_items == 2
    assert all(r.error is None and r.score is not None for r in results)


def test_unknown_remote_model_exits_2(
    serve: Callable[[Settings], str], service_settings: Settings, pairs: Path
) -> None:
    result = score(pairs, "--service-url", serve(service_settings), "--model", "nope")
    assert result.exit_code == 2
    assert "model config 'nope' is unknown" in result.stderr


def test_connection_refused_exits_1_with_a_clear_message(pairs: Path, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = score(pairs, "--service-url", url, "--output", tmp_path / "out.csv")
    assert result.exit_code == 1
    assert f"cannot connect to the clipserve service at {url}" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.csv").exists()
