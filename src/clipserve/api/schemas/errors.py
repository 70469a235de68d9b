"""The error bodies, as documented in OpenAPI for every route (the one mapping is api/errors.py)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    error: str = Field(description="What went wrong, for people.")
    detail: Any = Field(default=None, description="Structured context (validation problems...).")


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_error, server_error...")
    param: str | None = None
    code: str | None = Field(default=None, description="model_not_found, rate_limit_exceeded...")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIError


_STATUSES: dict[int, str] = {
    400: "Undecodable or refused media, or a model that cannot take this input",
    401: "API keys are required: none or a wrong one was sent",
    403: "An admin endpoint, and the key is not an admin key",
    404: "Unknown (or disabled) model, or no such job, collection or item",
    409: "A collection with this name already exists",
    413: "Request body or image too large",
    415: "Not an image type",
    422: "Validation failed, or a limit was exceeded",
    429: "Overloaded or rate limited (see Retry-After)",
    500: "Inference failed (the request id is in the detail and the log)",
    502: "The image's origin failed",
    503: "Model unavailable, or the server is shutting down (see Retry-After)",
    504: "The request's deadline passed",
}


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a router: every error status with its body."""
    return {status: {"model": model, "description": text} for status, text in _STATUSES.items()}
