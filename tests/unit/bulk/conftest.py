"""Bulk embedding fixtures: small real photos on disk, in a table and in a webdataset shard."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

NAMES = ("astronaut", "chelsea", "coffee", "rocket")
CAPTIONS = {
    "astronaut": "an astronaut",
    "chelsea": "a cat",
    "coffee": "a cup of coffee",
    "rocket": "a rocket",
}


@pytest.fixture(scope="session")
def small_photos(photos: dict[str, Any]) -> dict[str, Any]:
    """The scikit-image photos at 64 px, so a test decodes them in milliseconds."""
    return {name: photos[name].resize((64, 64)) for name in NAMES}


@pytest.fixture
def photo_dir(tmp_path: Path, small_photos: dict[str, Any]) -> Path:
    """photos/{astronaut,chelsea,coffee,rocket}.jpg, each with a NAME.txt caption."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, image in small_photos.items():
        image.save(folder / f"{name}.jpg")
        (folder / f"{name}.txt").write_text(CAPTIONS[name])
    return folder


def jpeg(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def make_tar(small_photos: dict[str, Any]) -> Callable[..., Path]:
    """``make_tar(path, names)``: a webdataset shard with KEY.jpg + KEY.txt + KEY.json per name."""

    def make(path: Path, names: tuple[str, ...] = NAMES) -> Path:
        with tarfile.open(path, "w") as tar:
            for name in names:
                key = f"sample_{name}"
                add_member(tar, f"{key}.jpg", jpeg(small_photos[name]))
                add_member(tar, f"{key}.txt", CAPTIONS[name].encode())
                meta = {"url": f"https://example.com/{name}.jpg", "width": 64, "src": {"n": 1}}
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
        return path

    return make


@pytest.fixture
def read_output() -> Callable[[Path], dict[str, Any]]:
    """``read_output(folder)``: every shard's files, concatenated in shard order."""
    import pyarrow.parquet as pq

    def read(folder: Path) -> dict[str, Any]:
        tables = sorted((folder / "metadata").glob("metadata_*.parquet"))
        rows = [row for path in tables for row in pq.read_table(path).to_pylist()]
        out: dict[str, Any] = {"rows": rows, "shards": len(tables)}
        for kind in ("img_emb", "text_emb"):
            files = sorted((folder / kind).glob(f"{kind}_*.npy"))
            if files:
                out[kind] = [np.load(p) for p in files]
        errors = sorted((folder / "errors").glob("errors_*.jsonl"))
        out["errors"] = [json.loads(line) for p in errors for line in p.read_text().splitlines()]
        return out

    return read
