"""Writing a scoring job's rows: CSV or JSONL files (chosen by extension), CSV on stdout, or a
preview that keeps only the first rows for a table on the terminal."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO

from clipserve.scoring.rows import ScoringInputError, table_format

Record = Mapping[str, Any]


class RowWriter(Protocol):
    def write(self, records: Sequence[Record]) -> None:
        """Append records (in order) and flush, so a long job's finished rows are on disk."""

    def close(self) -> None: ...


def csv_cell(value: Any) -> str:
    """How a value appears in a CSV cell: '' for None, JSON for lists and objects."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


class _StreamWriter:
    """Owns (closes) its stream, or only flushes one it was lent (stdout)."""

    def __init__(self, stream: TextIO, *, owns_stream: bool = True) -> None:
        self._stream, self._owns = stream, owns_stream

    def close(self) -> None:
        if self._owns:
            self._stream.close()
        else:
            self._stream.flush()


class CsvRowWriter(_StreamWriter):
    """Writes a header (the keys of the first batch of records, in first-seen order) and rows.

    Keys that first appear after the header was written are left out and listed in
    ``dropped_columns`` (they can only come from JSONL input whose objects differ).
    """

    def __init__(self, stream: TextIO, *, owns_stream: bool = True) -> None:
        super().__init__(stream, owns_stream=owns_stream)
        self._writer: csv.DictWriter[str] | None = None
        self.columns: list[str] = []
        self.dropped_columns: set[str] = set()

    def write(self, records: Sequence[Record]) -> None:
        if not records:
            return
        if self._writer is None:
            self.columns = list(dict.fromkeys(k for record in records for k in record))
            self._writer = csv.DictWriter(self._stream, self.columns, extrasaction="ignore")
            self._writer.writeheader()
        known = set(self.columns)
        for record in records:
            self.dropped_columns.update(k for k in record if k not in known)
            self._writer.writerow({k: csv_cell(v) for k, v in record.items()})
        self._stream.flush()


class JsonlRowWriter(_StreamWriter):
    """One JSON object per line (UTF-8, non-ASCII kept); None is null."""

    def write(self, records: Sequence[Record]) -> None:
        for record in records:
            self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()


class PreviewWriter:
    """Keeps the first ``limit`` records (for a table on the terminal) and counts the rest."""

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit
        self.records: list[Record] = []
        self.total = 0

    def write(self, records: Sequence[Record]) -> None:
        self.total += len(records)
        self.records.extend(records[: max(0, self.limit - len(self.records))])

    def close(self) -> None:
        pass


def open_writer(output: str | None, *, stdout: TextIO | None = None) -> RowWriter:
    """A writer for ``--output``: a .csv/.jsonl file, ``-`` for CSV on stdout, None for a preview.

    Raises :class:`ScoringInputError` for an unknown extension or a file that cannot be created.
    """
    if output is None:
        return PreviewWriter()
    if output == "-":
        return CsvRowWriter(stdout if stdout is not None else sys.stdout, owns_stream=False)
    fmt = table_format(output)
    try:
        stream = Path(output).expanduser().open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise ScoringInputError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return CsvRowWriter(stream) if fmt == "csv" else JsonlRowWriter(stream)
