"""What ``clipserve embed`` reads: an image folder, a CSV/JSONL table or webdataset ``.tar`` shards.

* Folder: image files under it (recursively, hidden names skipped), sorted by relative path; a
  sidecar ``NAME.txt`` is the caption and ``NAME.json`` metadata. ``key`` is the relative path.
* Table: a ``.csv`` (header row) or ``.jsonl``/``.ndjson`` file, rows in file order. The image
  column is one of ``url, path, image, image_input``, the caption column one of ``caption, text,
  text_prompt``, the key column ``key`` or ``id`` (else the row number); other columns become
  metadata. Relative paths resolve against the table's folder.
* Webdataset (:mod:`clipserve.bulk.webdataset`): one ``.tar``, a folder of them, a glob or a
  brace range (``shards/{00000..00009}.tar``), samples in archive order.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from clipserve.bulk.records import (
    IMAGE_SUFFIXES,
    BulkInputError,
    Record,
    Skip,
    Source,
    SourceFormat,
    decode_text,
    flatten,
    json_metadata,
    read_sidecar,
)
from clipserve.bulk.webdataset import TarSource, expand_braces, is_tar
from clipserve.errors import ClipServeError
from clipserve.media import SourceKind, classify
from clipserve.scoring.rows import CAPTION_COLUMNS, IMAGE_COLUMNS, matching_columns, resolve_image

KEY_COLUMNS: Final = ("key", "id")
TABLE_SUFFIXES: Final = (".csv", ".jsonl", ".ndjson")
_CSV_FIELD_LIMIT: Final = 1 << 28  # inline data URIs can be long


def open_source(spec: str, *, max_member_bytes: int) -> Source:
    """The source that ``spec`` (a path, glob or brace pattern) names; raises
    :class:`BulkInputError` when there is nothing readable there. Tar members over
    ``max_member_bytes`` are not read (their row fails)."""
    if any(c in spec for c in "*?[") or re.search(r"\{[^{}]*(,|\.\.)[^{}]*\}", spec):
        paths = sorted({Path(p) for pattern in expand_braces(spec) for p in glob.glob(pattern)})
        if not paths:
            raise BulkInputError(f"no files match {spec}")
        return _tar_or_table(paths, spec, max_member_bytes)
    path = Path(spec).expanduser()
    if path.is_dir():
        tars = sorted(p for p in path.iterdir() if p.is_file() and is_tar(p))
        if tars:
            return TarSource(tars, max_member_bytes=max_member_bytes, description=str(path))
        return FolderSource(path)
    if not path.is_file():
        raise BulkInputError(f"no such file or folder: {spec}")
    return _tar_or_table([path], spec, max_member_bytes)


def _tar_or_table(paths: list[Path], spec: str, max_member_bytes: int) -> Source:
    if all(is_tar(p) for p in paths):
        return TarSource(paths, max_member_bytes=max_member_bytes, description=spec)
    if len(paths) == 1 and paths[0].name.lower().endswith(TABLE_SUFFIXES):
        return TableSource(paths[0])
    raise BulkInputError(
        f"cannot read {spec}: expected an image folder, a .csv/.jsonl file or webdataset "
        ".tar shards"
    )


class FolderSource:
    """Image files under a folder, sorted by relative path."""

    format: SourceFormat = "folder"
    has_images = True

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.description = str(root)
        files: set[str] = set()
        images: list[tuple[str, Path]] = []
        for path in self.root.rglob("*"):
            relative = path.relative_to(self.root)
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            files.add(relative.as_posix())
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append((relative.as_posix(), path))
        images.sort()
        self._images = images
        self.has_captions = any(
            Path(rel).with_suffix(".txt").as_posix() in files for rel, _ in images
        )

    def count(self) -> int:
        return len(self._images)

    def records(self, skip: Skip | None = None) -> Iterator[Record]:
        for index, (relative, path) in enumerate(self._images):
            if skip is not None and skip(index):
                continue
            caption = decode_text(read_sidecar(path.with_suffix(".txt")))
            metadata, problem = json_metadata(read_sidecar(path.with_suffix(".json")))
            yield Record(
                index,
                relative,
                image=str(path),
                image_path=str(path),
                caption=caption,
                metadata=metadata,
                problem=problem,
            )

    def close(self) -> None:
        pass


class TableSource:
    """The rows of a CSV or JSONL file (read lazily; counted with a cheap separate pass)."""

    format: SourceFormat = "table"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)
        self.base_dir = path.resolve().parent
        self._jsonl = not path.name.lower().endswith(".csv")
        columns = self._columns()
        self.has_images = bool(matching_columns(columns, IMAGE_COLUMNS))
        self.has_captions = bool(matching_columns(columns, CAPTION_COLUMNS))
        if not self.has_images and not self.has_captions:
            raise BulkInputError(
                f"{path}: no image column (one of: {', '.join(IMAGE_COLUMNS)}) and no caption "
                f"column (one of: {', '.join(CAPTION_COLUMNS)}); found: "
                f"{', '.join(columns) or 'nothing'}"
            )

    def _open(self) -> Any:
        try:
            return self.path.open(encoding="utf-8-sig", newline="")
        except OSError as exc:
            raise BulkInputError(f"cannot read {self.path}: {exc.strerror or exc}") from exc

    def _columns(self) -> list[str]:
        with self._open() as stream:
            if not self._jsonl:
                csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
                try:
                    return list(csv.DictReader(stream).fieldnames or [])
                except (csv.Error, UnicodeDecodeError) as exc:
                    raise BulkInputError(f"{self.path}: invalid CSV header: {exc}") from exc
            for _, value in _json_lines(stream, self.path):
                if isinstance(value, dict):
                    return list(value)
        return []

    def count(self) -> int:
        with self._open() as stream:
            try:
                if self._jsonl:
                    return sum(1 for line in stream if line.strip())
                return max(0, sum(1 for row in csv.reader(stream) if row) - 1)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise BulkInputError(f"{self.path}: unreadable: {exc}") from exc

    def records(self, skip: Skip | None = None) -> Iterator[Record]:
        with self._open() as stream:
            rows: Iterator[tuple[int, Any]]
            if self._jsonl:
                rows = _json_lines(stream, self.path)
            else:
                reader = csv.DictReader(stream)
                rows = enumerate(
                    ({k: v for k, v in row.items() if k is not None} for row in reader), 1
                )
            try:
                for index, (number, value) in enumerate(rows):
                    if skip is not None and skip(index):
                        continue
                    yield self._record(index, number, value)
            except (csv.Error, UnicodeDecodeError) as exc:
                raise BulkInputError(f"{self.path}: unreadable: {exc}") from exc

    def _record(self, index: int, number: int, value: Any) -> Record:
        if not isinstance(value, dict):
            problem = value if isinstance(value, str) else "not a JSON object"
            return Record(index, str(index), problem=f"line {number}: {problem}")
        keys = list(value)
        image_col = _first_filled(value, matching_columns(keys, IMAGE_COLUMNS))
        caption_col = _first_filled(value, matching_columns(keys, CAPTION_COLUMNS))
        key_col = _first_filled(value, matching_columns(keys, KEY_COLUMNS))
        key = str(value[key_col]) if key_col else str(index)
        metadata = flatten(
            {k: v for k, v in value.items() if k not in (image_col, caption_col, key_col)}
        )
        caption = value[caption_col] if caption_col else None
        record = Record(index, key, caption=None if caption is None else str(caption))
        if image_col is None:
            return _with(record, metadata=metadata)
        image = value[image_col]
        if not isinstance(image, str):
            problem = f"column '{image_col}' holds a {type(image).__name__}, expected text"
            return _with(record, metadata=metadata, problem=problem)
        image = resolve_image(image.strip(), self.base_dir)
        try:
            kind = classify(image)
        except ClipServeError:
            kind = None  # the engine reports it for this row
        return _with(
            record,
            image=image,
            image_path=image if kind is SourceKind.PATH else None,
            url=image if kind is SourceKind.URL else None,
            metadata=metadata,
        )

    def close(self) -> None:
        pass


def _with(record: Record, **changes: Any) -> Record:
    return dataclasses.replace(record, **changes)


def _first_filled(row: Mapping[str, Any], columns: list[str]) -> str | None:
    for column in columns:
        if row.get(column) not in (None, ""):
            return column
    return None


def _json_lines(stream: Any, path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) per non-blank line; a line that is not JSON gives a message."""
    number = 0
    try:
        for line in stream:
            number += 1
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, f"invalid JSON ({exc.msg} at column {exc.colno})"
    except UnicodeDecodeError as exc:
        raise BulkInputError(f"{path}: invalid UTF-8 after line {number}: {exc}") from exc
