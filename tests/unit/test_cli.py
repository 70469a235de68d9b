"""``clipserve score`` end to end in local mode, with the tiny real models (real loaders);
``clipserve models`` on the seed's config shape; the log level ``clipserve serve`` sets."""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from clipserve.cli import app

RESULT_COLUMNS = ["clip_score", "error", "model", "text_truncated"]


@pytest.fixture
def config(tmp_path: Path, tiny_registry: dict[str, dict[str, Any]]) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({**tiny_registry, "broken": {"model_name": "/no/such/model"}}))
    return path


@pytest.fixture
def pairs(tmp_path: Path, photos: dict[str, Any]) -> Path:
    """Three good rows (relative and absolute paths) and one whose file is missing."""
    folder = tmp_path / "data"
    folder.mkdir()
    photos["chelsea"].save(folder / "cat.png")
    photos["coffee"].save(folder / "coffee.jpg")
    path = folder / "pairs.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "path", "caption"])
        writer.writerow(["a", "cat.png", "a photo of a cat"])
        writer.writerow(["b", str(folder / "coffee.jpg"), "a cup of coffee"])
        writer.writerow(["c", "missing.png", "nothing"])
        writer.writerow(["d", "cat.png", "a cup of coffee"])
    return path


def score(*args: str | Path, stdin: str | None = None) -> Result:
    return CliRunner().invoke(app, ["score", *map(str, args)], input=stdin, env={"COLUMNS": "160"})


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def test_score_writes_a_csv_and_a_summary(pairs: Path, config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = score(pairs, "--config", config, "--model", "tiny", "-o", out, "--batch-size", "2")
    assert result.exit_code == 0, result.output
    rows = read_csv(out)
    assert list(rows[0]) == ["id", "path", "caption", *RESULT_COLUMNS]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    for row in (rows[0], rows[1], rows[3]):
        assert 0.0 <= float(row["clip_score"]) <= 100.0
        assert (row["error"], row["model"], row["text_truncated"]) == ("", "tiny", "False")
    assert rows[2]["clip_score"] == ""
    assert rows[2]["error"] == f"image file not found: {pairs.parent / 'missing.png'}"
    assert rows[0]["clip_score"] != rows[3]["clip_score"]  # same image, other caption

    assert "clipserve score: 4 rows" in result.stderr
    assert "tiny" in result.stderr
    assert f"wrote 4 rows to {out}" in result.stderr
    assert "1 x image file not found" in result.stderr
    assert result.stdout == ""


def test_chunks_and_batches_do_not_change_scores(pairs: Path, config: Path, tmp_path: Path) -> None:
    whole, chunked = tmp_path / "whole.csv", tmp_path / "chunked.csv"
    assert score(pairs, "-c", config, "-m", "tiny", "-o", whole).exit_code == 0
    result = score(
        pairs, "-c", config, "-m", "tiny", "-o", chunked, "--chunk-size", "1", "--batch-size", "1"
    )
    assert result.exit_code == 0, result.output
    for a, b in zip(read_csv(whole), read_csv(chunked), strict=True):
        if a["clip_score"]:
            assert float(a["clip_score"]) == pytest.approx(float(b["clip_score"]), abs=1e-4)


def test_compare_writes_side_by_side_columns_and_correlations(
    pairs: Path, config: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    result = score(pairs, "--config", config, "--compare", "tiny,tiny-hf", "--output", out)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(rows[0]) == [
        "id",
        "path",
        "caption",
        "clip_score_tiny",
        "error_tiny",
        "clip_score_tiny-hf",
        "error_tiny-hf",
    ]
    assert isinstance(rows[0]["clip_score_tiny"], float)
    assert isinstance(rows[0]["clip_score_tiny-hf"], float)
    assert rows[2]["clip_score_tiny"] is None
    assert rows[2]["error_tiny-hf"].startswith("image file not found")
    assert "tiny vs tiny-hf" in result.stderr
    assert "pearson" in result.stderr


def test_csv_on_stdout_and_jsonl_on_stdin(config: Path, tmp_path: Path, pairs: Path) -> None:
    lines = [
        json.dumps({"image": str(pairs.parent / "cat.png"), "text": "a cat", "tag": 1}),
        json.dumps({"image": str(pairs.parent / "cat.png"), "text": ""}),
    ]
    result = score("-", "-c", config, "-m", "tiny", "-o", "-", stdin="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["image", "text", "tag", *RESULT_COLUMNS]
    assert float(rows[0]["clip_score"]) >= 0
    assert rows[0]["tag"] == "1"
    assert rows[1]["error"] == "caption is empty (text)"


def test_without_output_the_first_rows_are_shown(pairs: Path, config: Path) -> None:
    result = score(pairs, "--config", config, "--model", "tiny")
    assert result.exit_code == 0, result.output
    assert "first 4 of 4 rows" in result.stdout
    assert "a photo of a cat" in result.stdout
    assert "clipserve score: 4 rows" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny", "--compare", "tiny,tiny-hf"], "cannot be used together"),
        (["--compare", "tiny"], "two or more model names"),
        (["--model", "nope"], "model config 'nope' is unknown"),
        (["--output", "out.xlsx"], "unknown file type '.xlsx'"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
    ],
)
def test_usage_errors_exit_2(pairs: Path, config: Path, args: list[str], message: str) -> None:
    result = score(pairs, "--config", config, *args)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())  # rich may wrap the usage message
    assert "Traceback" not in result.output


def test_a_missing_column_exits_2_without_a_traceback(tmp_path: Path, config: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("url,title\nhttps://x.test/a.jpg,a cat\n")
    result = score(path, "--config", config, "--model", "tiny")
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "no caption column (one of: caption, text, text_prompt)" in result.stderr
    assert "the header has: url, title" in result.stderr
    assert "Traceback" not in result.output


def test_exit_1_when_no_row_can_be_scored_or_a_model_cannot_load(
    tmp_path: Path, config: Path
) -> None:
    path = tmp_path / "in.csv"
    out = tmp_path / "out.csv"
    path.write_text("path,caption\nmissing.png,a cat\n,no image\n")
    result = score(path, "--config", config, "--model", "tiny", "-o", out)
    assert result.exit_code == 1
    assert "no row could be scored" in result.stderr
    assert len(read_csv(out)) == 2  # the errors are still written

    result = score(path, "--config", config, "--model", "broken")
    assert result.exit_code == 1
    assert "model 'broken' is unavailable" in result.stderr


def test_media_root_limits_local_files(pairs: Path, config: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out.csv"
    result = score(pairs, "-c", config, "-m", "tiny", "-o", out, "--media-root", elsewhere)
    assert result.exit_code == 1  # every row is outside the media root
    assert all("outside the media root" in r["error"] for r in read_csv(out))


# --- clipserve models ----------------------------------------------------------------------------


def test_models_reads_the_seeds_wrapped_config(
    tmp_path: Path, tiny_registry: dict[str, dict[str, Any]]
) -> None:
    path = tmp_path / "wrapped.json"
    hidden = {**tiny_registry["tiny-hf"], "enabled": False}
    path.write_text(json.dumps({"models": {**tiny_registry, "tiny-hf": hidden}}))
    result = CliRunner().invoke(app, ["models", "--config", str(path), "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert {"tiny", "tiny-siglip", "fast", "minilm"} <= set(listed)
    assert "tiny-hf" not in listed  # disabled
    assert listed["tiny"]["model_name"] == tiny_registry["tiny"]["model_name"]
    every = CliRunner().invoke(app, ["models", "-c", str(path), "--all", "--json"])
    assert json.loads(every.stdout)["tiny-hf"]["enabled"] is False
    table = CliRunner().invoke(app, ["models", "-c", str(path)], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    assert "fast (default)" in table.stdout
    assert "minilm (/embed)" in table.stdout


def test_models_reports_a_bad_wrapped_config_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"models": {"fast": {"memory_gb": -2}}}))
    result = CliRunner().invoke(app, ["models", "--config", str(path)], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert f"{path}: model 'fast': memory_gb: Input should be greater than or equal to 0" in (
        result.stderr
    )
    assert "Traceback" not in result.output


# --- clipserve serve: the log level reaches our logging and uvicorn's loggers -----------------

_LOGGERS = ("", "clipserve", "uvicorn", "uvicorn.error", "uvicorn.access")


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Run ``serve`` up to uvicorn's logging set-up (no server); yield the loggers' levels."""
    import uvicorn

    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    levels: dict[str, int] = {}

    def run(application: Any, **kwargs: Any) -> None:
        uvicorn.Config(application, **kwargs)  # configures logging exactly as uvicorn.run does
        levels.update({name: logging.getLogger(name).getEffectiveLevel() for name in _LOGGERS})

    monkeypatch.setattr(uvicorn, "run", run)
    yield levels
    for lg, (level, handlers, propagate) in zip(loggers, saved, strict=True):
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate = propagate


@pytest.mark.parametrize(
    ("env", "flags", "level"),
    [
        ({}, [], logging.INFO),
        ({"LOG_LEVEL": "DEBUG"}, [], logging.DEBUG),
        ({"LOG_LEVEL": "error"}, [], logging.ERROR),
        ({"LOG_LEVEL": "DEBUG", "CLIPSERVE_SERVER__LOG_LEVEL": "Warning"}, [], logging.WARNING),
        (
            {"LOG_LEVEL": "DEBUG", "CLIPSERVE_SERVER__LOG_LEVEL": "warning"},
            ["--log-level", "ERROR"],
            logging.ERROR,
        ),
        ({"LOG_LEVEL": "ERROR"}, ["--log-level", "debug"], logging.DEBUG),
    ],
)
def test_serve_sets_the_log_level_everywhere(
    served: dict[str, int],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    flags: list[str],
    level: int,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["serve", "--port", "0", *flags])
    assert result.exit_code == 0, result.output
    assert served == dict.fromkeys(_LOGGERS, level)


def test_serve_refuses_a_bad_log_level(
    served: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOG_LEVEL", "loud")
    result = CliRunner().invoke(app, ["serve"], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in result.stderr
    assert served == {}  # never started


def test_models_families_lists_every_family_and_the_readme_shows_the_same_table() -> None:
    from clipserve.model_families import FAMILIES

    result = CliRunner().invoke(app, ["models", "--families", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [row["name"] for row in listed] == [f.name for f in FAMILIES]
    assert listed[3]["example"] == {
        "model_name": "google/siglip2-base-patch16-naflex",
        "backend": "hf",
    }
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    for family in FAMILIES:
        row = (
            f"| {family.name} | `{family.backend}` | `{json.dumps(dict(family.example))}` "
            f"| {family.context} | {family.image_input} | {family.parity} |"
        )
        assert row in readme, row
