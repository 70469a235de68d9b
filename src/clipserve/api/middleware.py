"""Pure-ASGI middleware: request ids, HTTP metrics (labelled by route template, not raw path), the
access line and the request's server span, and cancelling the work of clients that went away."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.routing import APIRoute, APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipserve.observability.context import RequestContext, note_handler_returned, request_context
from clipserve.observability.logging import ACCESS_LOGGER
from clipserve.observability.metrics import Metrics
from clipserve.observability.tracing import Tracing

logger = logging.getLogger(__name__)
access = logging.getLogger(ACCESS_LOGGER)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLIENT_CLOSED_REQUEST = 499
"""Recorded (never sent) for requests whose client disconnected first (nginx's convention)."""


class RequestContextMiddleware:
    """Sets ``request.state.request_id`` (a sane ``X-Request-ID`` or a new uuid), echoes it, adds
    ``X-Process-Time-Ms``, records ``http_requests_total`` / ``http_request_duration_seconds``,
    opens the request's :class:`~clipserve.observability.context.RequestContext` (models used,
    cache hits), and writes the request's access line (with what the route left in
    ``state["log"]``). With tracing on, the request's server span and its ``response encoding``
    child (from the handler's return, see :func:`time_handlers`, to the response's start) are
    made here."""

    def __init__(self, app: ASGIApp, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.tracing = tracing or Tracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request_context() as context:
            await self._serve(scope, receive, send, context)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, context: RequestContext
    ) -> None:
        incoming = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        server_span: Any = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if context.handler_returned_ns is not None:
                    self.tracing.finished(
                        "response encoding", server_span, context.handler_returned_ns
                    )
                elapsed_ms = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                headers.append((b"x-process-time-ms", f"{elapsed_ms:.1f}".encode()))
                message["headers"] = headers
            await send(message)

        try:
            if self.tracing.on:
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                with self.tracing.request(scope["method"], scope["path"], headers) as span:
                    server_span = span
                    try:
                        await self.app(scope, receive, send_wrapper)
                    finally:  # named by the route template, as the metrics are
                        route = getattr(scope.get("route"), "path", None) or "unmatched"
                        span.update_name(f"{scope['method']} {route}")
                        span.set_attributes(
                            {
                                "http.route": route,
                                "http.status_code": status,
                                "request_id": request_id,
                            }
                        )
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            if scope["state"].get("client_disconnected"):
                status = CLIENT_CLOSED_REQUEST
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            if method not in _METHODS:  # a label never takes a value the client chose
                method = "other"
            self.metrics.http_requests_total.labels(method, endpoint, str(status)).inc()
            self.metrics.recent.record(status)
            elapsed = time.perf_counter() - started
            self.metrics.http_request_duration_seconds.labels(method, endpoint).observe(elapsed)
            if access.isEnabledFor(logging.INFO):
                access.info(
                    "%s %s %d %.1f ms",
                    method,
                    endpoint,
                    status,
                    elapsed * 1000,
                    extra={
                        "request_id": request_id,
                        "method": method,
                        "route": endpoint,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        **context.log_fields(),
                        **scope["state"].get("log", {}),
                    },
                )


def time_handlers(router: APIRouter) -> APIRouter:
    """Make each handler of ``router`` note when it returns, where its request's ``response
    encoding`` span starts: between a handler's return and the response, FastAPI validates and
    serialises what it returned, and has no public hook there. The router's routes are changed
    in place (our routers are module-level: the first app does it, later ones find it done), so
    call it before including the router: an app builds its routes from each route's
    ``endpoint``. The wrapper carries the handler's signature with its annotations evaluated
    (FastAPI reads the parameters from it, and would otherwise evaluate them in this module's
    namespace), so the app and its OpenAPI schema are the same. Only ``async def`` handlers (all
    of ours) are wrapped."""
    for route in router.routes:
        if not isinstance(route, APIRoute):
            continue
        handler = route.endpoint
        if not inspect.iscoroutinefunction(handler) or getattr(handler, _TIMED, False):
            continue
        try:
            route.endpoint = _noting_return(handler)
        except NameError as exc:  # an annotation that does not resolve: left as it is
            logger.debug("%s is not timed: %s", route.path, exc)
    return router


_TIMED = "_clipserve_notes_return"


def _noting_return(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(handler)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        result = await handler(*args, **kwargs)
        note_handler_returned()
        return result

    timed.__signature__ = inspect.signature(handler, eval_str=True)  # type: ignore[attr-defined]
    setattr(timed, _TIMED, True)
    return timed


class CancelOnDisconnectMiddleware:
    """Cancels a request's handler when its client disconnects before the response is complete.

    Once the request body has been read, a watcher waits for ``http.disconnect``; if it comes
    before the response is done, the request's task is cancelled, so its queued work is dropped
    before inference instead of being computed for nobody (work already on the device finishes).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_read = asyncio.Event()
        response_done = False
        disconnected = False

        async def receive_wrapper() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                body_read.set()
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal response_done
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                response_done = True
            await send(message)

        handler = asyncio.current_task()  # the request runs on this task; no second one
        assert handler is not None

        async def watch() -> None:
            nonlocal disconnected
            await body_read.wait()
            while not response_done:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not response_done:
                        disconnected = True
                        handler.cancel()
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except asyncio.CancelledError:
            if not disconnected:
                raise  # the server itself is cancelling us
            handler.uncancel()  # our own cancellation, handled here
            scope.setdefault("state", {})["client_disconnected"] = True
            logger.info(
                "client disconnected; cancelled %s %s", scope.get("method"), scope.get("path")
            )
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, without buffering them: a declared
    ``Content-Length`` over the limit is refused at the first read, and a body that streams past
    the limit (chunked, or a lying header) is cut off there. A compressed body (``Content-Encoding``
    other than identity) is refused with 415: what it would inflate to is unknown until inflated.
    A body that trickles in (slow-loris) gets 408 once ``timeout_s`` has passed since it started.
    The errors are raised from ``receive``, so they reach the app's one error mapping like any
    other."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def _too_large(self, size: str) -> HTTPException:
        return HTTPException(
            413, f"request body{size} is over the limit of {self.max_bytes} bytes (max_body_bytes)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        over = declared.isdigit() and int(declared) > self.max_bytes
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        compressed = encoding not in (b"", b"identity")
        seen = 0
        complete = False
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal seen, complete, deadline
            if compressed:
                shown = encoding[:40].decode("latin-1")
                raise HTTPException(
                    415,
                    f"request bodies with Content-Encoding '{shown}' are not accepted: send the "
                    "body uncompressed",
                )
            if over:
                raise self._too_large(f" of {int(declared)} bytes")
            if complete:
                return await receive()  # after the body: disconnect checks, no deadline
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s (body_timeout_s)",
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large("")
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests in progress; the next ones get 429 at once, before their body is
    read, so that refusing costs almost nothing and the work in progress keeps the CPU. A request
    counts once its body has arrived (at once when it has none): a slow-loris client trickling
    bodies in holds no slot (the body deadline ends it). Paths in ``exempt`` (health, readiness,
    metrics) are neither counted nor refused."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        exempt: frozenset[str],
        refuse: Callable[[Scope, str], Response],
    ) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt
        self.refuse = refuse
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.limit:
            message = (
                f"the server is overloaded: {self.in_progress} requests are in progress "
                f"(max_concurrent_requests {self.limit}); retry later"
            )
            await self.refuse(scope, message)(scope, receive, send)
            return
        counted = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.in_progress += 1

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                count()
            return message

        headers = dict(scope.get("headers") or [])
        if (
            headers.get(b"content-length", b"0") in (b"", b"0")
            and b"transfer-encoding" not in headers
        ):
            count()  # no body to wait for
        try:
            await self.app(scope, counting_receive, send)
        finally:
            if counted:
                self.in_progress -= 1
