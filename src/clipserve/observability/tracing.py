"""OpenTelemetry traces (the optional extra ``clipserve[otel]``), off unless
``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``); everything else (endpoint,
service name, sampler) is the SDK's own ``OTEL_*`` configuration.

A request gets a server span (a W3C ``traceparent`` it carries is its parent) with children for
each image's fetch + decode + preprocess, each input's wait in its batcher queue, its share of
the forward pass, and the ``response encoding`` (from the route handler's return to the start
of the response: FastAPI's validation and serialisation of the body). A forward pass is one
span of its own (a batch serves many requests), with the batch size and id as attributes and a
link to every request in it; each request's ``inference`` span links back to it. With tracing
off, every hook is one ``None`` check.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)


class Tracing:
    """The tracer of one app (or None): the spans clipserve opens, in one place."""

    def __init__(self, tracer: Any = None) -> None:
        self.tracer = tracer
        self._batch_ids = itertools.count(1)

    @classmethod
    def from_exporter(cls, exporter: str | None) -> Tracing:
        """A tracer exporting to ``exporter`` (``OTEL_TRACES_EXPORTER``); off when unset or
        ``none``, or when the OpenTelemetry SDK is not installed (said once in the log)."""
        if exporter is None or exporter.strip().lower() in ("", "none"):
            return cls()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        except ImportError:
            logger.warning("OTEL_TRACES_EXPORTER is set but opentelemetry-sdk is not installed")
            return cls()
        provider = TracerProvider(resource=Resource.create({"service.name": "clipserve"}))
        kind = exporter.strip().lower()
        if kind == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                logger.warning("OTEL_TRACES_EXPORTER=%s needs opentelemetry-exporter-otlp", kind)
                return cls()
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls.from_provider(provider)

    @classmethod
    def from_provider(cls, provider: Any) -> Tracing:
        return cls(provider.get_tracer("clipserve"))

    @property
    def on(self) -> bool:
        return self.tracer is not None

    # --- the request ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def request(self, method: str, path: str, headers: Mapping[str, str]) -> Iterator[Any]:
        """The server span of one request, current while it is served (None when off)."""
        if self.tracer is None:
            yield None
            return
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        parent = TraceContextTextMapPropagator().extract(headers)
        span = self.tracer.start_span(
            f"{method} {path}", context=parent, kind=trace.SpanKind.SERVER
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            yield span
        finally:
            context.detach(token)
            span.end()

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        """A child of the current span (a step of the request)."""
        if self.tracer is None:
            yield
            return
        with self.tracer.start_as_current_span(name, attributes=attributes):
            yield

    def finished(self, name: str, parent: Any, start_ns: int) -> None:
        """A child of span ``parent`` that began at ``start_ns`` (epoch ns) and ends now: a step
        timed from outside the code that ran it (the response's encoding)."""
        if self.tracer is None or parent is None:
            return
        from opentelemetry import trace

        context = trace.set_span_in_context(parent)
        self.tracer.start_span(name, context=context, start_time=start_ns).end()

    def current(self) -> Any:
        """The current context, kept with a queued item (None when off)."""
        if self.tracer is None:
            return None
        from opentelemetry import context

        return context.get_current()

    # --- a batch -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def batch(
        self, model: str, modality: str, items: Sequence[tuple[Any, float]]
    ) -> Iterator[None]:
        """Around one forward pass of ``items`` (each: the context its request queued it in,
        and how long it waited): their ``queue wait`` spans, the ``forward`` span, and each
        request's ``inference`` span linked to it."""
        if self.tracer is None:
            yield
            return
        from opentelemetry import trace
        from opentelemetry.context import Context

        start = time.time_ns()
        requests = [(ctx, trace.get_current_span(ctx).get_span_context()) for ctx, _ in items]
        for (ctx, waited), _ in zip(items, requests, strict=True):
            wait = self.tracer.start_span(
                "queue wait", context=ctx, start_time=start - int(waited * 1e9)
            )
            wait.end(end_time=start)
        attributes = {
            "clipserve.model": model,
            "clipserve.modality": modality,
            "clipserve.batch.size": len(items),
            "clipserve.batch.id": next(self._batch_ids),
        }
        links = [trace.Link(sc) for _, sc in requests if sc.is_valid]
        forward = self.tracer.start_span(
            "forward", context=Context(), attributes=attributes, links=links, start_time=start
        )
        try:
            yield
        finally:
            end = time.time_ns()
            forward.end(end_time=end)
            back = [trace.Link(forward.get_span_context())]
            for ctx, _ in requests:
                share = self.tracer.start_span(
                    "inference", context=ctx, attributes=attributes, links=back, start_time=start
                )
                share.end(end_time=end)
