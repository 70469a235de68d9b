"""A bulk embedding job: source rows in, chunks through an embedder, shards out, then a summary.

Rows are read in order and cut into shards of ``shard_size`` rows (shard k holds rows
``k * shard_size`` to ``(k + 1) * shard_size - 1``, whatever fails), so a resumed run maps rows to
shards exactly as the first one did and redoes only the shards its sink lacks. Within a shard,
chunks of ``embedder.chunk_size`` rows are embedded, two at a time (one is prepared while the
other runs), and their results are collected in order. A row that cannot be embedded is recorded
in its shard's failures and left out; the job goes on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from rich.console import Console

from clipserve.bulk.embedders import Embedder, ItemError, LocalEmbedder, RemoteEmbedder, embed_each
from clipserve.bulk.records import BulkInputError, Record, Source
from clipserve.bulk.report import Bar, BulkSummary, print_summary, progress
from clipserve.bulk.sources import open_source
from clipserve.bulk.writer import Dtype, Failure, FileSink, Manifest, Shard, Sink
from clipserve.config import Settings
from clipserve.engine.registry import BackendLoader
from clipserve.scoring.job import with_local_files

DEFAULT_SHARD_SIZE: Final = 4096
DEFAULT_REMOTE_BATCH_SIZE: Final = 32
IN_FLIGHT: Final = 2
"""Chunks embedding at once: the next one is decoded while the current one runs."""


@dataclass(frozen=True, slots=True)
class BulkJob:
    """What ``clipserve embed`` was asked to do."""

    source: str
    output: Path
    model: str | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int | None = None
    """Local: items per forward pass (default ``batching.max_batch_size``); service: per request."""
    dtype: Dtype = "float32"
    images: bool | None = None
    """Embed the images; None: when the source has them."""
    texts: bool | None = None
    """Embed the captions; None: when the source has them."""
    service_url: str | None = None
    api_key: str | None = None
    timeout_s: float = 300.0
    progress: bool = True
    collection: str | None = None
    """Also upsert each shard's vectors into this collection (see :mod:`.collection_sink`)."""


@dataclass(frozen=True, slots=True)
class ChunkResult:
    count: int
    rows: list[Record]
    """The rows embedded, in order, without their image payloads."""
    image_embeddings: np.ndarray | None
    text_embeddings: np.ndarray | None
    failures: list[Failure]


def embed_chunk(
    embedder: Embedder, records: Sequence[Record], *, images: bool, texts: bool
) -> ChunkResult:
    """Embed one chunk's images and/or captions; rows that fail are returned as failures."""
    failures: list[Failure] = []
    candidates: list[tuple[Record, np.ndarray | None]] = []
    for record in records:
        problem = record.problem
        if problem is None and images and record.image is None:
            problem = "no image in this row"
        if problem is None and texts and not (record.caption or "").strip():
            problem = "no caption in this row (--no-texts embeds the images alone)"
        if problem is not None:
            failures.append(Failure.of(record, "input", problem))
        else:
            candidates.append((record, None))
    if images:
        prepared = []
        for record, _ in candidates:
            try:
                assert record.image is not None
                prepared.append((record, embedder.prepare_image(record.image)))
            except ItemError as exc:
                failures.append(Failure.of(record, "image", exc.message))
        outcomes = embed_each(embedder.embed_images, [image for _, image in prepared])
        candidates = []
        for (record, _), outcome in zip(prepared, outcomes, strict=True):
            if isinstance(outcome, str):
                failures.append(Failure.of(record, "image", outcome))
            else:
                candidates.append((record, outcome))
    text_vectors: list[np.ndarray] = []
    if texts:
        outcomes = embed_each(embedder.embed_texts, [r.caption or "" for r, _ in candidates])
        kept = []
        for candidate, outcome in zip(candidates, outcomes, strict=True):
            if isinstance(outcome, str):
                failures.append(Failure.of(candidate[0], "text", outcome))
            else:
                kept.append(candidate)
                text_vectors.append(outcome)
        candidates = kept
    image_vectors = [vector for _, vector in candidates if vector is not None]
    return ChunkResult(
        count=len(records),
        rows=[dataclasses.replace(record, image=None) for record, _ in candidates],
        image_embeddings=_stack(image_vectors) if images else None,
        text_embeddings=_stack(text_vectors) if texts else None,
        failures=sorted(failures, key=lambda f: f.index),
    )


