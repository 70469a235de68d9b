"""What one request did, gathered while it is served, for its access line and its spans.

:class:`~clipserve.api.middleware.RequestContextMiddleware` opens a :class:`RequestContext` per
request (:func:`request_context`); it lives in a context variable, so the engine, which never
sees the HTTP request, adds to it from wherever the request's work runs (its own task, or tasks
it starts: they copy the variable, and the object is shared). Outside a request (background
jobs, warm-up, tests calling the engine directly) there is none and every ``note_*`` is a no-op.

Only bounded values go in: model config names of the registry (``unknown`` for a name that does
not exist, as in the metric labels), counts and times; never inputs or client-chosen strings.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestContext:
    models: dict[str, None] = field(default_factory=dict)
    """The model config names the request used, in first-use order (a dict as an ordered set)."""
    cache_hits: int = 0
    """Embeddings served from the cache (memory, Redis, or an identical computation in flight)."""
    handler_returned_ns: int | None = None
    """When the route handler returned (epoch ns): the response's encoding starts there."""

    def log_fields(self) -> dict[str, Any]:
        """The access line's ``model`` (names joined by commas) and ``cache_hits``; nothing for
        a request that used no model (health, metrics)."""
        if not self.models:
            return {}
        return {"model": ",".join(self.models), "cache_hits": self.cache_hits}


_CURRENT: contextvars.ContextVar[RequestContext | None] = contextvars.ContextVar(
    "clipserve_request", default=None
)


@contextlib.contextmanager
def request_context() -> Iterator[RequestContext]:
    """A new request's context, current until the block ends."""
    context = RequestContext()
    token = _CURRENT.set(context)
    try:
        yield context
    finally:
        _CURRENT.reset(token)


def note_model(name: str) -> None:
    """The request uses model config ``name`` (a registry name or ``unknown``)."""
    context = _CURRENT.get()
    if context is not None:
        context.models[name] = None


def note_cache_hit() -> None:
    context = _CURRENT.get()
    if context is not None:
        context.cache_hits += 1


def note_handler_returned() -> None:
    context = _CURRENT.get()
    if context is not None:
        context.handler_returned_ns = time.time_ns()
