"""What a scoring job shows on the terminal: a progress bar, a preview of the first rows and the
summary tables. Progress and summary go to stderr, so stdout can carry CSV (``--output -``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from clipserve.scoring.output import PreviewWriter, csv_cell
from clipserve.scoring.stats import JobSummary

_CELL_WIDTH = 40
_CELL_CHARS = 200


class ProgressBar:
    """Counts finished pairs on a rich progress bar (drawn only on a terminal)."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


@contextmanager
def progress_bar(console: Console, total: int | None) -> Iterator[ProgressBar]:
    """A progress bar on ``console``; silent when it is not a terminal (CI, pipes)."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )
    with progress:
        yield ProgressBar(progress, progress.add_task("starting", total=total))


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_tables(summary: JobSummary) -> list[Table]:
    """Per model: rows, succeeded, failed and the score distribution; then correlations."""
    scores = Table(title=f"clipserve score: {summary.rows} rows in {summary.elapsed_s:.1f} s")
    for name in ("model", "rows", "ok", "failed", "mean", "median", "std", "min", "max"):
        scores.add_column(name, justify="left" if name == "model" else "right")
    for s in summary.models:
        scores.add_row(
            s.model,
            str(s.count),
            str(s.succeeded),
            str(s.failed),
            *(_number(v) for v in (s.mean, s.median, s.std, s.min, s.max)),
        )
    tables = [scores]
    if summary.correlations:
        pairs = Table(title="agreement between models (rows where both succeeded)")
        for name in ("models", "rows", "pearson", "spearman"):
            pairs.add_column(name, justify="left" if name == "models" else "right")
        for c in summary.correlations:
            pairs.add_row(
                f"{c.first} vs {c.second}", str(c.n), _number(c.pearson), _number(c.spearman)
            )
        tables.append(pairs)
    return tables


def print_summary(console: Console, summary: JobSummary, *, output: str | None) -> None:
    for table in summary_tables(summary):
        console.print(table)
    for message, count in summary.top_errors:
        console.print(Text.assemble((f"{count} x ", "yellow"), message))
    if output not in (None, "-"):
        console.print(f"wrote {summary.rows} rows to {output}")


def print_preview(console: Console, preview: PreviewWriter, columns: Sequence[str]) -> None:
    """The first rows (row number and ``columns``) as a table, and how to get all of them."""
    if not preview.records:
        return
    table = Table(title=f"first {len(preview.records)} of {preview.total} rows")
    table.add_column("#", justify="right", min_width=len(str(len(preview.records))))
    for name in columns:
        score, error = name.startswith("clip_score"), name.startswith("error")
        table.add_column(
            name,
            justify="right" if score else "left",
            min_width=6 if score else 8 if error else None,
            max_width=None if score else _CELL_WIDTH,
            overflow="fold" if score or error else "ellipsis",
        )
    for number, record in enumerate(preview.records, 1):
        table.add_row(str(number), *(_cell(record.get(name)) for name in columns))
    console.print(table)
    if preview.total > len(preview.records):
        console.print("use --output FILE.csv|FILE.jsonl (or --output - for CSV) for every row")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    text = csv_cell(value)
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…"
