"""A scoring job: rows in, chunks through a scorer, records out, a summary at the end.

Rows are read, scored and written a chunk at a time (``chunk_size`` rows), so memory stays
bounded and the output file grows as the job runs; within a chunk the scorer runs forward passes
of ``batch_size`` pairs. Every row gets one pair per model (``--compare`` scores each row with
several models). Per-row failures are written to the output and never stop the job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from rich.console import Console

from clipserve.config import Settings
from clipserve.engine.registry import BackendLoader
from clipserve.engine.tasks.evaluate import EvalItem, EvalResult
from clipserve.errors import ClipServeError
from clipserve.scoring.output import PreviewWriter, RowWriter, open_writer
from clipserve.scoring.report import print_preview, print_summary, progress_bar
from clipserve.scoring.rows import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    InputRow,
    InputTable,
    ScoringInputError,
    matching_columns,
    table_format,
)
from clipserve.scoring.scorers import Advance, LocalScorer, RemoteScorer, Scorer
from clipserve.scoring.stats import JobSummary, SummaryBuilder

DEFAULT_CHUNK_SIZE: Final = 256
_MAX_DISTINCT_ERRORS: Final = 50


@dataclass(frozen=True, slots=True)
class ScoringJob:
    """What ``clipserve score`` was asked to do."""

    input: str
    """A .csv/.jsonl path, or "-" for stdin."""
    output: str | None = None
    """A .csv/.jsonl path, "-" for CSV on stdout, or None for a preview table."""
    models: tuple[str | None, ...] = (None,)
    """One model (None: the default) or, with ``compare``, two or more."""
    compare: bool = False
    batch_size: int | None = None
    """Pairs per forward pass; None: ``Settings.eval_batch_size``."""
    chunk_size: int = DEFAULT_CHUNK_SIZE
    service_url: str | None = None
    """Score through this running service instead of in this process."""
    timeout_s: float = 300.0
    """Per request to the service."""
    caption_model: str | None = None
    """A caption model: each row also gets the caption it generates for the image and that
    caption's CLIP score (``--caption``)."""


def choose_models(model: str | None, compare: str | None) -> tuple[tuple[str | None, ...], bool]:
    """``(models, compare)`` from the ``--model`` and ``--compare a,b`` flags."""
    if compare is None:
        return (model,), False
    if model is not None:
        raise ScoringInputError("--model and --compare cannot be used together")
    names = tuple(dict.fromkeys(n.strip() for n in compare.split(",") if n.strip()))
    if len(names) < 2:
        raise ScoringInputError("--compare needs two or more model names, e.g. fast,accurate")
    return names, True


@dataclass(frozen=True, slots=True)
class ColumnLayout:
    """The result columns: ``clip_score, error, model, text_truncated`` for one model;
    ``clip_score_<model>, error_<model>`` per model when comparing. With a caption model:
    ``generated_caption`` and ``generated_error``, and the generated caption's score,
    ``generated_clip_score`` (``generated_clip_score_<model>`` when comparing)."""

    labels: tuple[str, ...]
    compare: bool
    captions: bool = False

    @property
    def names(self) -> list[str]:
        if not self.compare:
            names = ["clip_score", "error", "model", "text_truncated"]
        else:
            names = [f"{k}_{label}" for label in self.labels for k in ("clip_score", "error")]
        if self.captions:
            names += ["generated_caption", "generated_error"]
            names += [self._generated(label) for label in self.labels]
        return names

    def _generated(self, label: str) -> str:
        return f"generated_clip_score_{label}" if self.compare else "generated_clip_score"

    def columns(self, results: Sequence[EvalResult | None], problem: str | None) -> dict[str, Any]:
        errors = [problem or (r.error.message if r and r.error else None) for r in results]
        scores = [r.score if r and problem is None else None for r in results]
        if not self.compare:
            (result,) = results
            return {
                "clip_score": scores[0],
                "error": errors[0],
                "model": result.model if result else self.labels[0],
                "text_truncated": bool(result and result.text_truncated),
            }
        out: dict[str, Any] = {}
        for label, score, error in zip(self.labels, scores, errors, strict=True):
            out[f"clip_score_{label}"] = score
            out[f"error_{label}"] = error
        return out

    def caption_columns(
        self, caption: str | ClipServeError | None, results: Sequence[EvalResult | None]
    ) -> dict[str, Any]:
        """The generated caption (or why there is none) and its score by each model."""
        error = caption.message if isinstance(caption, ClipServeError) else None
        if error is None and caption is not None:
            error = next((r.error.message for r in results if r and r.error), None)
        out: dict[str, Any] = {
            "generated_caption": caption if isinstance(caption, str) else None,
            "generated_error": error,
        }
        for label, result in zip(self.labels, results, strict=True):
            out[self._generated(label)] = result.score if result and not result.error else None
        return out


