from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from clipserve import errors as e
from clipserve.api.errors import register_error_handlers, status_for
from clipserve.api.middleware import RequestContextMiddleware
from clipserve.observability.metrics import Metrics


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (e.InvalidInputError("x"), 422),
        (e.UnsupportedModalityError("x"), 400),
        (e.InvalidImageError("x"), 400),
        (e.MediaAccessDeniedError("x"), 400),
        (e.MediaFetchError("x"), 400),
        (e.MediaUpstreamError("x"), 502),
        (e.MediaTooLargeError("x"), 413),
        (e.UnsupportedMediaTypeError("x"), 415),
        (e.ModelNotFoundError("m", []), 404),
        (e.ModelUnavailableError("m", "r"), 503),
        (e.EngineNotReadyError("x"), 503),
        (e.QueueFullError("x"), 429),
        (e.InferenceTimeoutError("x"), 504),
        (e.InferenceError("x"), 500),
        (e.ConfigError("x"), 422),
        (e.ClipServeError("x"), 500),
    ],
)
def test_every_error_maps_to_its_status(error: e.ClipServeError, status: int) -> None:
    assert status_for(error) == status


@pytest.fixture
def app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, metrics=Metrics())
    register_error_handlers(app)

    @app.get("/queue-full")
    async def queue_full() -> None:
        raise e.QueueFullError("too busy", retry_after_s=2.5)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("secret internals")

    return app


async def test_retry_after_is_rounded_up(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/queue-full")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json() == {"error": "too busy", "detail": None}


async def test_unexpected_errors_are_generic_500_with_request_id(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/bug", headers={"x-request-id": "req-42"})
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error", "detail": {"request_id": "req-42"}}
    assert "secret" not in response.text
