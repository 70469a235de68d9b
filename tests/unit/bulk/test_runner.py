"""``clipserve embed`` end to end in this process: layout, alignment, equality with
``LocalModel``, failures per row, and resuming."""

from __future__ import annotations

import base64
import csv
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

import clipserve
from clipserve import bulk
from clipserve.bulk import BulkInputError, BulkJob, BulkSummary, Embedder, LocalEmbedder
from clipserve.cli import app as cli
from clipserve.config import Settings
from clipserve.media import ImageInput
from clipserve.models.loader import load_backend
from clipserve.testing import FakeLoader

CAPTIONS = {
    "astronaut": "an astronaut",
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket",
}


class Spy:
    """Wraps an embedder: records what it embeds, fails on chosen images."""

    def __init__(self, inner: Embedder, fail_on: frozenset[str] = frozenset()) -> None:
        self.inner, self.fail_on = inner, fail_on
        self.model, self.chunk_size = inner.model, inner.chunk_size
        self.images: list[ImageInput] = []

    def prepare_image(self, image: ImageInput) -> ImageInput:
        return self.inner.prepare_image(image)

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        if any(isinstance(i, str) and i in self.fail_on for i in images):
            raise RuntimeError("injected failure")
        self.images.extend(images)
        return self.inner.embed_images(images)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.embed_texts(texts)

    def embed_dim(self) -> int:
        return self.inner.embed_dim()

    def close(self) -> None:
        self.inner.close()


def run(
    settings: Settings, *, embedder: Callable[[], Embedder] | None = None, **job: Any
) -> tuple[BulkSummary, str]:
    out = io.StringIO()
    console = Console(file=out, width=200)
    loader = FakeLoader(fallback=load_backend)  # fake models, and the tiny real ones
    summary = bulk.run(BulkJob(**job), settings, console=console, loader=loader, embedder=embedder)
    return summary, out.getvalue()


def test_a_folder_matches_local_model_embeddings_row_for_row(
    make_settings: Callable[..., Settings],
    tiny_registry: dict[str, Any],
    photo_dir: Path,
    read_output: Callable[[Path], dict[str, Any]],
    assert_vectors_close: Callable[[Any, Any], None],
) -> None:
    settings = make_settings(tiny_registry)
    output = photo_dir.parent / "out"
    summary, printed = run(
        settings, source=str(photo_dir), output=output, model="tiny", shard_size=3
    )
    assert (summary.items, summary.embedded, summary.failed) == (4, 4, 0)
    assert summary.shards_written == 2
    assert "embedded 4 of 4 items" in printed
    assert "items/s" in printed

    got = read_output(output)
    assert got["shards"] == 2
    assert [a.shape for a in got["img_emb"]] == [(3, 32), (1, 32)]
    assert all(a.dtype == np.float32 for a in got["img_emb"] + got["text_emb"])
    names = sorted(CAPTIONS)
    assert [r["key"] for r in got["rows"]] == [f"{n}.jpg" for n in names]
    assert [r["caption"] for r in got["rows"]] == [CAPTIONS[n] for n in names]
    paths = [r["image_path"] for r in got["rows"]]
    assert paths == [str(photo_dir / f"{n}.jpg") for n in names]
    with clipserve.load_model("tiny", settings=settings) as model:
        expected_images = model.embed_images(paths)
        expected_texts = model.embed_texts([CAPTIONS[n] for n in names])
    assert_vectors_close(np.concatenate(got["img_emb"]), expected_images)
    assert_vectors_close(np.concatenate(got["text_emb"]), expected_texts)


def test_a_webdataset_shard_matches_local_model_embeddings(
    make_settings: Callable[..., Settings],
    tiny_registry: dict[str, Any],
    tmp_path: Path,
    make_tar: Callable[..., Path],
    read_output: Callable[[Path], dict[str, Any]],
    assert_vectors_close: Callable[[Any, Any], None],
) -> None:
    settings = make_settings(tiny_registry)
    shard = make_tar(tmp_path / "00000.tar")
    summary, _ = run(settings, source=str(shard), output=tmp_path / "out", model="tiny")
    assert (summary.embedded, summary.shards_written) == (4, 1)
    got = read_output(tmp_path / "out")
    rows = got["rows"]
    assert [r["key"] for r in rows] == [f"sample_{n}" for n in CAPTIONS]
    assert rows[0]["url"] == "https://example.com/astronaut.jpg"
    assert (rows[0]["width"], rows[0]["src.n"]) == (64, 1)
    with tarfile.open(shard) as tar:
        payloads = [tar.extractfile(f"sample_{n}.jpg").read() for n in CAPTIONS]  # type: ignore[union-attr]
    with clipserve.load_model("tiny", settings=settings) as model:
        assert_vectors_close(got["img_emb"][0], model.embed_images(payloads))
        assert_vectors_close(got["text_emb"][0], model.embed_texts(list(CAPTIONS.values())))


