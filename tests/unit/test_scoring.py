"""The scoring job behind ``clipserve score``: input rows, statistics, writers, local and remote
scorers (the remote one over ``httpx.MockTransport``; tests/integration runs a real service)."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from rich.console import Console

from clipserve.config import MediaSettings, Settings
from clipserve.engine.engine import Engine
from clipserve.engine.tasks.evaluate import EvalItem
from clipserve.errors import ModelNotFoundError, ModelUnavailableError
from clipserve.scoring import (
    CsvRowWriter,
    InputTable,
    JsonlRowWriter,
    PreviewWriter,
    RemoteScorer,
    ScoringInputError,
    ScoringJob,
    choose_models,
    open_writer,
    pearson,
    run_job,
    spearman,
)
from clipserve.scoring.job import with_local_files
from clipserve.scoring.rows import resolve_image, table_format
from clipserve.scoring.stats import SummaryBuilder, describe_scores, rank
from clipserve.testing import FakeLoader


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def read_table(path: Path, **kwargs: Any) -> list[Any]:
    with InputTable(str(path), **kwargs) as table:
        return list(table.rows())


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


# --- reading rows ------------------------------------------------------------------------------


def test_csv_rows_keep_every_column_in_order(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("id,url,caption,split\n7,https://x.test/a.jpg,a cat,val\n8,b.png,a dog,\n")
    with InputTable(str(path)) as table:
        assert table.columns == ["id", "url", "caption", "split"]
        rows = list(table.rows())
    assert [r.number for r in rows] == [1, 2]
    assert rows[0].fields == {
        "id": "7",
        "url": "https://x.test/a.jpg",
        "caption": "a cat",
        "split": "val",
    }
    assert rows[0].image == "https://x.test/a.jpg"
    assert rows[0].caption == "a cat"
    assert rows[0].problem is None
    assert rows[1].image == str(tmp_path / "b.png")  # relative to the input's folder


@pytest.mark.parametrize(
    ("header", "image", "caption"),
    [
        ("path,caption", "p.png", "c"),
        ("image,text", "p.png", "c"),
        ("image_input,text_prompt", "p.png", "c"),
        (" URL , Caption ", "p.png", "c"),  # names match case- and space-insensitively
    ],
)
def test_csv_column_aliases(tmp_path: Path, header: str, image: str, caption: str) -> None:
    path = tmp_path / "in.csv"
    path.write_text(f"{header}\n{image},{caption}\n")
    (row,) = read_table(path)
    assert (row.image, row.caption, row.problem) == (str(tmp_path / image), caption, None)


def test_first_filled_image_column_wins(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("url,path,caption\n,local.png,one\nhttps://x.test/a.jpg,local.png,two\n")
    rows = read_table(path)
    assert [r.image for r in rows] == [str(tmp_path / "local.png"), "https://x.test/a.jpg"]


@pytest.mark.parametrize(
    ("content", "missing"),
    [
        ("url,title\nhttps://x.test/a.jpg,cat\n", "no caption column"),
        ("name,caption\na,cat\n", "no image column"),
        ("a,b\n1,2\n", "no image column (one of: url, path, image, image_input) and no caption"),
    ],
)
def test_a_missing_column_is_a_clear_error(tmp_path: Path, content: str, missing: str) -> None:
    path = tmp_path / "in.csv"
    path.write_text(content)
    with pytest.raises(ScoringInputError, match="the header has") as info:
        InputTable(str(path))
    assert missing in info.value.message


def test_empty_cells_give_row_problems_not_errors(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("path,caption\n,a cat\na.png,   \na.png,ok\n")
    rows = read_table(path)
    assert rows[0].problem == "image is empty (path)"
    assert rows[1].problem == "caption is empty (caption)"
    assert rows[2].problem is None


def test_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"image": "a.png", "text": "a cat", "meta": {"k": [1, 2]}, "score": 3}),
        "",
        "{not json",
        "[1, 2]",
        json.dumps({"image_input": "/abs/b.png", "text_prompt": 42}),
        json.dumps({"image": None, "text": "no image"}),
        json.dumps({"url": "https://x.test/c.jpg", "caption": ["a", "list"]}),
        json.dumps({"caption": "no image key"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with InputTable(str(path)) as table:
        assert table.columns == ["image", "text", "meta", "score"]
        assert table.count() == 7
        rows = list(table.rows())
    assert [r.number for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[0].fields["meta"] == {"k": [1, 2]}
    assert (rows[0].image, rows[0].caption) == (str(tmp_path / "a.png"), "a cat")
    assert rows[1].problem is not None
    assert rows[1].problem.startswith("line 2: invalid JSON")
    assert rows[2].problem == "line 3: not a JSON object"
    assert (rows[3].image, rows[3].caption, rows[3].problem) == ("/abs/b.png", "42", None)
    assert rows[4].problem is not None
    assert rows[4].problem.startswith("image is empty")
    assert rows[5].problem == "column 'caption' holds a list, expected text"
    assert rows[6].problem is not None
    assert rows[6].problem.startswith("image is empty")


def test_jsonl_checks_the_first_object(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"url": "a.png", "label": "x"}) + "\n")
    with pytest.raises(ScoringInputError, match="no caption column.*first object has: url, label"):
        InputTable(str(path))
    path.write_text("\n\n")
    with pytest.raises(ScoringInputError, match="no JSON objects"):
        InputTable(str(path))


def test_input_problems(tmp_path: Path) -> None:
    with pytest.raises(ScoringInputError, match=r"unknown file type '\.txt'"):
        InputTable(str(tmp_path / "in.txt"))
    with pytest.raises(ScoringInputError, match="cannot read"):
        InputTable(str(tmp_path / "missing.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ScoringInputError, match="expected a CSV header"):
        InputTable(str(tmp_path / "empty.csv"))


@pytest.mark.parametrize(
    "content",
    [
        "url,caption\nhttps://x.test/a.jpg,a cat\n",
        '\n{"url": "https://x.test/a.jpg", "caption": "a cat"}\n',
    ],
)
def test_stdin_is_sniffed(content: str) -> None:
    with InputTable("-", stdin=io.StringIO(content)) as table:
        assert table.count() is None
        (row,) = list(table.rows())
    assert (row.image, row.caption) == ("https://x.test/a.jpg", "a cat")


def test_csv_counts_rows_with_quoted_newlines_and_big_fields(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    big = data_uri(b"x" * 300_000)  # beyond the csv module's default 128 KiB field limit
    path.write_text(f'url,caption\n"{big}","two\nlines"\n\nb.png,c\n')
    with InputTable(str(path)) as table:
        assert table.count() == 2
        rows = list(table.rows())
    assert rows[0].image == big
    assert rows[0].caption == "two\nlines"


def test_resolve_image(tmp_path: Path) -> None:
    assert resolve_image("sub/a.png", tmp_path) == str(tmp_path / "sub" / "a.png")
    assert resolve_image("/abs/a.png", tmp_path) == "/abs/a.png"
    assert resolve_image("~/a.png", tmp_path) == str(Path.home() / "a.png")
    for unchanged in ("https://x.test/a.png", "data:image/png;base64,AAAA", "ftp://x/a.png"):
        assert resolve_image(unchanged, tmp_path) == unchanged


# --- statistics --------------------------------------------------------------------------------


def test_describe_scores_by_hand() -> None:
    stats = describe_scores("fast", [1.0, 2.0, None, 3.0, 4.0])
    assert (stats.count, stats.succeeded, stats.failed) == (5, 4, 1)
    assert stats.mean == pytest.approx(2.5)
    assert stats.median == pytest.approx(2.5)
    assert stats.std == pytest.approx(math.sqrt(5 / 3))  # sample std: sum of squares 5, n - 1 = 3
    assert (stats.min, stats.max) == (1.0, 4.0)
    assert describe_scores("x", [None, None]).mean is None
    assert describe_scores("x", [7.0]).std is None


def test_pearson_and_spearman_by_hand() -> None:
    # x - 2 = (-1, 0, 1), y - 13/3 = (-7, -1, 8)/3: r = 5 / sqrt(2 * 114 / 9)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert spearman([1, 2, 3], [2, 4, 7]) == pytest.approx(1.0)
    # ties share ranks: x -> (1, 2.5, 2.5, 4), y -> (1, 3, 2, 4): r = 4.5 / sqrt(4.5 * 5)
    assert list(rank([1, 2, 2, 3])) == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1], [2]) is None
    assert pearson([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="3 values against 2"):
        pearson([1, 2, 3], [1, 2])


def test_correlations_match_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.normal(size=50).round(1)  # rounding makes ties
    y = (x + rng.normal(size=50)).round(1)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


def test_summary_correlates_rows_where_both_models_succeeded() -> None:
    builder = SummaryBuilder(["a", "b"])
    for row in ([1.0, 2.0], [2.0, 4.0], [None, 100.0], [3.0, 7.0], [50.0, None]):
        builder.add_row(row)
    summary = builder.build(1.5, [("boom", 2)])
    assert summary.rows == 5
    assert [s.succeeded for s in summary.models] == [4, 4]
    (corr,) = summary.correlations
    assert (corr.first, corr.second, corr.n) == ("a", "b", 3)
    assert corr.pearson == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert corr.spearman == pytest.approx(1.0)
    assert summary.top_errors == (("boom", 2),)
    assert summary.any_scored
    assert SummaryBuilder(["a"]).build().any_scored  # no rows: nothing failed
    failed = SummaryBuilder(["a"])
    failed.add_row([None])
    assert not failed.build().any_scored


# --- writers -----------------------------------------------------------------------------------

RECORDS = [
    {"id": "1", "caption": "a cat", "clip_score": 31.25, "error": None, "text_truncated": False},
    {"id": "2", "caption": "ünïcode", "clip_score": None, "error": "boom", "text_truncated": True},
]


def test_csv_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    writer = open_writer(str(path))
    assert isinstance(writer, CsvRowWriter)
    writer.write(RECORDS[:1])
    writer.write(RECORDS[1:])
    writer.write([{**RECORDS[0], "late": {"k": 1}}])
    writer.close()
    with path.open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["id", "caption", "clip_score", "error", "text_truncated"]
    assert rows[0] == {
        "id": "1",
        "caption": "a cat",
        "clip_score": "31.25",
        "error": "",
        "text_truncated": "False",
    }
    assert rows[1]["caption"] == "ünïcode"
    assert (rows[1]["clip_score"], rows[1]["error"]) == ("", "boom")
    assert writer.dropped_columns == {"late"}


def test_csv_writer_encodes_nested_values() -> None:
    stream = io.StringIO()
    CsvRowWriter(stream, owns_stream=False).write([{"meta": {"k": [1, "é"]}, "n": 3}])
    assert stream.getvalue().splitlines() == ["meta,n", '"{""k"": [1, ""é""]}",3']


def test_jsonl_writer_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    writer = open_writer(str(path))
    assert isinstance(writer, JsonlRowWriter)
    writer.write(RECORDS)
    writer.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == RECORDS
    assert "ünïcode" in lines[1]


def test_open_writer_choices(tmp_path: Path) -> None:
    assert isinstance(open_writer(None), PreviewWriter)
    stream = io.StringIO()
    writer = open_writer("-", stdout=stream)
    writer.write(RECORDS)
    writer.close()
    assert stream.getvalue().startswith("id,caption,clip_score,error,text_truncated")
    with pytest.raises(ScoringInputError, match=r"unknown file type '\.parquet'"):
        open_writer(str(tmp_path / "out.parquet"))
    assert table_format("OUT.NDJSON") == "jsonl"


def test_preview_keeps_the_first_rows() -> None:
    preview = PreviewWriter(limit=3)
    preview.write([{"n": i} for i in range(2)])
    preview.write([{"n": i} for i in range(2, 5)])
    assert [r["n"] for r in preview.records] == [0, 1, 2]
    assert preview.total == 5


# --- flags -------------------------------------------------------------------------------------


def test_choose_models() -> None:
    assert choose_models(None, None) == ((None,), False)
    assert choose_models("fast", None) == (("fast",), False)
    assert choose_models(None, " fast, accurate ,fast") == (("fast", "accurate"), True)
    with pytest.raises(ScoringInputError, match="cannot be used together"):
        choose_models("fast", "fast,accurate")
    with pytest.raises(ScoringInputError, match="two or more"):
        choose_models(None, "fast")


def test_local_files_anywhere_unless_a_media_root_is_set(tmp_path: Path) -> None:
    opened = with_local_files(Settings(), str(tmp_path / "in.csv"))
    assert opened.media.media_root == Path(tmp_path.anchor)
    kept = Settings(media={"media_root": tmp_path})
    assert with_local_files(kept, "-").media.media_root == tmp_path


# --- local scoring with the fake backend -------------------------------------------------------


@pytest.fixture
def dataset(tmp_path: Path, photos: dict[str, Any], photo_bytes: Callable[..., bytes]) -> Path:
    """A CSV in a subfolder: relative paths, a data URI, a missing file and an empty caption."""
    folder = tmp_path / "data"
    (folder / "img").mkdir(parents=True)
    photos["chelsea"].save(folder / "img" / "cat.png")
    photos["rocket"].save(folder / "img" / "rocket.png")
    rows = [
        ("1", "img/cat.png", "a photo of a cat"),
        ("2", data_uri(photo_bytes("astronaut", "PNG")), "an astronaut"),
        ("3", "img/missing.png", "nothing here"),
        ("4", "img/rocket.png", "a rocket on the launch pad"),
        ("5", "img/cat.png", ""),
        ("6", str(folder / "img" / "rocket.png"), "a rocket"),
    ]
    path = folder / "pairs.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "path", "caption"])
        writer.writerows(rows)
    return path


async def run_local(
    job: ScoringJob, settings: Settings, loader: FakeLoader | None = None
) -> list[dict[str, Any]]:
    await run_job(job, settings, console=quiet(), out=quiet(), loader=loader or FakeLoader())
    assert job.output is not None
    return [json.loads(line) for line in Path(job.output).read_text().splitlines()]


async def test_local_scoring_one_bad_row_does_not_stop_the_others(
    dataset: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    rows = await run_local(ScoringJob(str(dataset), str(out)), make_settings())
    assert [r["id"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert list(rows[0]) == [
        "id",
        "path",
        "caption",
        "clip_score",
        "error",
        "model",
        "text_truncated",
    ]
    assert rows[0]["path"] == "img/cat.png"  # the input, as written
    for row in (rows[0], rows[1], rows[3], rows[5]):
        assert row["error"] is None
        assert 0.0 <= row["clip_score"] <= 100.0
        assert row["model"] == "fast"
    assert rows[2]["clip_score"] is None
    assert rows[2]["error"] == f"image file not found: {dataset.parent / 'img' / 'missing.png'}"
    assert rows[4]["error"] == "caption is empty (caption)"


async def test_local_scores_equal_the_engine_and_do_not_depend_on_chunking(
    dataset: Path,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    photo_bytes: Callable[..., bytes],
    assert_scores_close: Callable[[Any, Any], None],
) -> None:
    settings = make_settings()
    whole = await run_local(ScoringJob(str(dataset), str(tmp_path / "a.jsonl")), settings)
    small = ScoringJob(str(dataset), str(tmp_path / "b.jsonl"), batch_size=1, chunk_size=2)
    chunked = await run_local(small, settings)
    assert_scores_close([r["clip_score"] for r in chunked], [r["clip_score"] for r in whole])

    engine = Engine(settings, loader=FakeLoader())
    try:
        direct = await engine.evaluate(
            [EvalItem(data_uri(photo_bytes("chelsea", "PNG")), "a photo of a cat")]
        )
    finally:
        await engine.close()
    assert_scores_close(whole[0]["clip_score"], direct[0].score)


async def test_compare_mode_scores_every_row_with_each_model(
    dataset: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    out = tmp_path / "out.csv"
    job = ScoringJob(str(dataset), str(out), models=("fast", "accurate"), compare=True)
    console = quiet()
    summary = await run_job(job, make_settings(), console=console, loader=FakeLoader())
    with out.open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == [
        "id",
        "path",
        "caption",
        "clip_score_fast",
        "error_fast",
        "clip_score_accurate",
        "error_accurate",
    ]
    assert rows[2]["error_fast"] == rows[2]["error_accurate"]
    assert rows[2]["error_fast"].startswith("image file not found")
    assert all(float(rows[i][f"clip_score_{m}"]) >= 0 for i in (0, 1, 3, 5) for m in job.models)
    assert [s.model for s in summary.models] == ["fast", "accurate"]
    assert [(s.succeeded, s.failed) for s in summary.models] == [(4, 2), (4, 2)]
    (corr,) = summary.correlations
    assert (corr.first, corr.second, corr.n) == ("fast", "accurate", 4)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "fast vs accurate" in text
    assert f"wrote 6 rows to {out}" in text


async def test_progress_counts_every_pair(
    dataset: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    from clipserve.scoring import LocalScorer, score_rows

    scorer = LocalScorer(make_settings(), loader=FakeLoader())
    advanced: list[int] = []
    await scorer.start(["fast", "accurate"])
    try:
        with InputTable(str(dataset)) as table:
            summary = await score_rows(
                table.rows(),
                scorer,
                PreviewWriter(),
                models=["fast", "accurate"],
                compare=True,
                chunk_size=4,
                advance=advanced.append,
            )
    finally:
        await scorer.close()
    assert sum(advanced) == 6 * 2
    assert summary.rows == 6


async def test_models_are_checked_before_any_row(
    dataset: Path, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    with pytest.raises(ModelNotFoundError, match="'nope' is unknown"):
        await run_local(ScoringJob(str(dataset), str(out), models=("nope",)), make_settings())
    with pytest.raises(ModelUnavailableError, match="simulated load failure"):
        await run_local(ScoringJob(str(dataset), str(out), models=("broken",)), make_settings())
    assert not out.exists()


async def test_preview_prints_the_first_rows(
    dataset: Path, make_settings: Callable[..., Settings]
) -> None:
    out, err = quiet(), quiet()
    await run_job(
        ScoringJob(str(dataset)), make_settings(), console=err, out=out, loader=FakeLoader()
    )
    table = out.file.getvalue()  # type: ignore[attr-defined]
    assert "first 6 of 6 rows" in table
    assert "img/missing.png" in table
    assert "text_truncated" not in table
    summary = err.file.getvalue()  # type: ignore[attr-defined]
    assert "clipserve score: 6 rows" in summary
    assert "1 x caption is empty (caption)" in summary


# --- remote scoring over a mock transport ------------------------------------------------------


class FakeService:
    """Answers the model list and the batch endpoint like the service does."""

    def __init__(self, *, limit: int = 1000, fail_with: int | None = None) -> None:
        self.limit, self.fail_with = limit, fail_with
        self.batches: list[list[dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/system/models":
            models = [{"name": "fast"}, {"name": "accurate"}]
            return httpx.Response(200, json={"models": models, "default_model": "fast"})
        items = json.loads(request.content)["evaluations"]
        if len(items) > self.limit:
            detail = {"max_batch_items": self.limit}
            return httpx.Response(422, json={"error": "batch too big", "detail": detail})
        self.batches.append(items)
        if self.fail_with is not None:
            body = {"error": "model 'fast' is unavailable: no weights", "detail": None}
            return httpx.Response(self.fail_with, json=body)
        return httpx.Response(
            200,
            json={
                "results": [
                    {
                        "image_input": "x",
                        "text_prompt": it["text_prompt"],
                        "clip_score": float(len(it["text_prompt"])),
                        "processing_time_ms": 1.0,
                        "model_used": it["model_config_name"] or "fast",
                        "error": None,
                        "text_truncated": False,
                    }
                    for it in items
                ],
                "total_processed": len(items),
                "total_successful": len(items),
                "total_failed": 0,
                "total_processing_time_ms": 1.0,
            },
        )


def remote(service: FakeService, tmp_path: Path, **kwargs: Any) -> RemoteScorer:
    media = MediaSettings(media_root=tmp_path)
    return RemoteScorer(
        "http://svc.test/", media=media, transport=httpx.MockTransport(service), **kwargs
    )


async def test_remote_sends_files_as_data_uris_and_learns_the_batch_limit(
    tmp_path: Path, photo_bytes: Callable[..., bytes]
) -> None:
    (tmp_path / "cat.png").write_bytes(photo_bytes("chelsea", "PNG"))
    service = FakeService(limit=2)
    scorer = remote(service, tmp_path, max_items=4)
    await scorer.start([None])
    assert scorer.model_name(None) == "fast"
    items = [
        EvalItem(str(tmp_path / "cat.png"), "a"),
        EvalItem("https://x.test/a.jpg", "bb"),
        EvalItem(str(tmp_path / "missing.png"), "ccc"),
        EvalItem("ftp://x.test/a.jpg", "dddd"),
        EvalItem(str(tmp_path / "cat.png"), "eeeee", "accurate"),
    ]
    advanced: list[int] = []
    results = await scorer.score(items, batch_size=8, advance=advanced.append)
    await scorer.close()

    assert [r.score for r in results] == [1.0, 2.0, None, None, 5.0]
    assert [r.model for r in results] == ["fast", "fast", "fast", "fast", "accurate"]
    assert results[2].error is not None
    assert results[2].error.message.startswith("image file not found")
    assert results[3].error is not None
    assert "unsupported image URL scheme 'ftp'" in results[3].error.message
    assert scorer.max_items == 2
    assert [len(b) for b in service.batches] == [2, 1]
    sent = [item["image_input"] for batch in service.batches for item in batch]
    cat = data_uri(photo_bytes("chelsea", "PNG"))
    assert sent == [cat, "https://x.test/a.jpg", cat]
    assert sum(advanced) == len(items)


async def test_remote_failed_request_fails_only_its_rows(tmp_path: Path) -> None:
    service = FakeService(fail_with=503)
    scorer = remote(service, tmp_path, max_items=1)
    await scorer.start(["fast"])
    results = await scorer.score([EvalItem("https://x.test/a.jpg", "a", "fast")] * 2, batch_size=4)
    await scorer.close()
    assert len(service.batches) == 2  # the job went on after the first failure
    for result in results:
        assert result.score is None
        assert result.error is not None
        assert result.error.message == (
            "service error (HTTP 503): model 'fast' is unavailable: no weights"
        )


async def test_remote_checks_model_names_and_splits_requests_by_size(tmp_path: Path) -> None:
    service = FakeService()
    scorer = remote(service, tmp_path, max_request_chars=40)
    with pytest.raises(ModelNotFoundError, match="'nope' is unknown"):
        await scorer.start(["fast", "nope"])
    urls = ["https://x.test/" + "a" * n for n in (10, 3, 2, 30)]  # 25, 18, 17, 45 characters
    results = await scorer.score([EvalItem(u, "t") for u in urls], batch_size=4)
    await scorer.close()
    assert all(r.score == 1.0 for r in results)
    assert [[it["image_input"] for it in batch] for batch in service.batches] == [
        urls[:1],
        urls[1:3],
        urls[3:],
    ]
    with pytest.raises(ScoringInputError, match="must start with http"):
        RemoteScorer("127.0.0.1:8000", media=MediaSettings())


async def test_remote_timeouts_fail_rows_and_refused_connections_end_the_job(
    tmp_path: Path,
) -> None:
    from clipserve.scoring import ServiceUnreachableError

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    scorer = RemoteScorer(
        "http://svc.test", media=MediaSettings(), timeout_s=5, transport=httpx.MockTransport(slow)
    )
    (result,) = await scorer.score([EvalItem("https://x.test/a.jpg", "a")], batch_size=1)
    await scorer.close()
    assert result.error is not None
    assert result.error.message == "the service did not answer within 5 s"

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    scorer = RemoteScorer(
        "http://svc.test", media=MediaSettings(), transport=httpx.MockTransport(refused)
    )
    with pytest.raises(ServiceUnreachableError, match="cannot connect to the clipserve service"):
        await scorer.start([None])
    await scorer.close()


# --- --caption: what a caption model sees in each image, scored beside the prompt ---------------


@pytest.fixture
def caption_settings(
    make_settings: Callable[..., Settings],
    tiny_caption_registry: dict[str, dict[str, Any]],
    tiny_registry: dict[str, dict[str, Any]],
) -> Settings:
    models = {
        "tiny": tiny_registry["tiny"],
        "tiny-hf": tiny_registry["tiny-hf"],
        "blip": tiny_caption_registry["blip"],
    }
    return make_settings(models, default_model="tiny")


async def test_caption_columns_score_the_generated_caption(
    dataset: Path, caption_settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    job = ScoringJob(str(dataset), str(out), caption_model="blip", chunk_size=4)
    await run_job(job, caption_settings, console=quiet(), out=quiet())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(rows[0])[-3:] == ["generated_caption", "generated_error", "generated_clip_score"]
    for row in (rows[0], rows[1], rows[3], rows[5]):
        assert isinstance(row["generated_caption"], str)
        assert row["generated_caption"]
        assert row["generated_error"] is None
        assert 0.0 <= row["generated_clip_score"] <= 100.0
    assert rows[2]["generated_caption"] is None  # the missing file: no caption, its error
    assert rows[2]["generated_error"] == rows[2]["error"]
    assert rows[4]["generated_error"] is None  # an empty prompt is the row's problem...
    assert rows[4]["generated_caption"] is None  # ...and the row is skipped whole

    async with Engine(caption_settings) as engine:  # the same caption, scored the same
        (caption,) = (await engine.caption("blip", [str(dataset.parent / "img/cat.png")])).captions
        assert caption.caption == rows[0]["generated_caption"]
        (direct,) = await engine.evaluate(
            [EvalItem(str(dataset.parent / "img/cat.png"), caption.caption or "", "tiny")]
        )
    assert direct.score is not None
    assert abs(direct.score - rows[0]["generated_clip_score"]) < 1e-4


async def test_caption_columns_in_compare_mode_and_unknown_caption_models(
    dataset: Path, caption_settings: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    job = ScoringJob(
        str(dataset), str(out), models=("tiny", "tiny-hf"), compare=True, caption_model="blip"
    )
    await run_job(job, caption_settings, console=quiet(), out=quiet())
    row = json.loads(out.read_text().splitlines()[0])
    assert row["generated_clip_score_tiny"] is not None
    assert row["generated_clip_score_tiny-hf"] is not None
    with pytest.raises(ModelNotFoundError, match="'nope' is unknown"):
        await run_job(
            ScoringJob(str(dataset), str(out), caption_model="nope"),
            caption_settings,
            console=quiet(),
            out=quiet(),
        )


async def test_remote_captions_equal_local_ones(
    dataset: Path, caption_settings: Settings, tmp_path: Path
) -> None:
    from asgi_lifespan import LifespanManager

    from clipserve.api.app import create_app

    local = tmp_path / "local.jsonl"
    await run_job(
        ScoringJob(str(dataset), str(local), caption_model="blip"),
        caption_settings,
        console=quiet(),
        out=quiet(),
    )
    app = create_app(caption_settings)
    async with LifespanManager(app) as manager:
        scorer = RemoteScorer(
            "http://svc.test",
            media=MediaSettings(media_root=tmp_path),
            transport=httpx.ASGITransport(app=manager.app),
        )
        await scorer.start([None], caption_model="blip")
        images = [str(dataset.parent / "img/cat.png"), str(tmp_path / "nope.png")]
        captions = await scorer.caption(images, "blip")
        await scorer.close()
    expected = json.loads(local.read_text().splitlines()[0])["generated_caption"]
    assert captions[0] == expected
    assert isinstance(captions[1], ModelNotFoundError | Exception)
    assert "image file not found" in str(captions[1])
