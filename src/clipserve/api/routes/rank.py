"""POST /v1/rank: documents (texts or images) sorted by similarity to a query (text or image).

JSON, or multipart/form-data with uploaded images as the query or the documents."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, UploadFile

from clipserve.api.deps import CallerDep, EngineDep, InputsDep, SettingsDep
from clipserve.api.schemas.embeddings import Usage
from clipserve.api.schemas.inputs import to_content
from clipserve.api.schemas.retrieval import RankRequest, RankResponse, RankResult
from clipserve.api.security import counted_before_validation
from clipserve.api.uploads import (
    FILE_FIELD,
    FILES_FIELD,
    TEXT_FIELD,
    TEXTS_FIELD,
    MultipartRoute,
    multipart_body,
    read_upload,
    read_uploads,
)
from clipserve.engine.tasks.embed import Content
from clipserve.errors import InvalidInputError
from clipserve.media import describe

router = APIRouter(tags=["retrieval"])
upload_router = APIRouter(tags=["retrieval"], route_class=MultipartRoute)

_MULTIPART = multipart_body(
    {
        "model": TEXT_FIELD,
        "query": TEXT_FIELD,
        "query_file": FILE_FIELD,
        "documents": TEXTS_FIELD,
        "files": FILES_FIELD,
        "top_n": {"type": "integer", "minimum": 1},
        "return_documents": {"type": "boolean"},
    },
    required=[],
)


def _echo(content: Content) -> str | None:
    """What `return_documents` gives back: the text, or a short description of the image."""
    if isinstance(content.value, str):
        return content.value if content.modality == "text" else describe(content.value)
    return None  # uploaded bytes


async def _rank(
    engine: EngineDep,
    caller: str | None,
    model: str | None,
    query: Content,
    documents: list[Content],
    top_n: int | None,
    return_documents: bool,
) -> RankResponse:
    ranking = await engine.rank(model, query, documents, client=caller)
    ranked = [r for r in ranking.results if r.error is None][:top_n]
    failed = [r for r in ranking.results if r.error is not None]
    results = [
        RankResult(
            index=r.index,
            relevance_score=r.score,
            document=_echo(documents[r.index]) if return_documents else None,
            error=r.error.message if r.error else None,
        )
        for r in (*ranked, *failed)
    ]
    tokens = ranking.prompt_tokens
    return RankResponse(
        model=ranking.model,
        results=results,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
    )


@router.post(
    "/v1/rank",
    response_model=RankResponse,
    openapi_extra=_MULTIPART,
    dependencies=[Depends(counted_before_validation("documents"))],
)
async def rank(
    body: RankRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> RankResponse:
    """Rank documents by cosine similarity to the query; texts and images in any combination. A
    document that fails (bad image, empty text) is listed last with its `error`. Also accepts
    multipart/form-data: `query` or `query_file`, and `documents` or `files`."""
    await inputs(len(body.documents), "documents")
    return await _rank(
        engine,
        caller,
        body.model,
        to_content(body.query, body.query_modality),
        [to_content(d, body.documents_modality) for d in body.documents],
        body.top_n,
        body.return_documents,
    )


@upload_router.post("/v1/rank", response_model=RankResponse, include_in_schema=False)
async def rank_uploads(
    engine: EngineDep,
    caller: CallerDep,
    settings: SettingsDep,
    inputs: InputsDep,
    model: Annotated[str | None, Form()] = None,
    query: Annotated[str | None, Form(min_length=1)] = None,
    query_file: Annotated[UploadFile | None, File()] = None,
    documents: Annotated[list[str] | None, Form()] = None,
    files: Annotated[list[UploadFile] | None, File()] = None,
    top_n: Annotated[int | None, Form(ge=1)] = None,
    return_documents: Annotated[bool, Form()] = False,
) -> RankResponse:
    if query_file is not None and query is None:
        query_content = Content.image(await read_upload(query_file, settings.media, "query_file"))
    elif query is not None and query_file is None:
        query_content = Content.text(query)
    else:
        raise InvalidInputError("send exactly one of 'query' (a text) or 'query_file' (an image)")
    if bool(documents) == bool(files):
        raise InvalidInputError(
            "send the documents as 'documents' (texts) or as 'files' (images): exactly one"
        )
    await inputs(len(documents or files or []), "documents")
    if documents:
        contents = [Content.text(d) for d in documents]
    else:
        contents = [Content.image(b) for b in await read_uploads(files or [], settings.media)]
    return await _rank(engine, caller, model, query_content, contents, top_n, return_documents)
