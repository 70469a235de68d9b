"""A scoring job's input: a CSV file (header row) or a JSONL file (one JSON object per line).

Rows are read lazily, so a job's memory stays bounded however long the file is. The image column
is the first of ``url``, ``path``, ``image``, ``image_input`` that a row fills; the caption column
the first of ``caption``, ``text``, ``text_prompt`` (names match case-insensitively). Every column
is carried through to the output. Relative image paths resolve against the input file's folder
(the working directory for stdin).
"""

from __future__ import annotations

import csv
import itertools
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from clipserve.errors import ClipServeError, InvalidInputError
from clipserve.media import SourceKind, classify

IMAGE_COLUMNS: Final = ("url", "path", "image", "image_input")
CAPTION_COLUMNS: Final = ("caption", "text", "text_prompt")
TableFormat = Literal["csv", "jsonl"]
_EXTENSIONS: Final[Mapping[str, TableFormat]] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}
# Inline data URIs can be long; the csv module's default cap is 128 KiB per field.
_CSV_FIELD_LIMIT: Final = 1 << 28


class ScoringInputError(InvalidInputError):
    """The job's input or output cannot be used (unknown format, missing column, unreadable)."""


@dataclass(frozen=True, slots=True)
class InputRow:
    number: int
    """1-based position among the data rows (the header and blank lines do not count)."""
    fields: Mapping[str, Any]
    """The row as read; carried through to the output."""
    image: str
    """The image input, with a relative path resolved against the input's folder."""
    caption: str
    problem: str | None = None
    """Why the row cannot be scored (empty image or caption, invalid JSON); None when it can."""


def table_format(name: str) -> TableFormat:
    """The format a file name's extension stands for (``.csv``, ``.jsonl``/``.ndjson``)."""
    suffix = Path(name).suffix.lower()
    try:
        return _EXTENSIONS[suffix]
    except KeyError:
        raise ScoringInputError(
            f"unknown file type '{suffix or name}': use .csv or .jsonl (also .ndjson)"
        ) from None


def resolve_image(value: str, base_dir: Path) -> str:
    """``value`` with a relative file path made absolute against ``base_dir``; URLs, data URIs
    and unsupported schemes are returned unchanged (the scorer reports the latter per row)."""
    try:
        kind = classify(value)
    except ClipServeError:
        return value
    if kind is not SourceKind.PATH:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def matching_columns(columns: Sequence[str], aliases: Sequence[str]) -> list[str]:
    """The columns named like one of ``aliases`` (case and spaces ignored), in alias order."""
    by_alias = {c.strip().lower(): c for c in reversed(columns)}
    return [by_alias[a] for a in aliases if a in by_alias]


