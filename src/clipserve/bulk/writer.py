"""Where ``clipserve embed`` puts its results: shards of ``.npy`` embeddings and Parquet metadata.

The files follow clip-retrieval's ``inference`` layout, so its users (and ``autofaiss``) can read
them as they are::

    OUTPUT/img_emb/img_emb_0000.npy          (rows, dim) float32 (or float16)
    OUTPUT/text_emb/text_emb_0000.npy        when captions are embedded
    OUTPUT/metadata/metadata_0000.parquet    key, image_path, url, caption, metadata columns
    OUTPUT/errors/errors_0000.jsonl          only for shards where some rows failed
    OUTPUT/manifest.json                     the run's parameters, checked when resuming

Row i of a shard's ``.npy`` files is row i of its Parquet table; rows that failed are left out of
both and listed in the shard's errors file. Every file is written to a temporary name and renamed,
the Parquet table last, so a shard is finished exactly when its ``.npy`` files and its table
exist: a resumed run skips those and redoes the rest.

:class:`Sink` is what the runner writes to; :class:`FileSink` is this layout. Another sink (a
vector collection) only has to implement the three methods.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped, unused-ignore]
import pyarrow.parquet as pq  # type: ignore[import-untyped, unused-ignore]

from clipserve.bulk.records import BulkInputError, Record

Dtype = Literal["float32", "float16"]
Stage = Literal["input", "image", "text"]
MANIFEST: Final = "manifest.json"
LAYOUT_VERSION: Final = 1


@dataclass(frozen=True, slots=True)
class Failure:
    """A row that could not be embedded."""

    index: int
    key: str
    where: str | None
    """Its image path or URL, when it has one."""
    stage: Stage
    error: str

    @classmethod
    def of(cls, record: Record, stage: Stage, error: str) -> Failure:
        return cls(record.index, record.key, record.where, stage, error)


@dataclass(frozen=True, slots=True)
class Shard:
    """One finished shard: the rows that were embedded (in input order) and their vectors."""

    number: int
    rows: Sequence[Record]
    image_embeddings: np.ndarray | None
    """(len(rows), dim) float32, or None when images are not embedded."""
    text_embeddings: np.ndarray | None
    failures: Sequence[Failure]


class Sink(Protocol):
    """Where finished shards go."""

    def is_finished(self, number: int) -> bool:
        """Whether shard ``number`` was written by an earlier run (a resumed run skips it)."""

    def write_shard(self, shard: Shard) -> None:
        """Store one shard, all or nothing."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Manifest:
    """What decides which row goes to which shard and what a shard holds; a resumed run must
    match it."""

    source: str
    source_format: str
    model: str | None
    shard_size: int
    dtype: Dtype
    images: bool
    texts: bool
    items: int | None
    """Rows in the source, when they could be counted."""

    def conflicts(self, earlier: Manifest) -> list[str]:
        out = []
        for name in ("source", "model", "shard_size", "dtype", "images", "texts", "items"):
            now, then = getattr(self, name), getattr(earlier, name)
            if name == "items" and (now is None or then is None):
                continue
            if now != then:
                out.append(f"{name} was {then!r}, now {now!r}")
        return out

    def to_json(self) -> str:
        return json.dumps({"layout": LAYOUT_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data = json.loads(text)
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})


def shard_name(kind: str, number: int) -> str:
    return f"{kind}_{number:04d}"


