"""POST /embed, the OpenAI-compatible POST /v1/embeddings, and image uploads to embed."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Form, UploadFile

from clipserve.api.deps import CallerDep, EngineDep, InputsDep, SettingsDep
from clipserve.api.errors import OpenAIRoute
from clipserve.api.schemas.embeddings import (
    CACHE_DESCRIPTION,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbedRequest,
    EmbedResponse,
    EncodingFormat,
    Usage,
)
from clipserve.api.schemas.inputs import to_content
from clipserve.api.security import counted_before_validation
from clipserve.api.uploads import read_uploads
from clipserve.engine.tasks.embed import Content, Embeddings
from clipserve.errors import InvalidInputError

router = APIRouter(tags=["embeddings"])
openai_router = APIRouter(tags=["embeddings"], route_class=OpenAIRoute)


def _encode(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    floats: list[float] = vector.tolist()
    return floats


def _response(embedded: Embeddings, encoding_format: EncodingFormat) -> EmbeddingsResponse:
    tokens = sum(embedded.token_counts)
    return EmbeddingsResponse(
        data=[
            EmbeddingData(index=i, embedding=_encode(row, encoding_format))
            for i, row in enumerate(embedded.vectors)
        ],
        model=embedded.model,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


def _contents(body: EmbeddingsRequest) -> list[Content]:
    items = [body.input] if isinstance(body.input, str) else body.input
    if not items:
        raise InvalidInputError("input must not be empty")
    if isinstance(items[0], int | list):
        raise InvalidInputError(
            "token-id inputs are not supported: send the text itself", detail={"param": "input"}
        )
    contents = [to_content(item, body.modality) for item in items]
    for i, content in enumerate(contents):
        if content.value == "":
            raise InvalidInputError(f"input[{i}] is an empty string")
    return contents


@router.post("/embed", response_model=EmbedResponse)
async def embed(
    body: EmbedRequest,
    engine: EngineDep,
    caller: CallerDep,
    settings: SettingsDep,
    inputs: InputsDep,
) -> EmbedResponse:
    """Embed one text with the default text model (setting `default_text_model`)."""
    await inputs(1, "inputs")
    embedded = await engine.embed(
        settings.text_model, [Content.text(body.input_text)], client=caller, cache=body.cache
    )
    return EmbedResponse(embedding=embedded.vectors[0].tolist(), model=embedded.model)


@openai_router.post(
    "/v1/embeddings",
    response_model=EmbeddingsResponse,
    dependencies=[Depends(counted_before_validation("input", "inputs"))],
)
async def create_embeddings(
    body: EmbeddingsRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> EmbeddingsResponse:
    """OpenAI-compatible embeddings of texts and images (errors in OpenAI's shape).

    Images: data URIs or URLs with `"modality": "image"`, or `{"image": ...}` /
    `{"type": "image_url", "image_url": {"url": ...}}` items (texts and images may be mixed)."""
    contents = _contents(body)
    await inputs(len(contents), "inputs")
    embedded = await engine.embed(
        body.model, contents, dimensions=body.dimensions, client=caller, cache=body.cache
    )
    return _response(embedded, body.encoding_format)


@router.post("/v1/embeddings/images", response_model=EmbeddingsResponse)
async def embed_uploaded_images(
    files: Annotated[list[UploadFile], File(description="One or more image files.")],
    engine: EngineDep,
    caller: CallerDep,
    settings: SettingsDep,
    inputs: InputsDep,
    model: Annotated[str | None, Form()] = None,
    encoding_format: Annotated[EncodingFormat, Form()] = "float",
    cache: Annotated[bool, Form(description=CACHE_DESCRIPTION)] = True,
) -> EmbeddingsResponse:
    """Embed uploaded image files (multipart/form-data); the response is shaped as
    `/v1/embeddings`'s, one embedding per file in upload order."""
    await inputs(len(files), "files")
    images = await read_uploads(files, settings.media)
    embedded = await engine.embed(
        model,
        [Content.image(data) for data in images],
        where=lambda i: f"files[{i}]",
        client=caller,
        cache=cache,
    )
    return _response(embedded, encoding_format)