def test_bad_rows_become_error_records_and_the_run_goes_on(
    make_settings: Callable[..., Settings],
    photo_dir: Path,
    read_output: Callable[[Path], dict[str, Any]],
    photo_bytes: Callable[..., bytes],
) -> None:
    (photo_dir / "junk.jpg").write_bytes(b"not an image")
    astronaut = base64.b64encode(photo_bytes("astronaut", "PNG")).decode()
    table = photo_dir / "rows.csv"
    rows = [
        ("1", "chelsea.jpg", "a cat", "cc0"),
        ("2", "missing.jpg", "nobody", "cc0"),
        ("3", "junk.jpg", "junk", "cc0"),
        ("4", "data:text/plain;base64,aGVsbG8=", "text", "mit"),
        ("5", "rocket.jpg", "", "mit"),
        ("6", f"data:image/png;base64,{astronaut}", "an astronaut", "mit"),
    ]
    with table.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["id", "path", "caption", "license"])
        writer.writerows(rows)
    output = photo_dir.parent / "out"
    summary, printed = run(
        make_settings(), source=str(table), output=output, shard_size=4, dtype="float16"
    )
    assert (summary.items, summary.embedded, summary.failed) == (6, 2, 4)
    assert "4 items failed" in printed

    got = read_output(output)
    assert [r["key"] for r in got["rows"]] == ["1", "6"]
    assert [r["license"] for r in got["rows"]] == ["cc0", "mit"]
    assert [a.shape for a in got["img_emb"]] == [(1, 16), (1, 16)]
    assert got["img_emb"][0].dtype == np.float16
    errors = {e["key"]: e for e in got["errors"]}
    assert sorted(errors) == ["2", "3", "4", "5"]
    assert "not found" in errors["2"]["error"]
    assert errors["2"]["where"] == str(photo_dir / "missing.jpg")
    assert "could not be decoded" in errors["3"]["error"]
    assert errors["3"]["stage"] == "image"
    assert errors["5"]["stage"] == "input"
    assert "no caption" in errors["5"]["error"]


def test_jsonl_images_only_and_a_captions_only_table(
    make_settings: Callable[..., Settings],
    photo_dir: Path,
    read_output: Callable[[Path], dict[str, Any]],
) -> None:
    lines = [
        {"image": f"{n}.jpg", "text": c, "meta": {"n": i}}
        for i, (n, c) in enumerate(CAPTIONS.items())
    ]
    table = photo_dir / "rows.jsonl"
    table.write_text("".join(json.dumps(line) + "\n" for line in lines))
    output = photo_dir.parent / "images-only"
    summary, _ = run(make_settings(), source=str(table), output=output, texts=False)
    assert summary.embedded == 4
    got = read_output(output)
    assert "text_emb" not in got
    assert not (output / "text_emb").exists()
    assert [r["caption"] for r in got["rows"]] == list(CAPTIONS.values())  # kept as metadata
    assert [r["meta.n"] for r in got["rows"]] == [0, 1, 2, 3]

    captions = photo_dir / "captions.csv"
    captions.write_text("caption\na cat\na dog\n")
    summary, _ = run(make_settings(), source=str(captions), output=photo_dir.parent / "texts")
    got = read_output(photo_dir.parent / "texts")
    assert summary.embedded == 2
    assert "img_emb" not in got
    assert [a.shape for a in got["text_emb"]] == [(2, 16)]


def test_unusable_flags_are_refused(
    make_settings: Callable[..., Settings], photo_dir: Path
) -> None:
    for caption in photo_dir.glob("*.txt"):
        caption.unlink()
    output = photo_dir.parent / "out"
    with pytest.raises(BulkInputError, match="no captions to embed"):
        run(make_settings(), source=str(photo_dir), output=output, texts=True)
    with pytest.raises(BulkInputError, match="nothing to embed"):
        run(make_settings(), source=str(photo_dir), output=output, images=False)


def many_photos(folder: Path, photos: dict[str, Any], count: int) -> list[str]:
    folder.mkdir()
    paths = []
    names = sorted(CAPTIONS)
    for i in range(count):
        path = folder / f"{i:02d}.png"
        photos[names[i % 4]].resize((48, 48)).rotate(i * 7).save(path)
        paths.append(str(path))
    return paths