class FileSink:
    """The clip-retrieval layout under ``root`` (see the module's docstring)."""

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.folders = {"metadata": root / "metadata", "errors": root / "errors"}
        if manifest.images:
            self.folders["img_emb"] = root / "img_emb"
        if manifest.texts:
            self.folders["text_emb"] = root / "text_emb"
        fresh = self._check_manifest()
        try:
            for folder in self.folders.values():
                folder.mkdir(parents=True, exist_ok=True)
                for stale in folder.glob(".*.tmp"):  # left by an interrupted write
                    stale.unlink(missing_ok=True)
            if fresh:
                _atomic_write(root / MANIFEST, lambda f: f.write(manifest.to_json().encode()))
        except OSError as exc:
            raise BulkInputError(f"cannot write to {root}: {exc.strerror or exc}") from exc

    def _check_manifest(self) -> bool:
        """Whether the manifest is to be (re)written: refuses an output folder that holds
        shards of another run (other source or flags) or of another tool."""
        path = self.root / MANIFEST
        metadata = self.root / "metadata"
        has_shards = metadata.is_dir() and any(metadata.glob("*.parquet"))
        if not path.exists():
            if has_shards:
                raise BulkInputError(
                    f"{self.root} holds shards without {MANIFEST}: not written by clipserve "
                    "embed; choose another --output"
                )
            return True
        try:
            earlier = Manifest.from_json(path.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BulkInputError(f"{path} is unreadable ({exc}); choose another --output") from exc
        conflicts = self.manifest.conflicts(earlier)
        if conflicts and has_shards:
            raise BulkInputError(
                f"{self.root} was written by another run ({'; '.join(conflicts)}): resume with "
                "the same source and flags, or choose another --output"
            )
        return bool(conflicts)  # no shard yet: the new run's parameters replace the old

    def paths(self, number: int) -> dict[str, Path]:
        """The files of shard ``number``, by folder."""
        out = {
            "metadata": self.folders["metadata"] / f"{shard_name('metadata', number)}.parquet",
            "errors": self.folders["errors"] / f"{shard_name('errors', number)}.jsonl",
        }
        for kind in ("img_emb", "text_emb"):
            if kind in self.folders:
                out[kind] = self.folders[kind] / f"{shard_name(kind, number)}.npy"
        return out

    def is_finished(self, number: int) -> bool:
        paths = self.paths(number)
        return all(p.exists() for kind, p in paths.items() if kind != "errors")

    def write_shard(self, shard: Shard) -> None:
        paths = self.paths(shard.number)
        if shard.failures:
            lines = [json.dumps(asdict(f), ensure_ascii=False) + "\n" for f in shard.failures]
            data = "".join(lines).encode()
            _atomic_write(paths["errors"], lambda f: f.write(data))
        else:
            paths["errors"].unlink(missing_ok=True)
        for kind, vectors in (
            ("img_emb", shard.image_embeddings),
            ("text_emb", shard.text_embeddings),
        ):
            if kind not in paths:
                continue
            if vectors is None or len(vectors) != len(shard.rows):
                raise ValueError(f"shard {shard.number}: {kind} does not match its rows")
            array = np.ascontiguousarray(vectors, dtype=self.manifest.dtype)
            _atomic_write(paths[kind], functools.partial(_save_npy, array=array))
        table = metadata_table(shard.rows)
        _atomic_write(paths["metadata"], lambda f: pq.write_table(table, f))  # the commit

    def close(self) -> None:
        pass


def _save_npy(stream: io.BufferedWriter, *, array: np.ndarray) -> None:
    np.save(stream, array, allow_pickle=False)


def metadata_table(rows: Sequence[Record]) -> Any:
    """The Parquet table of a shard: ``key, image_path, url, caption`` (null where a row has
    none), then the metadata columns in first-seen order. A column whose values Arrow cannot
    type together (mixed kinds) is stored as JSON text; an all-empty one as strings."""
    columns: dict[str, list[Any]] = {
        "key": [r.key for r in rows],
        "image_path": [r.image_path for r in rows],
        "url": [r.url for r in rows],
        "caption": [r.caption for r in rows],
    }
    extra = [n for n in dict.fromkeys(k for r in rows for k in r.metadata) if n not in columns]
    for name in extra:
        columns[name] = [r.metadata.get(name) for r in rows]
    return pa.table({name: _column(values) for name, values in columns.items()})


def _column(values: list[Any]) -> Any:
    try:
        array = pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return pa.array(
            [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
            type=pa.string(),
        )
    if pa.types.is_null(array.type):
        return array.cast(pa.string())
    return array


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write ``path`` through a hidden temporary file in its folder, synced, then renamed over."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
