"""What a bulk job shows: a progress bar (on a terminal, unless turned off) and the summary,
throughput included. Both go to stderr."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.text import Text

from clipserve.scoring.report import progress_bar


@dataclass(frozen=True, slots=True)
class BulkSummary:
    model: str | None
    items: int
    """Rows of the shards this run wrote."""
    embedded: int
    failed: int
    shards_written: int
    shards_skipped: int
    """Finished by an earlier run."""
    elapsed_s: float
    """From the first chunk to the last shard written (model loading excluded)."""
    load_s: float
    top_errors: list[tuple[str, int]] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.items / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Bar(Protocol):
    def describe(self, text: str) -> None: ...

    def advance(self, n: int) -> None: ...


class _NoBar:
    def describe(self, text: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass


@contextmanager
def progress(console: Console, total: int | None, enabled: bool) -> Iterator[Bar]:
    if not enabled:
        yield _NoBar()
        return
    with progress_bar(console, total) as bar:
        yield bar


def print_summary(console: Console, summary: BulkSummary, output: Path) -> None:
    if summary.items == 0:
        if summary.shards_skipped:
            shards = summary.shards_skipped
            console.print(f"nothing to do: all {shards} shards in {output} are finished")
        else:
            console.print(Text("the source holds no rows to embed", style="red"))
        return
    console.print(
        f"embedded {summary.embedded} of {summary.items} items in {summary.elapsed_s:.1f} s "
        f"({summary.items_per_s:.1f} items/s; model '{summary.model}' loaded in "
        f"{summary.load_s:.1f} s)"
    )
    if summary.failed:
        console.print(
            Text(f"{summary.failed} items failed: see {output / 'errors'}", style="yellow")
        )
        for message, count in summary.top_errors:
            console.print(Text.assemble((f"{count} x ", "yellow"), message))
    skipped = f", {summary.shards_skipped} finished earlier" if summary.shards_skipped else ""
    console.print(f"wrote {summary.shards_written} shards to {output}{skipped}")
