from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipserve.bulk import BulkInputError, Failure, FileSink, Manifest, Record, Shard
from clipserve.bulk.writer import metadata_table

MANIFEST = Manifest(
    source="/data/photos",
    source_format="folder",
    model="fast",
    shard_size=2,
    dtype="float32",
    images=True,
    texts=True,
    items=3,
)


def shard(number: int, keys: list[str], dim: int = 4) -> Shard:
    rows = [
        Record(i, key, image_path=f"/data/{key}.jpg", caption=f"caption {key}")
        for i, key in enumerate(keys)
    ]
    rng = np.random.default_rng(number)
    return Shard(
        number=number,
        rows=rows,
        image_embeddings=rng.standard_normal((len(rows), dim)).astype(np.float32),
        text_embeddings=rng.standard_normal((len(rows), dim)).astype(np.float32),
        failures=[],
    )


def test_a_shard_is_written_in_clip_retrieval_layout(tmp_path: Path) -> None:
    sink = FileSink(tmp_path / "out", MANIFEST)
    assert not sink.is_finished(0)
    written = shard(0, ["a", "b"])
    failure = Failure(5, "bad", "/data/bad.jpg", "image", "image could not be decoded")
    sink.write_shard(dataclasses.replace(written, failures=[failure]))
    assert sink.is_finished(0)
    assert not sink.is_finished(1)

    out = tmp_path / "out"
    images = np.load(out / "img_emb" / "img_emb_0000.npy")
    texts = np.load(out / "text_emb" / "text_emb_0000.npy")
    assert images.dtype == np.float32
    assert images.shape == (2, 4)
    np.testing.assert_array_equal(images, written.image_embeddings)
    np.testing.assert_array_equal(texts, written.text_embeddings)
    table = pq.read_table(out / "metadata" / "metadata_0000.parquet")
    assert table.column_names == ["key", "image_path", "url", "caption"]
    assert table.column("key").to_pylist() == ["a", "b"]
    errors = (out / "errors" / "errors_0000.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in errors] == [
        {
            "index": 5,
            "key": "bad",
            "where": "/data/bad.jpg",
            "stage": "image",
            "error": "image could not be decoded",
        }
    ]
    assert json.loads((out / "manifest.json").read_text())["shard_size"] == 2
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_float16_and_a_shard_without_failures_drops_a_stale_errors_file(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, dataclasses.replace(MANIFEST, dtype="float16", texts=False))
    stale = tmp_path / "errors" / "errors_0001.jsonl"
    stale.write_text("{}\n")
    sink.write_shard(dataclasses.replace(shard(1, ["c"]), text_embeddings=None))
    assert np.load(tmp_path / "img_emb" / "img_emb_0001.npy").dtype == np.float16
    assert not (tmp_path / "text_emb").exists()
    assert not stale.exists()


def test_a_shard_whose_vectors_do_not_match_its_rows_is_refused(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, MANIFEST)
    bad = dataclasses.replace(shard(0, ["a", "b"]), text_embeddings=np.zeros((1, 4)))
    with pytest.raises(ValueError, match="text_emb does not match"):
        sink.write_shard(bad)
    assert not sink.is_finished(0)


def test_a_shard_is_finished_only_when_every_file_exists(tmp_path: Path) -> None:
    sink = FileSink(tmp_path, MANIFEST)
    sink.write_shard(shard(0, ["a", "b"]))
    (tmp_path / "text_emb" / "text_emb_0000.npy").unlink()
    assert not sink.is_finished(0)
    (tmp_path / "img_emb" / ".img_emb_0001.npy.123.tmp").write_bytes(b"partial")
    FileSink(tmp_path, MANIFEST)  # reopening clears what an interrupted write left
    assert not list((tmp_path / "img_emb").glob(".*.tmp"))


def test_resuming_with_other_parameters_is_refused_once_shards_exist(tmp_path: Path) -> None:
    FileSink(tmp_path, MANIFEST)
    other = dataclasses.replace(MANIFEST, shard_size=3, model="accurate")
    FileSink(tmp_path, other)  # no shard yet: the new parameters win
    assert json.loads((tmp_path / "manifest.json").read_text())["shard_size"] == 3
    FileSink(tmp_path, other).write_shard(shard(0, ["a"]))
    with pytest.raises(
        BulkInputError, match="model was 'accurate', now 'fast'; shard_size was 3, now 2"
    ):
        FileSink(tmp_path, MANIFEST)
    FileSink(tmp_path, dataclasses.replace(other, items=None))  # an uncounted source is fine


def test_a_folder_of_foreign_shards_is_refused(tmp_path: Path) -> None:
    (tmp_path / "metadata").mkdir()
    (tmp_path / "metadata" / "metadata_0.parquet").write_bytes(b"")
    with pytest.raises(BulkInputError, match="not written by clipserve embed"):
        FileSink(tmp_path, MANIFEST)


def test_metadata_columns_keep_their_types_or_fall_back_to_json_text() -> None:
    rows = [
        Record(0, "a", url="https://x/a.jpg", metadata={"width": 3, "mixed": 1, "tags": ["x"]}),
        Record(1, "b", metadata={"width": 4, "mixed": "two", "extra": None}),
    ]
    table = metadata_table(rows)
    assert table.column_names == ["key", "image_path", "url", "caption", "width", "mixed"] + [
        "tags",
        "extra",
    ]
    assert table.column("width").to_pylist() == [3, 4]
    assert table.column("mixed").to_pylist() == ["1", '"two"']
    assert table.column("tags").to_pylist() == [["x"], None]
    assert str(table.schema.field("caption").type) == "string"
    assert str(table.schema.field("extra").type) == "string"