def test_an_interrupted_run_resumes_with_the_unfinished_shards_only(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    photos: dict[str, Any],
    read_output: Callable[[Path], dict[str, Any]],
) -> None:
    settings = make_settings()
    paths = many_photos(tmp_path / "photos", photos, 6)
    output = tmp_path / "out"
    job: dict[str, Any] = {"source": str(tmp_path / "photos"), "output": output, "shard_size": 2}

    def spy(fail_on: frozenset[str] = frozenset()) -> Spy:
        return Spy(LocalEmbedder(settings, "fast", batch_size=2, loader=FakeLoader()), fail_on)

    with pytest.raises(RuntimeError, match="injected failure"):
        run(settings, embedder=lambda: spy(frozenset(paths[2:3])), **job)
    assert (output / "metadata" / "metadata_0000.parquet").exists()
    assert not (output / "metadata" / "metadata_0001.parquet").exists()
    first = {p: p.stat().st_mtime_ns for p in output.rglob("*_0000.*")}
    assert len(first) == 2  # img_emb and metadata of shard 0

    spies: list[Spy] = []

    def make() -> Spy:
        spies.append(spy())
        return spies[-1]

    summary, printed = run(settings, embedder=make, **job)
    assert (summary.items, summary.shards_written, summary.shards_skipped) == (4, 2, 1)
    assert "1 finished earlier" in printed
    assert [spy.images for spy in spies] == [paths[2:]]  # shard 0's rows were not embedded again
    assert {p: p.stat().st_mtime_ns for p in first} == first
    got = read_output(output)
    assert [r["image_path"] for r in got["rows"]] == paths
    with clipserve.load_model("fast", settings=settings, loader=FakeLoader()) as model:
        np.testing.assert_allclose(
            np.concatenate(got["img_emb"]), model.embed_images(paths), atol=1e-6
        )

    spies.clear()
    summary, printed = run(settings, embedder=make, **job)
    assert (summary.items, summary.shards_skipped) == (0, 3)
    assert spies == []  # nothing to do: no model was loaded
    assert "nothing to do" in printed


def test_a_deleted_shard_is_recomputed_alone(
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    photos: dict[str, Any],
    read_output: Callable[[Path], dict[str, Any]],
) -> None:
    settings = make_settings()
    paths = many_photos(tmp_path / "photos", photos, 5)
    output = tmp_path / "out"
    job: dict[str, Any] = {"source": str(tmp_path / "photos"), "output": output, "shard_size": 2}
    run(settings, **job)
    before = read_output(output)
    kept = {p: p.stat().st_mtime_ns for p in output.rglob("*.*") if "_0001." not in p.name}
    (output / "img_emb" / "img_emb_0001.npy").unlink()

    spies: list[Spy] = []

    def make() -> Spy:
        spies.append(Spy(LocalEmbedder(settings, "fast", batch_size=2, loader=FakeLoader())))
        return spies[-1]

    summary, _ = run(settings, embedder=make, **job)
    assert (summary.items, summary.shards_written, summary.shards_skipped) == (2, 1, 2)
    assert spies[0].images == paths[2:4]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    after = read_output(output)
    assert after["rows"] == before["rows"]
    for a, b in zip(after["img_emb"], before["img_emb"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(BulkInputError, match="shard_size was 2, now 3"):
        run(settings, **{**job, "shard_size": 3})


def test_the_embed_command(tmp_path: Path, tiny_registry: dict[str, Any], photo_dir: Path) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps(tiny_registry))
    output = tmp_path / "out"

    def embed(*args: str) -> Any:
        return CliRunner().invoke(
            cli,
            ["embed", *args, "--config", str(config)],
            env={"COLUMNS": "200"},
        )

    result = embed(
        str(photo_dir), "-o", str(output), "-m", "tiny", "--dtype", "float16", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "embedded 4 of 4 items" in result.output
    assert "items/s" in result.output
    assert np.load(output / "img_emb" / "img_emb_0000.npy").dtype == np.float16
    again = embed(str(photo_dir), "-o", str(output), "-m", "tiny", "--dtype", "float16")
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output

    assert embed(str(photo_dir), "-o", str(output), "--dtype", "float64").exit_code == 2
    missing = embed(str(tmp_path / "nope"), "-o", str(tmp_path / "o2"))
    assert missing.exit_code == 2
    assert "no such file or folder" in missing.output
    conflict = embed(str(photo_dir), "-o", str(output), "-m", "tiny")  # float32 now
    assert conflict.exit_code == 2
    assert "dtype was 'float16'" in conflict.output

    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = embed(str(empty), "-o", str(tmp_path / "o4"))
    assert nothing.exit_code == 1
    assert "no rows to embed" in nothing.output

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"junk")
    failed = embed(str(broken), "-o", str(tmp_path / "o3"), "-m", "tiny")
    assert failed.exit_code == 1
    assert "1 items failed" in failed.output