def _stack(vectors: list[np.ndarray]) -> np.ndarray | None:
    """None for no rows (the shard fills in the right width)."""
    return np.stack(vectors).astype(np.float32, copy=False) if vectors else None


class _ShardBuilder:
    def __init__(self, number: int) -> None:
        self.number = number
        self.parts: list[ChunkResult] = []

    def build(self, dim: Callable[[], int], *, images: bool, texts: bool) -> Shard:
        def joined(kind: str, wanted: bool) -> np.ndarray | None:
            if not wanted:
                return None
            arrays = [a for p in self.parts if (a := getattr(p, kind)) is not None]
            return np.concatenate(arrays) if arrays else np.zeros((0, dim()), np.float32)

        return Shard(
            number=self.number,
            rows=[row for p in self.parts for row in p.rows],
            image_embeddings=joined("image_embeddings", images),
            text_embeddings=joined("text_embeddings", texts),
            failures=[f for p in self.parts for f in p.failures],
        )


def _chunks(records: Iterable[Record], shard_size: int, chunk_size: int) -> Iterator[list[Record]]:
    """Consecutive rows, at most ``chunk_size``, never two shards in one chunk."""
    chunk: list[Record] = []
    for record in records:
        if chunk and (
            len(chunk) >= chunk_size or record.index // shard_size != chunk[0].index // shard_size
        ):
            yield chunk
            chunk = []
        chunk.append(record)
    if chunk:
        yield chunk


def choose_modalities(job: BulkJob, source: Source) -> tuple[bool, bool]:
    """``(images, texts)``: the flags, or what the source holds."""
    images = source.has_images if job.images is None else job.images
    texts = source.has_captions if job.texts is None else job.texts
    if images and not source.has_images:
        raise BulkInputError(f"{source.description} has no image column to embed")
    if texts and not source.has_captions:
        raise BulkInputError(f"{source.description} has no captions to embed (--no-texts)")
    if not images and not texts:
        raise BulkInputError("nothing to embed: both images and texts are turned off")
    return images, texts