async def score_rows(
    rows: Iterable[InputRow],
    scorer: Scorer,
    writer: RowWriter,
    *,
    models: Sequence[str | None] = (None,),
    compare: bool = False,
    batch_size: int = 32,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    advance: Advance | None = None,
    caption_model: str | None = None,
) -> JobSummary:
    """Score ``rows`` with a started ``scorer`` and write one record per row, in order. With
    ``caption_model``, each row's image is also captioned and the caption scored by each model
    (progress counts the prompts' pairs only)."""
    started = time.perf_counter()
    layout = ColumnLayout(
        tuple(scorer.model_name(m) for m in models), compare, captions=caption_model is not None
    )
    summary = SummaryBuilder(layout.labels)
    errors: Counter[str] = Counter()
    for chunk in _chunks(rows, chunk_size):
        items: list[EvalItem] = []
        for row in chunk:
            if row.problem is None:
                items.extend(EvalItem(row.image, row.caption, m) for m in models)
        skipped = (len(chunk) * len(models)) - len(items)
        if advance is not None and skipped:
            advance(skipped)
        results = iter(await scorer.score(items, batch_size=batch_size, advance=advance))
        generated: Iterator[tuple[str | ClipServeError | None, list[EvalResult | None]]] = iter(())
        if caption_model is not None:
            generated = iter(
                await _generated_captions(chunk, scorer, caption_model, models, batch_size)
            )
        records = []
        for row in chunk:
            row_results = [None if row.problem else next(results) for _ in models]
            columns = layout.columns(row_results, row.problem)
            if caption_model is not None:
                columns |= layout.caption_columns(*next(generated))
            records.append({**row.fields, **columns})
            summary.add_row([None if row.problem or r is None else r.score for r in row_results])
            for r in row_results:
                message = row.problem or (r.error.message if r and r.error else None)
                if message and (message in errors or len(errors) < _MAX_DISTINCT_ERRORS):
                    errors[message] += 1
        writer.write(records)
    return summary.build(time.perf_counter() - started, errors.most_common(3))


async def _generated_captions(
    chunk: Sequence[InputRow],
    scorer: Scorer,
    caption_model: str,
    models: Sequence[str | None],
    batch_size: int,
) -> list[tuple[str | ClipServeError | None, list[EvalResult | None]]]:
    """Per row: the caption ``caption_model`` generates for its image (its error, or None for a
    row that could not be read), and that caption's result by each model."""
    valid = [row for row in chunk if row.problem is None]
    captions = iter(await scorer.caption([row.image for row in valid], caption_model))
    per_row: list[str | ClipServeError | None] = [
        None if row.problem else next(captions) for row in chunk
    ]
    items = [
        EvalItem(row.image, caption, m)
        for row, caption in zip(chunk, per_row, strict=True)
        if isinstance(caption, str)
        for m in models
    ]
    scored = iter(await scorer.score(items, batch_size=batch_size))
    return [
        (caption, [next(scored) if isinstance(caption, str) else None for _ in models])
        for caption in per_row
    ]


def _chunks(rows: Iterable[InputRow], size: int) -> Iterable[list[InputRow]]:
    iterator = iter(rows)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def with_local_files(settings: Settings, input_path: str) -> Settings:
    """Settings that read image paths anywhere on this machine (the filesystem anchor as media
    root) unless a media root was configured. The user runs the job on their own files, so the
    service's media-root sandbox does not apply; SSRF protection for URLs stays on."""
    if settings.media.media_root is not None:
        return settings
    base = Path.cwd() if input_path == "-" else Path(input_path).expanduser()
    media = settings.media.model_copy(update={"media_root": Path(base.resolve().anchor)})
    return settings.model_copy(update={"media": media})


def make_scorer(job: ScoringJob, settings: Settings, loader: BackendLoader | None) -> Scorer:
    if job.service_url is None:
        return LocalScorer(settings, loader=loader)
    return RemoteScorer(job.service_url, media=settings.media, timeout_s=job.timeout_s)


async def run_job(
    job: ScoringJob,
    settings: Settings,
    *,
    console: Console,
    out: Console | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    loader: BackendLoader | None = None,
) -> JobSummary:
    """Run ``job`` end to end: progress on ``console`` (stderr), rows to the output, the preview
    (without an output) on ``out`` and the summary on ``console``.

    Raises :class:`ScoringInputError` (bad input, output or flags),
    :class:`~clipserve.errors.ModelNotFoundError`,
    :class:`~clipserve.errors.ModelUnavailableError` (a local model failed to load) and
    :class:`~clipserve.scoring.scorers.ServiceUnreachableError`.
    """
    if job.output not in (None, "-"):
        table_format(job.output)  # an unknown extension fails before any work
    settings = with_local_files(settings, job.input)
    batch_size = job.batch_size or settings.eval_batch_size
    with InputTable(job.input, stdin=stdin) as table:
        scorer = make_scorer(job, settings, loader)
        try:
            total = table.count()
            with progress_bar(console, None if total is None else total * len(job.models)) as bar:
                bar.describe("loading models" if job.service_url is None else "connecting")
                await scorer.start(job.models, caption_model=job.caption_model)
                bar.describe("scoring")
                writer = open_writer(job.output, stdout=stdout)
                layout = ColumnLayout(
                    tuple(scorer.model_name(m) for m in job.models),
                    job.compare,
                    captions=job.caption_model is not None,
                )
                try:
                    summary = await score_rows(
                        table.rows(),
                        scorer,
                        writer,
                        models=job.models,
                        compare=job.compare,
                        batch_size=batch_size,
                        chunk_size=job.chunk_size,
                        advance=bar.advance,
                        caption_model=job.caption_model,
                    )
                finally:
                    writer.close()
        finally:
            await scorer.close()
    if isinstance(writer, PreviewWriter):
        shown = [
            *matching_columns(table.columns, IMAGE_COLUMNS),
            *matching_columns(table.columns, CAPTION_COLUMNS),
            *(n for n in layout.names if n != "text_truncated"),
        ]
        print_preview(out or Console(), writer, shown)
    print_summary(console, summary, output=job.output)
    return summary


def run(
    job: ScoringJob,
    settings: Settings,
    *,
    console: Console,
    loader: BackendLoader | None = None,
) -> JobSummary:
    """:func:`run_job` on a fresh event loop (for the CLI and scripts); from code that is already
    inside a running loop (a notebook), the job runs on its own loop in a worker thread."""
    job_run = functools.partial(run_job, job, settings, console=console, loader=loader)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(job_run())
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="clipserve-score") as pool:
        return pool.submit(lambda: asyncio.run(job_run())).result()
