"""The application factory: ``create_app(settings)`` is the only way an app is built."""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from clipserve import __version__
from clipserve.api.errors import error_before_routing, overloaded, register_error_handlers
from clipserve.api.middleware import (
    BodyLimitMiddleware,
    CancelOnDisconnectMiddleware,
    ConcurrencyLimitMiddleware,
    RequestContextMiddleware,
    time_handlers,
)
from clipserve.api.routes import (
    classify,
    collections,
    embeddings,
    evaluation,
    health,
    inference,
    jobs,
    models,
    rank,
    score,
    system,
    ui,
)
from clipserve.api.schemas.errors import ErrorResponse, OpenAIErrorResponse, error_responses
from clipserve.api.security import OPEN_PATHS, AccessMiddleware, Security
from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.engine.registry import BackendLoader
from clipserve.observability.metrics import Metrics
from clipserve.observability.tracing import Tracing

logger = logging.getLogger(__name__)

_DESCRIPTION = """
CLIP score (`max(100 * cos(image, text), 0)`), embeddings, ranking and zero-shot classification
for CLIP, SigLIP and sentence-transformers models, behind a dynamic batcher.

Errors are JSON `{"error": "...", "detail": ...}` with a meaningful status: 422 validation,
400/413/415 bad media, 404 unknown model, 429 overloaded (with `Retry-After`), 503 model
unavailable or shutting down, 504 deadline passed. `/v1/embeddings` answers errors in OpenAI's
shape (`{"error": {"message", "type", "param", "code"}}`).
"""


def create_app(
    settings: Settings,
    *,
    loader: BackendLoader | None = None,
    freeze_heap: bool = False,
    tracing: Tracing | None = None,
) -> FastAPI:
    """Build the app. ``loader`` replaces the real model loader (tests use a fake one).

    ``freeze_heap`` (what ``clipserve serve`` asks for: the process is the server's own): once
    started, everything start-up built (modules, models: ~500,000 objects) is kept out of the
    garbage collector's sight (:func:`gc.freeze`), so a full collection, triggered by requests that
    allocate many objects, no longer walks it: ~300 ms of stalled event loop each time before."""
    metrics = Metrics()
    if tracing is None:
        tracing = Tracing.from_exporter(settings.server.traces_exporter)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(settings, loader=loader, metrics=metrics, tracing=tracing)
        app.state.engine = engine
        await engine.start()
        if freeze_heap:
            gc.freeze()
        logger.info(
            "clipserve %s ready; models: %s", __version__, ", ".join(engine.registry.names())
        )
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(
        title="clipserve",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.security = security = Security(settings.auth, settings.rate_limit, metrics)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.server.max_body_bytes,
        timeout_s=settings.server.body_timeout_s,
    )
    app.add_middleware(CancelOnDisconnectMiddleware)
    if settings.server.max_concurrent_requests is not None:
        app.add_middleware(
            ConcurrencyLimitMiddleware,
            limit=settings.server.max_concurrent_requests,
            exempt=OPEN_PATHS,
            refuse=overloaded,
        )
    # API keys and request rates from the headers: before the concurrency limit and any body.
    app.add_middleware(AccessMiddleware, security=security, refuse=error_before_routing)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, tracing=tracing)  # outermost
    register_error_handlers(app)
    errors, openai_errors = error_responses(ErrorResponse), error_responses(OpenAIErrorResponse)
    routers = (
        evaluation.router,
        score.router,
        embeddings.router,
        # Multipart routes first: they match only multipart bodies, JSON falls through to the next.
        rank.upload_router,
        rank.router,
        classify.upload_router,
        classify.router,
        jobs.upload_router,
        jobs.router,
        collections.upload_router,
        collections.router,
        health.router,
        models.router,
        system.router,
    )
    # time_handlers: each handler notes its return (the response encoding span starts there).
    for router in routers:
        app.include_router(time_handlers(router), responses=errors)
    prefix = settings.server.inference_prefix  # the ML inference service's (seed 001) paths
    for router in (inference.upload_router, inference.router, system.inference_router):
        app.include_router(time_handlers(router), prefix=prefix, responses=errors)
    app.include_router(time_handlers(inference.qa_router), responses=errors)
    # The playground's static files (not in the OpenAPI schema).
    app.include_router(time_handlers(ui.router))
    app.include_router(time_handlers(embeddings.openai_router), responses=openai_errors)
    return app


SETTINGS_FILE_ENV = "CLIPSERVE_SETTINGS_FILE"
"""Where ``clipserve serve --workers N`` leaves the settings it built (flags included) for its
worker processes, each of which builds its app with :func:`worker_app`."""


def worker_app() -> FastAPI:
    """The app of one worker of ``clipserve serve --workers N`` (uvicorn's factory): the very
    settings the command built, read back from the file it named."""
    settings = Settings.model_validate_json(Path(os.environ[SETTINGS_FILE_ENV]).read_text())
    return create_app(settings, freeze_heap=True)