class BulkRun:
    """One run of a job against a sink; :meth:`run` returns the summary."""

    def __init__(
        self,
        source: Source,
        sink: Sink,
        make_embedder: Callable[[], Embedder],
        *,
        shard_size: int,
        images: bool,
        texts: bool,
        total: int | None,
    ) -> None:
        self.source, self.sink, self.make_embedder = source, sink, make_embedder
        self.shard_size, self.images, self.texts, self.total = shard_size, images, texts, total
        self._finished: dict[int, bool] = {}
        self._embedder: Embedder | None = None
        self._builder: _ShardBuilder | None = None
        self._written = self._items = self._embedded = 0
        self._errors: Counter[str] = Counter()
        self._failed = 0

    def finished(self, number: int) -> bool:
        if number not in self._finished:
            self._finished[number] = self.sink.is_finished(number)
        return self._finished[number]

    def todo(self) -> int | None:
        """Rows in the shards still to write, when the source's length is known."""
        if self.total is None:
            return None
        size = self.shard_size
        shards = math.ceil(self.total / size)
        return sum(min(size, self.total - n * size) for n in range(shards) if not self.finished(n))

    def run(self, bar: Bar) -> BulkSummary:
        records = self.source.records(skip=lambda index: self.finished(index // self.shard_size))
        first = next(records, None)
        load_s = 0.0
        started = time.perf_counter()
        if first is not None:
            bar.describe("loading model")
            self._embedder = self.make_embedder()
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            bar.describe("embedding")
            self._embed_all(itertools.chain([first], records), self._embedder, bar)
        return BulkSummary(
            model=self._embedder.model if self._embedder else None,
            items=self._items,
            embedded=self._embedded,
            failed=self._failed,
            shards_written=self._written,
            shards_skipped=sum(self._finished.values()),
            elapsed_s=time.perf_counter() - started,
            load_s=load_s,
            top_errors=self._errors.most_common(3),
        )

    def _embed_all(self, records: Iterable[Record], embedder: Embedder, bar: Bar) -> None:
        pending: deque[tuple[int, concurrent.futures.Future[ChunkResult]]] = deque()
        pool = concurrent.futures.ThreadPoolExecutor(
            IN_FLIGHT, thread_name_prefix="clipserve-embed"
        )
        try:
            for chunk in _chunks(records, self.shard_size, embedder.chunk_size):
                future = pool.submit(
                    embed_chunk, embedder, chunk, images=self.images, texts=self.texts
                )
                pending.append((chunk[0].index // self.shard_size, future))
                while len(pending) >= IN_FLIGHT:
                    self._collect(*pending.popleft(), bar)
            while pending:
                self._collect(*pending.popleft(), bar)
            self._flush()
        finally:
            for _, future in pending:
                future.cancel()
            pool.shutdown(wait=True)
            embedder.close()

    def _collect(
        self, number: int, future: concurrent.futures.Future[ChunkResult], bar: Bar
    ) -> None:
        if self._builder is not None and self._builder.number != number:
            self._flush()  # all its chunks are in: written even if this chunk failed
        result = future.result()
        if self._builder is None:
            self._builder = _ShardBuilder(number)
        self._builder.parts.append(result)
        self._items += result.count
        self._embedded += len(result.rows)
        self._failed += len(result.failures)
        for failure in result.failures:
            if failure.error in self._errors or len(self._errors) < 50:
                self._errors[failure.error] += 1
        bar.advance(result.count)

    def _flush(self) -> None:
        if self._builder is None:
            return
        assert self._embedder is not None
        shard = self._builder.build(self._embedder.embed_dim, images=self.images, texts=self.texts)
        self.sink.write_shard(shard)
        self._finished[shard.number] = False  # written now, not skipped
        self._written += 1
        self._builder = None


def make_embedder(
    job: BulkJob, settings: Settings, loader: BackendLoader | None
) -> Callable[[], Embedder]:
    def make() -> Embedder:
        if job.service_url is not None:
            return RemoteEmbedder(
                job.service_url,
                job.model,
                media=settings.media,
                batch_size=job.batch_size or DEFAULT_REMOTE_BATCH_SIZE,
                api_key=job.api_key,
                timeout_s=job.timeout_s,
            )
        batch_size = job.batch_size or settings.batching.max_batch_size
        return LocalEmbedder(settings, job.model, batch_size=batch_size, loader=loader)

    return make


def _collection_sink(job: BulkJob, settings: Settings, files: FileSink, model: str | None) -> Sink:
    from clipserve.bulk.collection_sink import CollectionSink, LocalTarget, RemoteTarget, Target

    assert job.collection is not None
    target: Target
    if job.service_url:
        target = RemoteTarget(
            job.service_url, job.collection, api_key=job.api_key, timeout_s=job.timeout_s
        )
    else:
        target = LocalTarget(settings.collections.data_dir, job.collection)
    return CollectionSink(files, target, model=model)


def run(
    job: BulkJob,
    settings: Settings,
    *,
    console: Console,
    loader: BackendLoader | None = None,
    embedder: Callable[[], Embedder] | None = None,
) -> BulkSummary:
    """Run ``job`` to the file layout of :mod:`clipserve.bulk.writer`, with a progress bar and
    the summary on ``console``. ``embedder`` replaces the one the job describes (tests).

    Raises :class:`BulkInputError` (source, output or flags unusable),
    :class:`~clipserve.errors.ModelNotFoundError`, and the errors that end a run (a model that
    cannot load, an unreachable service); the shards written so far stay, and a rerun resumes.
    """
    if job.shard_size < 1:
        raise BulkInputError("--shard-size must be at least 1")
    settings = with_local_files(settings, job.source)
    source = open_source(job.source, max_member_bytes=settings.media.max_image_bytes)
    try:
        images, texts = choose_modalities(job, source)
        total = source.count()
        manifest = Manifest(
            source=os.path.abspath(os.path.expanduser(job.source)),
            source_format=source.format,
            model=job.model or (None if job.service_url else settings.default_model),
            shard_size=job.shard_size,
            dtype=job.dtype,
            images=images,
            texts=texts,
            items=total,
        )
        files = FileSink(job.output, manifest)
        sink: Sink = files
        if job.collection is not None:
            sink = _collection_sink(job, settings, files, manifest.model)
        bulk = BulkRun(
            source,
            sink,
            embedder or make_embedder(job, settings, loader),
            shard_size=job.shard_size,
            images=images,
            texts=texts,
            total=total,
        )
        with progress(console, bulk.todo(), job.progress) as bar:
            summary = bulk.run(bar)
        sink.close()
    finally:
        source.close()
    print_summary(console, summary, job.output)
    return summary
