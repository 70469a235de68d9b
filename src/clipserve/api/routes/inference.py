"""The ML inference service's endpoints (seed 001) under ``server.inference_prefix``
(``/api/v1``): POST /caption (JSON, or multipart/form-data with uploaded files), POST
/embed/image and POST /embed/text; and POST /v1/qa (an image and a question: an answer).

Captions answer per image (an image that fails carries its `error`); embeddings and answers fail
the request with the first failing input's error."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from clipserve.api.deps import CallerDep, EngineDep, InputsDep, SettingsDep
from clipserve.api.schemas.inference import (
    CaptionItem,
    CaptionRequest,
    CaptionResponse,
    EmbedImagesRequest,
    EmbedTextsRequest,
    QaRequest,
    QaResponse,
    Timing,
    VectorsResponse,
)
from clipserve.api.security import counted_before_validation
from clipserve.api.uploads import (
    FILES_FIELD,
    TEXT_FIELD,
    MultipartRoute,
    multipart_body,
    read_uploads,
)
from clipserve.engine.engine import Engine
from clipserve.engine.tasks.caption import Captions
from clipserve.engine.tasks.embed import Content
from clipserve.media import ImageInput

router = APIRouter(tags=["inference service"])
upload_router = APIRouter(tags=["inference service"], route_class=MultipartRoute)
qa_router = APIRouter(tags=["captions"])

_MULTIPART = multipart_body(
    {
        "files": FILES_FIELD,
        "model": TEXT_FIELD,
        "prompt": TEXT_FIELD,
        "max_new_tokens": {"type": "integer"},
        "num_beams": {"type": "integer"},
    },
    required=["files"],
)


def _timing(seconds: float, items: int) -> Timing:
    total = seconds * 1000
    return Timing(total_ms=round(total, 3), per_image_ms=round(total / max(1, items), 3))


def _captions(result: Captions) -> CaptionResponse:
    return CaptionResponse(
        model=result.model,
        captions=[
            CaptionItem(
                index=c.index,
                caption=c.caption,
                error=c.error.message if c.error is not None else None,
            )
            for c in result.captions
        ],
        timing=_timing(result.seconds, len(result.captions)),
    )


async def _caption(
    engine: Engine,
    caller: str | None,
    images: list[ImageInput],
    model: str | None,
    prompt: str | None,
    max_new_tokens: int | None,
    num_beams: int | None,
) -> CaptionResponse:
    result = await engine.caption(
        model,
        images,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        client=caller,
    )
    return _captions(result)


@router.post(
    "/caption",
    response_model=CaptionResponse,
    openapi_extra=_MULTIPART,
    dependencies=[Depends(counted_before_validation("images"))],
)
async def caption(
    body: CaptionRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> CaptionResponse:
    """Caption one image (`image`) or several (`images`) with a caption model (BLIP, BLIP-2, a
    remote OpenAI-compatible vision model): greedy or beam search, `max_new_tokens`, an optional
    conditional `prompt`. Each caption carries its `index`; an image that fails has its `error`.
    Also accepts multipart/form-data with the images as `files`."""
    images: list[ImageInput] = list(body.all_images)
    await inputs(len(images), "images")
    return await _caption(
        engine, caller, images, body.model, body.prompt, body.max_new_tokens, body.num_beams
    )


@upload_router.post("/caption", response_model=CaptionResponse, include_in_schema=False)
async def caption_uploads(
    files: Annotated[list[UploadFile], File()],
    engine: EngineDep,
    caller: CallerDep,
    settings: SettingsDep,
    inputs: InputsDep,
    model: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    max_new_tokens: Annotated[int | None, Form()] = None,
    num_beams: Annotated[int | None, Form()] = None,
) -> CaptionResponse:
    await inputs(len(files), "files")
    images: list[ImageInput] = list(await read_uploads(files, settings.media))
    return await _caption(engine, caller, images, model, prompt, max_new_tokens, num_beams)


async def _vectors(
    engine: Engine,
    caller: str | None,
    model: str | None,
    contents: list[Content],
    cache: bool,
    field: str,
) -> VectorsResponse:
    started = time.perf_counter()
    embedded = await engine.embed(
        model, contents, where=lambda i: f"{field}[{i}]", client=caller, cache=cache
    )
    return VectorsResponse(
        model=embedded.model,
        dimensions=int(embedded.vectors.shape[1]),
        embeddings=embedded.vectors.tolist(),
        timing=_timing(time.perf_counter() - started, len(contents)),
    )


@router.post(
    "/embed/image",
    response_model=VectorsResponse,
    dependencies=[Depends(counted_before_validation("images"))],
)
async def embed_images(
    body: EmbedImagesRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> VectorsResponse:
    """L2-normalised image embeddings, in input order (the first image that fails fails the
    request, naming it)."""
    await inputs(len(body.images), "images")
    contents = [Content.image(image) for image in body.images]
    return await _vectors(engine, caller, body.model, contents, body.cache, "images")


@router.post(
    "/embed/text",
    response_model=VectorsResponse,
    dependencies=[Depends(counted_before_validation("texts"))],
)
async def embed_texts(
    body: EmbedTextsRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> VectorsResponse:
    """L2-normalised text embeddings, in input order (texts over the context are truncated)."""
    await inputs(len(body.texts), "texts")
    contents = [Content.text(text) for text in body.texts]
    return await _vectors(engine, caller, body.model, contents, body.cache, "texts")


@qa_router.post("/v1/qa", response_model=QaResponse)
async def answer(body: QaRequest, engine: EngineDep, caller: CallerDep) -> QaResponse:
    """Visual question answering: an image and a question, the model's answer (BLIP VQA,
    BLIP-2, or a remote OpenAI-compatible vision model)."""
    result = await engine.answer(
        body.model,
        body.image,
        body.question,
        max_new_tokens=body.max_new_tokens,
        num_beams=body.num_beams,
        client=caller,
    )
    return QaResponse(
        model=result.model,
        question=body.question,
        answer=result.answer,
        timing=_timing(result.seconds, 1),
    )