class InputTable:
    """The rows of one CSV/JSONL file or of stdin (``"-"``; the format is sniffed).

    Opening reads the header (CSV) or the first object (JSONL) and checks that an image and a
    caption column exist, raising :class:`ScoringInputError` otherwise. Use as a context manager.
    """

    def __init__(self, source: str, *, stdin: TextIO | None = None) -> None:
        self.source = source
        self._buffered: list[tuple[int, Any]] = []
        self._file: TextIO | None = None
        if source == "-":
            stream = stdin if stdin is not None else sys.stdin
            self.path: Path | None = None
            self.base_dir = Path.cwd()
            first = stream.readline()
            while first and not first.strip():
                first = stream.readline()
            self.format: TableFormat = "jsonl" if first.lstrip().startswith("{") else "csv"
            self._lines: Iterator[str] = itertools.chain([first] if first else [], stream)
        else:
            self.path = Path(source).expanduser()
            self.format = table_format(source)
            self.base_dir = self.path.resolve().parent
            try:
                self._file = self.path.open(encoding="utf-8-sig", newline="")
            except OSError as exc:
                raise ScoringInputError(f"cannot read {source}: {exc.strerror or exc}") from exc
            self._lines = iter(self._file)
        try:
            self.columns = self._read_columns()
            self._check_columns()
        except BaseException:
            self.close()
            raise

    def _read_columns(self) -> list[str]:
        if self.format == "csv":
            csv.field_size_limit(max(csv.field_size_limit(), _CSV_FIELD_LIMIT))
            self._csv = csv.DictReader(self._lines)
            try:
                header = self._csv.fieldnames
            except (csv.Error, UnicodeDecodeError) as exc:
                raise ScoringInputError(f"{self.source}: invalid CSV header: {exc}") from exc
            if not header:
                raise ScoringInputError(f"{self.source} is empty: expected a CSV header row")
            return list(header)
        self._jsonl = _json_lines(self._lines)
        for number, value in self._jsonl:
            self._buffered.append((number, value))
            if isinstance(value, dict):
                return list(value)
        raise ScoringInputError(f"{self.source} holds no JSON objects (one per line expected)")

    def _check_columns(self) -> None:
        missing = [
            f"no {what} column (one of: {', '.join(aliases)})"
            for what, aliases in (("image", IMAGE_COLUMNS), ("caption", CAPTION_COLUMNS))
            if not matching_columns(self.columns, aliases)
        ]
        if missing:
            where = "header" if self.format == "csv" else "first object"
            found = ", ".join(self.columns) or "nothing"
            raise ScoringInputError(
                f"{self.source}: {' and '.join(missing)}; the {where} has: {found}"
            )

    def rows(self) -> Iterator[InputRow]:
        """The data rows, in order (one pass)."""
        if self.format == "csv":
            image_cols = matching_columns(self.columns, IMAGE_COLUMNS)
            caption_cols = matching_columns(self.columns, CAPTION_COLUMNS)
            number = 0
            try:
                for record in self._csv:
                    number += 1
                    fields = {k: v for k, v in record.items() if k is not None}
                    yield self._row(number, fields, image_cols, caption_cols)
            except (csv.Error, UnicodeDecodeError) as exc:
                message = f"{self.source}: invalid CSV after row {number}: {exc}"
                raise ScoringInputError(message) from exc
            return
        for number, value in itertools.chain(self._buffered, self._jsonl):
            if not isinstance(value, dict):
                problem = value if isinstance(value, str) else "not a JSON object"
                yield InputRow(number, {}, "", "", f"line {number}: {problem}")
                continue
            keys = list(value)
            yield self._row(
                number,
                value,
                matching_columns(keys, IMAGE_COLUMNS),
                matching_columns(keys, CAPTION_COLUMNS),
            )

    def _row(
        self,
        number: int,
        fields: Mapping[str, Any],
        image_cols: Sequence[str],
        caption_cols: Sequence[str],
    ) -> InputRow:
        image, image_problem = _first_text(fields, image_cols)
        caption, caption_problem = _first_text(fields, caption_cols)
        image = image.strip()
        problem = None
        if image_problem or not image:
            problem = image_problem or f"image is empty ({'/'.join(image_cols or IMAGE_COLUMNS)})"
        elif caption_problem or not caption.strip():
            problem = caption_problem or (
                f"caption is empty ({'/'.join(caption_cols or CAPTION_COLUMNS)})"
            )
        else:
            image = resolve_image(image, self.base_dir)
        return InputRow(number, fields, image, caption, problem)

    def count(self) -> int | None:
        """How many rows a file holds (a separate cheap pass), or None for stdin."""
        if self.path is None:
            return None
        try:
            with self.path.open(encoding="utf-8-sig", newline="") as stream:
                if self.format == "csv":
                    return max(0, sum(1 for record in csv.reader(stream) if record) - 1)
                return sum(1 for line in stream if line.strip())
        except (OSError, csv.Error, UnicodeDecodeError):
            return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> InputTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _first_text(fields: Mapping[str, Any], columns: Sequence[str]) -> tuple[str, str | None]:
    """The first non-empty value among ``columns`` as text, or a problem with its type."""
    for column in columns:
        value = fields.get(column)
        if value is None or value == "":
            continue
        if isinstance(value, str):
            return value, None
        if isinstance(value, bool | int | float):
            return str(value), None
        return "", f"column '{column}' holds a {type(value).__name__}, expected text"
    return "", None


def _json_lines(lines: Iterator[str]) -> Iterator[tuple[int, Any]]:
    """(number, object) per non-blank line; a line that is not JSON gives (number, message)."""
    number = 0
    try:
        for line in lines:
            if not line.strip():
                continue
            number += 1
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, f"invalid JSON ({exc.msg} at column {exc.colno})"
    except UnicodeDecodeError as exc:
        raise ScoringInputError(f"invalid UTF-8 after line {number}: {exc}") from exc
