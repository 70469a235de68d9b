"""The one place where errors become HTTP responses.

Every :class:`~clipserve.errors.ClipServeError` maps to a status and a ``{"error", "detail"}`` body.
Anything else is a bug: the client gets a generic 500 with the request id, the log gets the
traceback.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipserve import errors as e

logger = logging.getLogger(__name__)

# Most specific first: the first matching class wins.
_STATUS: tuple[tuple[type[e.ClipServeError], int], ...] = (
    (e.MediaTooLargeError, 413),
    (e.UnsupportedMediaTypeError, 415),
    (e.MediaUpstreamError, 502),
    (e.MediaError, 400),
    (e.UnsupportedModalityError, 400),
    (e.InvalidInputError, 422),
    (e.ModelNotFoundError, 404),
    (e.ModelUnavailableError, 503),
    (e.EngineNotReadyError, 503),
    (e.QueueFullError, 429),
    (e.InferenceTimeoutError, 504),
    (e.ConfigError, 422),
    (e.InferenceError, 500),
)


def status_for(exc: e.ClipServeError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": message, "detail": jsonable_encoder(detail)}


def _retry_after(exc: e.ClipServeError) -> dict[str, str]:
    seconds = getattr(exc, "retry_after_s", None)
    if seconds is None:
        return {}
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _clipserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.ClipServeError)
    status = status_for(exc)
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc.message)
    return JSONResponse(
        error_body(exc.message, exc.detail), status_code=status, headers=_retry_after(exc)
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]
    first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    return JSONResponse(
        error_body(f"request validation failed: {where}: {first['msg']}", problems),
        status_code=422,
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    return JSONResponse(
        error_body(message, {"path": request.url.path}),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = _request_id(request)
    logger.exception(
        "unhandled error on %s %s (request %s)", request.method, request.url.path, request_id
    )
    return JSONResponse(
        error_body("internal server error", {"request_id": request_id}), status_code=500
    )


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.ClipServeError, _clipserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
