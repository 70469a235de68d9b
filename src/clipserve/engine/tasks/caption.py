"""Captions and visual question answering through generative models (``task: caption``).

A caption request answers per image: an image that cannot be fetched, decoded or described
carries its own error and the others are answered. What every image depends on fails the
request: the model, the decoding options, the prompt. A question gets one answer or raises.

Decoding options are checked against ``captions`` settings (``max_new_tokens_limit``,
``max_num_beams``, ``max_prompt_chars``) before any work: a request's cost is bounded by what it
may ask for. Images of one request share forward passes with other requests' (the model's
``caption`` or ``answer`` queue batches inputs of equal prompt and options together).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from clipserve.engine.core import EngineCore
from clipserve.engine.encoder import image_ref, text_problem
from clipserve.engine.tasks.embed import indexed
from clipserve.errors import ClipServeError, InvalidInputError
from clipserve.media import ImageInput
from clipserve.models.base import GenerationOptions, GenerativeTask


@dataclass(frozen=True, slots=True)
class Caption:
    index: int
    caption: str | None
    """None when the image failed."""
    error: ClipServeError | None = None


@dataclass(frozen=True, slots=True)
class Captions:
    model: str
    captions: tuple[Caption, ...]
    """In input order."""
    seconds: float
    """From the request's arrival at the engine to its last caption."""


@dataclass(frozen=True, slots=True)
class Answer:
    model: str
    answer: str
    seconds: float


class Captioning:
    def __init__(self, core: EngineCore) -> None:
        self._core = core

    def options(self, max_new_tokens: int | None, num_beams: int | None) -> GenerationOptions:
        """A request's decoding options, defaults filled in, refused outside the settings'
        bounds."""
        limits = self._core.settings.captions
        tokens = limits.max_new_tokens if max_new_tokens is None else max_new_tokens
        beams = 1 if num_beams is None else num_beams
        if not 1 <= tokens <= limits.max_new_tokens_limit:
            raise InvalidInputError(
                f"max_new_tokens must be between 1 and {limits.max_new_tokens_limit}",
                detail={"max_new_tokens_limit": limits.max_new_tokens_limit},
            )
        if not 1 <= beams <= limits.max_num_beams:
            raise InvalidInputError(
                f"num_beams must be between 1 (greedy decoding) and {limits.max_num_beams}",
                detail={"max_num_beams": limits.max_num_beams},
            )
        return GenerationOptions(max_new_tokens=tokens, num_beams=beams)

    def _checked_prompt(self, prompt: str | None, what: str) -> str | None:
        if prompt is None:
            return None
        problem = text_problem(prompt, self._core.settings.captions.max_prompt_chars)
        if problem is not None:
            raise indexed(problem, what)
        return prompt

    def resolve_model(self, model: str | None) -> str:
        return model or self._core.settings.captions.default_model

    async def caption(
        self,
        model: str | None,
        images: Sequence[ImageInput],
        *,
        prompt: str | None = None,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        client: str | None = None,
    ) -> Captions:
        """A caption per image, in order; an image that failed carries its error. ``prompt``:
        a text each caption continues (default: the model's ``prompt``, if any)."""
        if not images:
            raise InvalidInputError("send at least one image")
        options = self.options(max_new_tokens, num_beams)
        prompt = self._checked_prompt(prompt, "prompt")
        return await self._run("caption", model, images, prompt, options, client)

    async def answer(
        self,
        model: str | None,
        image: ImageInput,
        question: str,
        *,
        max_new_tokens: int | None = None,
        num_beams: int | None = None,
        client: str | None = None,
    ) -> Answer:
        """The model's answer to ``question`` about ``image``; raises the image's error."""
        options = self.options(max_new_tokens, num_beams)
        checked = self._checked_prompt(question, "question")
        result = await self._run("answer", model, [image], checked, options, client)
        (item,) = result.captions
        if item.error is not None:
            raise item.error
        return Answer(result.model, item.caption or "", result.seconds)

    async def _run(
        self,
        task: GenerativeTask,
        model: str | None,
        images: Sequence[ImageInput],
        prompt: str | None,
        options: GenerationOptions,
        client: str | None,
    ) -> Captions:
        core = self._core
        started = time.perf_counter()
        refs = [image_ref(image) for image in images]
        core.check_image_count(len({ref.key for ref in refs}))
        name = self.resolve_model(model)
        scope = core.scope(client=client)
        async with core.serving(name, (task,), scope) as handle:
            outcomes = await core.encoder.generate(
                handle, task, refs, scope, prompt=prompt, options=options
            )
        captions = []
        for i, ref in enumerate(refs):  # each carries its index: errors are not prefixed
            outcome = outcomes[ref.key]
            if isinstance(outcome, ClipServeError):
                captions.append(Caption(i, None, outcome))
            else:
                captions.append(Caption(i, outcome))
        return Captions(handle.name, tuple(captions), time.perf_counter() - started)
