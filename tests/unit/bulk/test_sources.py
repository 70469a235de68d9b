from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clipserve.bulk import BulkInputError, FolderSource, TableSource, TarSource, open_source
from clipserve.bulk.records import flatten
from clipserve.bulk.webdataset import expand_braces

LIMIT = 20 * 1024 * 1024


def test_a_folder_is_read_in_sorted_order_with_sidecar_captions_and_metadata(
    photo_dir: Path,
) -> None:
    (photo_dir / "sub").mkdir()
    (photo_dir / "rocket.jpg").rename(photo_dir / "sub" / "rocket.jpg")
    (photo_dir / "rocket.txt").unlink()
    (photo_dir / "coffee.json").write_text(json.dumps({"shop": {"city": "Oslo"}}))
    (photo_dir / ".hidden.jpg").write_bytes(b"skipped")
    (photo_dir / "notes.md").write_text("not an image")

    source = open_source(str(photo_dir), max_member_bytes=LIMIT)
    assert isinstance(source, FolderSource)
    assert source.has_images
    assert source.has_captions
    records = list(source.records())
    assert source.count() == 4
    assert [r.key for r in records] == [
        "astronaut.jpg",
        "chelsea.jpg",
        "coffee.jpg",
        "sub/rocket.jpg",
    ]
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert [r.caption for r in records] == ["an astronaut", "a cat", "a cup of coffee", None]
    assert records[2].metadata == {"shop.city": "Oslo"}
    assert records[3].image == records[3].image_path == str(photo_dir / "sub" / "rocket.jpg")
    assert [r.key for r in source.records(skip=lambda i: i % 2 == 0)] == [
        "chelsea.jpg",
        "sub/rocket.jpg",
    ]


def test_a_csv_maps_its_columns_and_resolves_relative_paths(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "path", "caption", "license"])
        writer.writerow(["a", "images/cat.jpg", "a cat", "cc-by"])
        writer.writerow(["b", "https://example.com/dog.jpg", "a dog", ""])
        writer.writerow(["", "data:image/png;base64,AAAA", "", "mit"])
    source = open_source(str(path), max_member_bytes=LIMIT)
    assert isinstance(source, TableSource)
    assert source.has_images
    assert source.has_captions
    assert source.count() == 3
    first, second, third = source.records()
    assert (first.key, first.image_path, first.url) == ("a", str(tmp_path / "images/cat.jpg"), None)
    assert first.image == first.image_path
    assert first.metadata == {"license": "cc-by"}
    assert (second.url, second.image_path, second.caption) == (
        "https://example.com/dog.jpg",
        None,
        "a dog",
    )
    assert third.key == "2"  # no id: the row number
    assert (third.url, third.image_path, third.caption) == (None, None, None)
    assert third.image == "data:image/png;base64,AAAA"


def test_jsonl_rows_flatten_metadata_and_keep_bad_lines_as_problems(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [
        json.dumps({"url": "https://example.com/a.jpg", "text": "a", "meta": {"w": 3}}),
        "",
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"image": 5}),
        json.dumps({"image": "b.png", "key": "k"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    source = open_source(str(path), max_member_bytes=LIMIT)
    assert source.count() == 5  # blank lines are not rows
    rows = list(source.records())
    assert [r.index for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0].metadata == {"meta.w": 3}
    assert rows[0].caption == "a"
    assert rows[1].problem is not None
    assert "invalid JSON" in rows[1].problem
    assert rows[2].problem == "line 4: not a JSON object"
    assert rows[3].problem == "column 'image' holds a int, expected text"
    assert (rows[4].key, rows[4].image_path) == ("k", str(tmp_path / "b.png"))


def test_a_table_without_image_or_caption_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("name,size\nx,1\n")
    with pytest.raises(BulkInputError, match="no image column"):
        open_source(str(path), max_member_bytes=LIMIT)


def test_webdataset_members_are_grouped_into_samples(
    tmp_path: Path, make_tar: Callable[..., Path]
) -> None:
    path = make_tar(tmp_path / "shard.tar", ("chelsea", "rocket"))
    with tarfile.open(path, "a") as tar:
        for name, data in (("only_text.txt", b"no image here"), ("dir/x.y.png", b"png?")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = open_source(str(path), max_member_bytes=LIMIT)
    assert isinstance(source, TarSource)
    assert source.has_captions
    assert source.count() == 4
    cat, rocket, text_only, dotted = source.records()
    assert (cat.key, cat.caption, cat.url) == (
        "sample_chelsea",
        "a cat",
        "https://example.com/chelsea.jpg",
    )
    assert cat.metadata == {"width": 64, "src.n": 1}
    assert isinstance(cat.image, bytes)
    assert cat.image.startswith(b"\xff\xd8")
    assert cat.image_path == f"{path}/sample_chelsea.jpg"
    assert rocket.index == 1
    assert (text_only.image, text_only.caption) == (None, "no image here")
    assert (dotted.key, dotted.image) == ("dir/x", b"png?")  # the key ends at the first dot


def test_skipped_samples_are_not_read(
    tmp_path: Path, make_tar: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_tar(tmp_path / "shard.tar")
    read: list[str] = []
    real = tarfile.TarFile.extractfile

    def spy(self: tarfile.TarFile, member: Any) -> Any:
        read.append(member.name)
        return real(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", spy)
    source = open_source(str(path), max_member_bytes=LIMIT)
    records = list(source.records(skip=lambda i: i < 3))
    assert [r.key for r in records] == ["sample_rocket"]
    assert {name.split(".")[0] for name in read} == {"sample_rocket"}


def test_oversized_members_fail_their_sample_unread(
    tmp_path: Path, make_tar: Callable[..., Path]
) -> None:
    path = make_tar(tmp_path / "shard.tar", ("chelsea",))
    (record,) = open_source(str(path), max_member_bytes=100).records()
    assert record.image is None
    assert record.problem is not None
    assert "is too large" in record.problem


def test_shard_folders_globs_and_brace_ranges(
    tmp_path: Path, make_tar: Callable[..., Path]
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, names in enumerate([("chelsea",), ("rocket", "coffee"), ("astronaut",)]):
        make_tar(shards / f"{i:05d}.tar", names)
    expected = ["sample_chelsea", "sample_rocket", "sample_coffee", "sample_astronaut"]
    for spec in (str(shards), f"{shards}/*.tar", f"{shards}/{{00000..00002}}.tar"):
        source = open_source(spec, max_member_bytes=LIMIT)
        assert [r.key for r in source.records()] == expected, spec
        assert [r.index for r in source.records()] == [0, 1, 2, 3]
    ranged = open_source(f"{shards}/{{00001..00002}}.tar", max_member_bytes=LIMIT)
    assert [r.key for r in ranged.records()] == expected[1:]


def test_expand_braces_and_flatten() -> None:
    assert expand_braces("a{08..10}.tar") == ["a08.tar", "a09.tar", "a10.tar"]
    assert expand_braces("{x,y}/{1..2}") == ["x/1", "x/2", "y/1", "y/2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert flatten({"a": {"b": {"c": 1}}, "d": [1], "e": {}}) == {"a.b.c": 1, "d": [1], "e": {}}


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing", "no such file or folder"), ("notes.txt", "cannot read"), ("*.nope", "no files")],
)
def test_unusable_sources_are_refused(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BulkInputError, match=message):
        open_source(str(tmp_path / name), max_member_bytes=LIMIT)
