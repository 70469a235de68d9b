"""POST /v1/classify: zero-shot image classification against text labels.

JSON, or multipart/form-data with uploaded image files."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from clipserve.api.deps import CallerDep, EngineDep, InputsDep, SettingsDep
from clipserve.api.schemas.inputs import ImageItem
from clipserve.api.schemas.retrieval import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    LabelResult,
)
from clipserve.api.security import counted_before_validation
from clipserve.api.uploads import (
    FILES_FIELD,
    TEXT_FIELD,
    TEXTS_FIELD,
    MultipartRoute,
    multipart_body,
    read_uploads,
)
from clipserve.errors import InvalidInputError, quote
from clipserve.media import ImageInput

router = APIRouter(tags=["retrieval"])
upload_router = APIRouter(tags=["retrieval"], route_class=MultipartRoute)

_MULTIPART = multipart_body(
    {"model": TEXT_FIELD, "files": FILES_FIELD, "labels": TEXTS_FIELD, "template": TEXT_FIELD},
    required=["files", "labels"],
)


async def _classify(
    engine: EngineDep,
    caller: str | None,
    model: str | None,
    images: list[ImageInput],
    labels: list[str],
    template: str,
) -> ClassifyResponse:
    rows = await engine.classify(model, images, labels, template, client=caller)
    return ClassifyResponse(
        model=engine.resolve_model(model),
        data=[
            Classification(
                index=i,
                top_label=row.labels[0].label if row.labels else None,
                labels=[
                    LabelResult(  # a long label is echoed short: its index names it
                        index=s.index,
                        label=quote(s.label),
                        score=s.score,
                        probability=s.probability,
                    )
                    for s in row.labels
                ],
                error=row.error.message if row.error else None,
            )
            for i, row in enumerate(rows)
        ],
    )


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    openapi_extra=_MULTIPART,
    dependencies=[Depends(counted_before_validation("input", "images"))],
)
async def classify(
    body: ClassifyRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> ClassifyResponse:
    """Per image, each label's cosine score and probability (softmax over logit_scale*cos across
    the labels for CLIP, an independent sigmoid for SigLIP), most probable first; an image that
    fails carries its `error`. Label prompts (template with the label in place of `{}`) are cached
    per model."""
    items = body.input if isinstance(body.input, list) else [body.input]
    if not items:
        raise InvalidInputError("input must hold at least one image")
    await inputs(len(items), "images")
    images: list[ImageInput] = [i.reference if isinstance(i, ImageItem) else i for i in items]
    return await _classify(engine, caller, body.model, images, body.labels, body.template)


def _labels(values: list[str]) -> list[str]:
    """Repeated `labels` fields, or one field holding a JSON array."""
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as exc:
            raise InvalidInputError(f"labels: not a valid JSON array: {exc.msg}") from exc
        if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
            raise InvalidInputError("labels: the JSON value must be an array of strings")
        return parsed
    return values


@upload_router.post("/v1/classify", response_model=ClassifyResponse, include_in_schema=False)
async def classify_uploads(
    files: Annotated[list[UploadFile], File()],
    labels: Annotated[list[str], Form()],
    engine: EngineDep,
    caller: CallerDep,
    settings: SettingsDep,
    inputs: InputsDep,
    model: Annotated[str | None, Form()] = None,
    template: Annotated[str, Form(min_length=2, max_length=500)] = "a photo of a {}",
) -> ClassifyResponse:
    parsed = _labels(labels)
    await inputs(len(files), "images")
    images: list[ImageInput] = list(await read_uploads(files, settings.media))
    return await _classify(engine, caller, model, images, parsed, template)
