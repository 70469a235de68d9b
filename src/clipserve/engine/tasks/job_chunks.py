"""A job's chunk, run through the same tasks as a request: embed (:mod:`.embed`) or score
(:mod:`.evaluate`); every item gets its line, a result or its error."""

from __future__ import annotations

from clipserve.engine.core import EngineCore
from clipserve.engine.jobs.records import ChunkResult, JobSpec, embedding_line, result_line
from clipserve.engine.tasks.embed import Content, Embedding, image_refs, modalities_of
from clipserve.engine.tasks.evaluate import EvalItem, Evaluation
from clipserve.errors import ClipServeError


class JobChunks:
    """``await chunks(spec, index)``: the results of chunk ``index`` of ``spec``; raises a
    :class:`~clipserve.errors.ClipServeError` only when the whole chunk cannot run (its model
    is gone)."""

    def __init__(self, core: EngineCore, embedding: Embedding, evaluation: Evaluation) -> None:
        self._core = core
        self._embedding = embedding
        self._evaluation = evaluation

    async def __call__(self, spec: JobSpec, index: int) -> ChunkResult:
        start, items = spec.chunk(index)
        if spec.kind == "score":
            return await self._score(spec, index, start, items)
        return await self._embed(spec, index, start, items)

    async def _embed(
        self, spec: JobSpec, index: int, start: int, items: tuple[dict[str, str], ...]
    ) -> ChunkResult:
        core = self._core
        contents = [
            Content.text(item["text"]) if "text" in item else Content.image(item["image"])
            for item in items
        ]
        refs = image_refs(core, contents, lambda i: f"items[{start + i}]")
        scope = core.scope(None, spec.owner)
        async with core.serving(spec.model, modalities_of(contents), scope) as handle:
            outcomes = await self._embedding.encode(handle, contents, refs, scope)
        lines: list[bytes] = []
        errors: list[tuple[int, str]] = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, ClipServeError):
                errors.append((start + i, outcome.message))
                lines.append(result_line(start + i, error=outcome.message))
            else:
                lines.append(embedding_line(start + i, outcome.vector.numpy()))
        return ChunkResult(
            index, b"".join(lines), len(items) - len(errors), len(errors), tuple(errors)
        )

    async def _score(
        self, spec: JobSpec, index: int, start: int, items: tuple[dict[str, str], ...]
    ) -> ChunkResult:
        pairs = [EvalItem(item["image"], item["text"], spec.model) for item in items]
        results = await self._evaluation.run(pairs, client=spec.owner)
        lines: list[bytes] = []
        errors: list[tuple[int, str]] = []
        for i, result in enumerate(results):
            message = result.error.message if result.error is not None else None
            if message is not None:
                errors.append((start + i, message))
            lines.append(
                result_line(
                    start + i,
                    clip_score=result.score,
                    model_used=result.model,
                    text_truncated=result.text_truncated,
                    error=message,
                )
            )
        return ChunkResult(
            index, b"".join(lines), len(items) - len(errors), len(errors), tuple(errors)
        )
