"""POST /v1/jobs (JSON items, or an uploaded CSV), GET /v1/jobs/{id}, GET /v1/jobs/{id}/results
(JSON Lines, streamed), DELETE /v1/jobs/{id} (cancel)."""

from __future__ import annotations

import csv
import io
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.responses import StreamingResponse

from clipserve.api.deps import CallerDep, EngineDep, JobItemsDep
from clipserve.api.schemas.jobs import JobRequest, JobResponse, JobType
from clipserve.api.uploads import FILE_FIELD, TEXT_FIELD, MultipartRoute, multipart_body
from clipserve.engine.engine import Engine
from clipserve.errors import InvalidInputError, quote

router = APIRouter(tags=["jobs"])
upload_router = APIRouter(tags=["jobs"], route_class=MultipartRoute)

IMAGE_COLUMNS = ("image", "image_input", "image_path", "image_url", "url", "path")
TEXT_COLUMNS = ("text", "text_prompt", "caption", "prompt")
_MULTIPART = multipart_body(
    {
        "type": {"type": "string", "enum": ["embed", "score"]},
        "model": TEXT_FIELD,
        "file": FILE_FIELD,
    },
    required=["type", "file"],
)


async def _submit(
    engine: Engine,
    caller: str | None,
    kind: JobType,
    model: str | None,
    items: list[dict[str, str]],
    response: Response,
) -> JobResponse:
    name = engine.resolve_model(model)
    engine.registry.spec(name)  # an unknown model is refused now, not item by item later
    status = await engine.jobs.submit(kind, name, items, owner=caller or "local")
    response.headers["Location"] = f"/v1/jobs/{status.id}"
    return JobResponse.of(status)


@router.post("/v1/jobs", status_code=202, openapi_extra=_MULTIPART)
async def create_job(
    body: JobRequest,
    engine: EngineDep,
    caller: CallerDep,
    charge: JobItemsDep,
    response: Response,
) -> JobResponse:
    """Queue a scoring or embedding job; follow it at `/v1/jobs/{id}`."""
    await charge(len(body.items))
    items = [item.as_dict() for item in body.items]
    return await _submit(engine, caller, body.type, body.model, items, response)


@upload_router.post("/v1/jobs", status_code=202, include_in_schema=False)
async def create_job_from_csv(
    engine: EngineDep,
    caller: CallerDep,
    charge: JobItemsDep,
    response: Response,
    type: Annotated[JobType, Form()],
    file: Annotated[UploadFile, File()],
    model: Annotated[str | None, Form()] = None,
) -> JobResponse:
    """The same from a CSV upload with a header row: an image column (image, image_input,
    image_path, image_url, url or path) and/or a text column (text, text_prompt, caption or
    prompt). An embed job embeds the images, or the texts when there is no image column."""
    items = csv_items(await file.read(), type)
    await charge(len(items))
    return await _submit(engine, caller, type, model, items, response)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, engine: EngineDep, caller: CallerDep) -> JobResponse:
    return JobResponse.of(await engine.jobs.status(job_id, caller or "local"))


@router.get(
    "/v1/jobs/{job_id}/results",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def get_job_results(job_id: str, engine: EngineDep, caller: CallerDep) -> StreamingResponse:
    """One JSON line per finished item, in input order: `{"index", "embedding"}` or
    `{"index", "clip_score", "model_used", "text_truncated", "error"}`, or `{"index", "error"}`.
    While the job runs, the lines of the chunks finished so far (`X-Job-State` says which)."""
    status, lines = await engine.jobs.results(job_id, caller or "local")
    return StreamingResponse(
        lines,
        media_type="application/x-ndjson",
        headers={"X-Job-State": status.state.value, "X-Job-Done": str(status.done)},
    )


@router.delete("/v1/jobs/{job_id}")
async def cancel_job(job_id: str, engine: EngineDep, caller: CallerDep) -> JobResponse:
    """Cancel a queued or running job; a finished job is left as it is."""
    return JobResponse.of(await engine.jobs.cancel(job_id, caller or "local"))


def _column(header: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[n] for n in names if n in lowered), None)


def csv_items(data: bytes, kind: JobType) -> list[dict[str, str]]:
    """The items of a CSV upload (refusing, with the row, what cannot be an item)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"the CSV is not UTF-8 (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if not header:
        raise InvalidInputError("the CSV is empty: expected a header row, then one row per item")
    image, caption = _column(header, IMAGE_COLUMNS), _column(header, TEXT_COLUMNS)
    if kind == "score" and (image is None or caption is None):
        raise InvalidInputError(
            "a score job's CSV needs an image column and a text column; found: "
            + quote(", ".join(header), 200),
            detail={"image_columns": IMAGE_COLUMNS, "text_columns": TEXT_COLUMNS},
        )
    if image is None and caption is None:
        raise InvalidInputError(
            "an embed job's CSV needs an image or a text column; found: "
            + quote(", ".join(header), 200),
            detail={"image_columns": IMAGE_COLUMNS, "text_columns": TEXT_COLUMNS},
        )
    index = {name: i for i, name in enumerate(header)}
    wanted = [c for c in (image, caption) if c is not None]
    if kind == "embed":
        wanted = wanted[:1]  # the images, or the texts without an image column
    items: list[dict[str, str]] = []
    try:
        for row_number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            item = {}
            for column in wanted:
                position = index[column]
                value = row[position] if position < len(row) else ""
                if not value.strip():
                    raise InvalidInputError(f"CSV row {row_number}: the {column} column is empty")
                item["image" if column == image else "text"] = value
            items.append(item)
    except csv.Error as exc:
        raise InvalidInputError(f"the CSV could not be parsed: {quote(str(exc), 200)}") from None
    if not items:
        raise InvalidInputError("the CSV has a header but no rows")
    return items
