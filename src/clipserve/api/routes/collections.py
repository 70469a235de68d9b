"""/v1/collections: create, list, inspect and delete vector collections; add (JSON or uploaded
images) and delete items; search by text, image or both."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, UploadFile

from clipserve.api.deps import CallerDep, EngineDep, InputsDep, SettingsDep
from clipserve.api.schemas.collections import (
    AddItemsRequest,
    AddItemsResponse,
    CollectionCreateRequest,
    CollectionListResponse,
    CollectionResponse,
    ItemError,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
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
from clipserve.engine.tasks.search import AddResult, Item, SearchResult
from clipserve.errors import InvalidInputError, ItemNotFoundError, quote

router = APIRouter(prefix="/v1/collections", tags=["collections"])
upload_router = APIRouter(
    prefix="/v1/collections", tags=["collections"], route_class=MultipartRoute
)


def _added(result: AddResult) -> AddItemsResponse:
    return AddItemsResponse(
        collection=result.collection,
        added=result.added,
        errors=[ItemError(index=i, id=id_, error=e.message) for i, id_, e in result.errors],
    )


def _found(result: SearchResult) -> SearchResponse:
    return SearchResponse(
        collection=result.collection,
        model=result.model,
        results=[SearchHit(id=h.id, score=h.score, metadata=dict(h.metadata)) for h in result.hits],
    )


@router.post("", status_code=201)
async def create_collection(body: CollectionCreateRequest, engine: EngineDep) -> CollectionResponse:
    """A new, empty collection for one model's embeddings."""
    created = await engine.collections.create(
        body.name,
        model=body.model,
        metric=body.metric,
        index=body.index,
        store=body.store,
        params=body.params,
    )
    return CollectionResponse.of(created)


@router.get("")
async def list_collections(engine: EngineDep) -> CollectionListResponse:
    return CollectionListResponse(
        collections=[CollectionResponse.of(c) for c in await engine.collections.all()]
    )


@router.get("/{name}")
async def get_collection(name: str, engine: EngineDep) -> CollectionResponse:
    return CollectionResponse.of(await engine.collections.get(name))


@router.delete("/{name}")
async def delete_collection(name: str, engine: EngineDep) -> dict[str, str]:
    await engine.collections.delete(name)
    return {"deleted": name}


_ITEMS_MULTIPART = multipart_body(
    {"files": FILES_FIELD, "ids": TEXTS_FIELD, "metadata": TEXTS_FIELD}, required=["files"]
)


@router.post(
    "/{name}/items",
    openapi_extra=_ITEMS_MULTIPART,
    dependencies=[Depends(counted_before_validation("items"))],
)
async def add_items(
    name: str, body: AddItemsRequest, engine: EngineDep, caller: CallerDep, inputs: InputsDep
) -> AddItemsResponse:
    """Embed the items with the collection's model and add them (an id that exists is replaced).
    An item that cannot be embedded is not added and is listed in `errors`. Also accepts
    multipart/form-data: image `files`, with optional `ids` and `metadata` (a JSON object) per
    file (default id: the file name)."""
    await inputs(len(body.items), "items")
    items = [i.item() for i in body.items]
    return _added(await engine.collections.add(name, items, client=caller))


@upload_router.post("/{name}/items", include_in_schema=False)
async def add_uploaded_items(
    name: str,
    engine: EngineDep,
    caller: CallerDep,
    settings: SettingsDep,
    inputs: InputsDep,
    files: Annotated[list[UploadFile], File()],
    ids: Annotated[list[str] | None, Form()] = None,
    metadata: Annotated[list[str] | None, Form()] = None,
) -> AddItemsResponse:
    await inputs(len(files), "files")
    ids = ids or [f.filename or f"file-{i}" for i, f in enumerate(files)]
    metadata = metadata or ["{}"] * len(files)
    if len(ids) != len(files) or len(metadata) != len(files):
        raise InvalidInputError(
            f"{len(files)} files need as many ids and metadata fields "
            f"(got {len(ids)} ids, {len(metadata)} metadata)"
        )
    data = await read_uploads(files, settings.media)
    items = [
        Item(id_, Content.image(raw), _metadata(meta, i))
        for i, (id_, raw, meta) in enumerate(zip(ids, data, metadata, strict=True))
    ]
    return _added(await engine.collections.add(name, items, client=caller))


def _metadata(raw: str, i: int) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except ValueError:
        raise InvalidInputError(f"metadata[{i}] is not JSON: {quote(raw, 100)}") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"metadata[{i}] must be a JSON object")
    return value


@router.delete("/{name}/items/{item_id}")
async def delete_item(name: str, item_id: str, engine: EngineDep) -> dict[str, str]:
    if not await engine.collections.delete_item(name, item_id):
        raise ItemNotFoundError(name, item_id)
    return {"deleted": item_id}


_SEARCH_MULTIPART = multipart_body(
    {
        "text": TEXT_FIELD,
        "file": FILE_FIELD,
        "text_weight": {"type": "number"},
        "top_k": {"type": "integer"},
        "filter": TEXT_FIELD,
    },
    required=[],
)


@router.post("/{name}/search", openapi_extra=_SEARCH_MULTIPART)
async def search(
    name: str, body: SearchRequest, engine: EngineDep, caller: CallerDep
) -> SearchResponse:
    """The `top_k` items nearest to a text, an image, or both (`text_weight` mixes their
    normalised embeddings), optionally filtered on metadata. Also accepts multipart/form-data
    with an image `file`."""
    result = await engine.collections.search(
        name,
        text=body.text,
        image=body.image,
        text_weight=body.text_weight,
        top_k=body.top_k,
        filter=body.filter,
        client=caller,
    )
    return _found(result)


@upload_router.post("/{name}/search", include_in_schema=False)
async def search_upload(
    name: str,
    engine: EngineDep,
    caller: CallerDep,
    settings: SettingsDep,
    file: Annotated[UploadFile | None, File()] = None,
    text: Annotated[str | None, Form()] = None,
    text_weight: Annotated[float, Form(ge=0, le=1)] = 0.5,
    top_k: Annotated[int, Form(ge=1)] = 10,
    filter: Annotated[str | None, Form()] = None,
) -> SearchResponse:
    image = await read_upload(file, settings.media, "file") if file is not None else None
    result = await engine.collections.search(
        name,
        text=text,
        image=image,
        text_weight=text_weight,
        top_k=top_k,
        filter=_metadata(filter, 0) if filter else None,
        client=caller,
    )
    return _found(result)
