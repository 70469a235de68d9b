"""What a job is: its spec (kind, model, items, chunking), its status, and its result lines.

A job is split into chunks of ``chunk_size`` items, the unit of work, of progress and of
recovery: a chunk's results are stored whole, once, so a job interrupted by a restart resumes at
its first unfinished chunk and never counts an item twice.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

import numpy as np
import orjson

JobKind = Literal["embed", "score"]
MAX_LISTED_ERRORS = 20
"""A status lists the first errors only (with the total count)."""


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A submitted job. ``items``: for ``embed``, ``{"text": ...}`` or ``{"image": ...}``; for
    ``score``, ``{"image": ..., "text": ...}``; ``owner``: the caller who submitted it."""

    id: str
    kind: JobKind
    model: str
    items: tuple[dict[str, str], ...]
    chunk_size: int
    owner: str
    created_at: float

    @classmethod
    def new(
        cls,
        kind: JobKind,
        model: str,
        items: list[dict[str, str]],
        *,
        chunk_size: int,
        owner: str,
    ) -> JobSpec:
        return cls(uuid.uuid4().hex, kind, model, tuple(items), chunk_size, owner, time.time())

    @property
    def chunks(self) -> int:
        return -(-len(self.items) // self.chunk_size)

    def chunk(self, index: int) -> tuple[int, tuple[dict[str, str], ...]]:
        """Chunk ``index``: the input index of its first item, and its items."""
        start = index * self.chunk_size
        return start, self.items[start : start + self.chunk_size]

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobSpec:
        data = orjson.loads(raw)
        data["items"] = tuple(data["items"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class ChunkResult:
    """One finished chunk: its JSON lines (one per item, in input order) and its counts."""

    index: int
    lines: bytes
    succeeded: int
    failed: int
    errors: tuple[tuple[int, str], ...] = ()
    """(input index, message) of its failed items."""


@dataclass(slots=True)
class JobStatus:
    id: str
    kind: JobKind
    model: str
    state: JobState
    total: int
    chunks: int
    succeeded: int = 0
    failed: int = 0
    chunks_done: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    reason: str | None = None
    """Why the job failed or was cancelled."""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def of(cls, spec: JobSpec) -> JobStatus:
        return cls(
            spec.id,
            spec.kind,
            spec.model,
            JobState.queued,
            len(spec.items),
            spec.chunks,
            created_at=spec.created_at,
        )

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def progress(self) -> float:
        return self.done / self.total if self.total else 1.0

    def add(self, chunk: ChunkResult) -> None:
        """Count a chunk (the store calls this once per chunk)."""
        self.succeeded += chunk.succeeded
        self.failed += chunk.failed
        self.chunks_done += 1
        room = MAX_LISTED_ERRORS - len(self.errors)
        if room > 0:
            self.errors.extend(chunk.errors[:room])
        if self.chunks_done == self.chunks and not self.state.finished:
            self.finish(
                JobState.failed if self.succeeded == 0 and self.total else JobState.succeeded
            )

    def finish(self, state: JobState, reason: str | None = None) -> None:
        self.state = state
        self.reason = reason
        self.finished_at = time.time()

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> JobStatus:
        data = orjson.loads(raw)
        data["state"] = JobState(data["state"])
        data["errors"] = [tuple(e) for e in data["errors"]]
        return cls(**data)


def result_line(index: int, **fields: Any) -> bytes:
    """One JSON line of a job's results; numpy arrays are written as float lists (shortest
    float32 form)."""
    return orjson.dumps({"index": index, **fields}, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def embedding_line(index: int, vector: np.ndarray) -> bytes:
    return result_line(index, embedding=np.ascontiguousarray(vector, dtype=np.float32))
