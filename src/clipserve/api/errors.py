"""The one place where errors become HTTP responses.

Every :class:`~clipserve.errors.ClipServeError` maps to a status and a ``{"error", "detail"}`` body;
on OpenAI-compatible routes (those built with :class:`OpenAIRoute`) the body is OpenAI's error
object ``{"error": {"message", "type", "param", "code"}}`` instead, so the ``openai`` client raises
the right exception. Anything else is a bug: the client gets a generic 500 with the request id, the
log gets the traceback.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipserve import errors as e
from clipserve.errors import quote

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
    (e.JobNotFoundError, 404),
    (e.CollectionNotFoundError, 404),
    (e.ItemNotFoundError, 404),
    (e.CollectionConflictError, 409),
    (e.ModelUnavailableError, 503),
    (e.EngineNotReadyError, 503),
    (e.QueueFullError, 429),
    (e.RateLimitedError, 429),
    (e.AuthenticationError, 401),
    (e.ForbiddenError, 403),
    (e.InferenceTimeoutError, 504),
    (e.ConfigError, 422),
    (e.InferenceError, 500),
    (e.IndexBackendError, 503),
)


class ErrorJSONResponse(JSONResponse):
    """Error bodies are ASCII-escaped JSON: they may quote client input (a model name...), and a
    lone surrogate in it must not make the error itself fail to render."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class OpenAIRoute(APIRoute):
    """A route whose errors take OpenAI's shape."""

    error_style = "openai"


def _openai_style(request: Request) -> bool:
    return getattr(request.scope.get("route"), "error_style", None) == "openai"


def _openai_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 401:
        return "authentication_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


_OPENAI_CODES: tuple[tuple[type[e.ClipServeError], str], ...] = (
    (e.ModelNotFoundError, "model_not_found"),
    (e.ModelUnavailableError, "model_unavailable"),
    (e.QueueFullError, "rate_limit_exceeded"),
    (e.RateLimitedError, "rate_limit_exceeded"),
    (e.AuthenticationError, "invalid_api_key"),
    (e.InferenceTimeoutError, "timeout"),
    (e.MediaError, "invalid_image"),
)


def _openai_code(exc: e.ClipServeError) -> str | None:
    return next((c for cls, c in _OPENAI_CODES if isinstance(exc, cls)), None)


def _respond(
    request: Request,
    status: int,
    message: str,
    detail: Any = None,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return _error_response(
        _openai_style(request), status, message, detail, code=code, headers=headers
    )


def _error_response(
    openai: bool,
    status: int,
    message: str,
    detail: Any = None,
    *,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    message = quote(message, MAX_MESSAGE)
    if openai:
        body: dict[str, Any] = {
            "error": {
                "message": message,
                "type": _openai_type(status),
                "param": None,
                "code": code or str(status),
            }
        }
    else:
        body = error_body(message, detail)
    return ErrorJSONResponse(body, status_code=status, headers=headers)


OPENAI_PATHS = frozenset({"/v1/embeddings"})
MAX_MESSAGE = 2000
"""The longest error message sent (a safety net: messages quote client input short already)."""


def error_before_routing(scope: Any, exc: e.ClipServeError) -> JSONResponse:
    """The response to an error a middleware raises before routing (API keys, rate limits, the
    concurrency limit): the path picks the body's shape."""
    return _error_response(
        scope.get("path") in OPENAI_PATHS,
        status_for(exc),
        exc.message,
        exc.detail,
        code=_openai_code(exc),
        headers=_headers(exc),
    )


def overloaded(scope: Any, message: str) -> JSONResponse:
    """The 429 of the concurrency limit."""
    return error_before_routing(scope, e.QueueFullError(message, retry_after_s=1.0))


def status_for(exc: e.ClipServeError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": message, "detail": jsonable_encoder(detail)}


def retry_after(seconds: float | None) -> dict[str, str]:
    """The ``Retry-After`` header for a wait of ``seconds`` (whole seconds, rounded up, at least
    1); none when the wait is unknown."""
    return {} if seconds is None else {"Retry-After": str(max(1, math.ceil(seconds)))}


def _headers(exc: e.ClipServeError) -> dict[str, str]:
    headers = retry_after(getattr(exc, "retry_after_s", None))
    if isinstance(exc, e.AuthenticationError):
        headers["WWW-Authenticate"] = 'Bearer realm="clipserve"'
    return headers


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _clipserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.ClipServeError)
    status = status_for(exc)
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc.message)
    code = _openai_code(exc)
    return _respond(request, status, exc.message, exc.detail, code=code, headers=_headers(exc))


MAX_PROBLEMS = 20
"""Validation problems listed in a 422 (then only their count): 5000 bad items must not make a
megabyte of errors."""


def _problem(err: Mapping[str, Any]) -> dict[str, Any]:
    """One validation problem, without the input and with every client-chosen part quoted short
    (a field name in ``loc`` may be a megabyte long)."""
    loc = [p if isinstance(p, int) else quote(str(p), 100) for p in err.get("loc", ())]
    return {"loc": loc, "msg": quote(str(err.get("msg", ""))), "type": err.get("type", "")}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    problems = [_problem(err) for err in errors[:MAX_PROBLEMS]]
    first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    more = ""
    if len(errors) > MAX_PROBLEMS:
        more = f" (and {len(errors) - 1} more problems; the detail lists the first {MAX_PROBLEMS})"
    elif len(errors) > 1:
        more = f" (and {len(errors) - 1} more problems)"
    return _respond(
        request,
        422,
        f"request validation failed: {where}: {first['msg']}{more}",
        problems,
        code="invalid_request",
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
    return _respond(
        request,
        exc.status_code,
        message,
        {"path": request.url.path},
        headers=dict(exc.headers) if exc.headers else None,
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = _request_id(request)
    logger.exception(
        "unhandled error on %s %s (request %s)", request.method, request.url.path, request_id
    )
    return _respond(request, 500, "internal server error", {"request_id": request_id})


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.ClipServeError, _clipserve_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
