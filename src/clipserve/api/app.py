"""The application factory: ``create_app(settings)`` is the only way an app is built."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from clipserve import __version__
from clipserve.api.errors import register_error_handlers
from clipserve.api.middleware import RequestContextMiddleware
from clipserve.api.routes import evaluation, models, system
from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.engine.registry import BackendLoader
from clipserve.observability.metrics import Metrics

logger = logging.getLogger(__name__)

_DESCRIPTION = """
CLIP score (`max(100 * cos(image, text), 0)`) and embeddings for CLIP, SigLIP and
sentence-transformers models. Errors are JSON `{"error": "...", "detail": ...}` with a meaningful
status: 422 validation, 400/413/415 bad media, 404 unknown model, 503 model unavailable.
"""


def create_app(settings: Settings, *, loader: BackendLoader | None = None) -> FastAPI:
    """Build the app. ``loader`` replaces the real model loader (tests use a fake one)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(settings, loader=loader, metrics=metrics)
        app.state.engine = engine
        await engine.start()
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
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    register_error_handlers(app)
    app.include_router(evaluation.router)
    app.include_router(models.router)
    app.include_router(system.router)
    return app
