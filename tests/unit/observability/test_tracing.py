"""Traces with the SDK's in-memory exporter: a real request's span tree (server span under the
client's traceparent; fetch/decode, queue wait, inference and response encoding children; one
forward span per batch linked from every request in it)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import pytest

from clipserve.observability.tracing import Tracing
from clipserve.testing import FakeLoader

sdk = pytest.importorskip("opentelemetry.sdk.trace", reason="opentelemetry-sdk is not installed")
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_a_request_span_tree_and_a_shared_batch(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    photo_bytes: Callable[..., bytes],
) -> None:
    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    import httpx
    from asgi_lifespan import LifespanManager

    from clipserve.api.app import create_app

    app = create_app(make_settings(), loader=FakeLoader(), tracing=Tracing.from_provider(provider))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            uri = "data:image/png;base64," + base64.b64encode(photo_bytes("coffee", "PNG")).decode()
            headers = {"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
            response = await client.post(
                "/v1/embeddings", json={"model": "fast", "input": [{"image": uri}]}, headers=headers
            )
            assert response.status_code == 200
            together = await asyncio.gather(
                *(
                    client.post("/v1/embeddings", json={"model": "fast", "input": f"t{i}"})
                    for i in range(4)
                )
            )
            assert all(r.status_code == 200 for r in together)
            missing = await client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
            assert missing.status_code == 404
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.name == "POST /v1/embeddings" and s.parent is not None]
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT
    assert server.attributes["http.status_code"] == 200
    children = {
        s.name: s
        for s in spans
        if s.parent is not None and s.parent.span_id == server.context.span_id
    }
    assert set(children) >= {
        "fetch, decode, preprocess",
        "queue wait",
        "inference",
        "response encoding",
    }
    inference = children["inference"]
    # The body is encoded after the handler returned, i.e. after its inference, and before the
    # server span ends.
    encoding = children["response encoding"]
    assert inference.end_time <= encoding.start_time <= encoding.end_time <= server.end_time
    (forward,) = [s for s in spans if s.context.span_id == inference.links[0].context.span_id]
    assert forward.name == "forward"
    assert forward.attributes["clipserve.batch.size"] == 1
    assert forward.attributes["clipserve.modality"] == "image"
    assert forward.links[0].context.span_id == server.context.span_id
    text_forwards = [
        s for s in spans if s.name == "forward" and s.attributes["clipserve.modality"] == "text"
    ]
    linked = sum(len(s.links) for s in text_forwards)
    assert linked == 4  # every text request is linked from the batch that served it
    assert sum(s.attributes["clipserve.batch.size"] for s in text_forwards) == 4
    servers = [s for s in spans if s.name == "POST /v1/embeddings"]
    encodings = [s for s in spans if s.name == "response encoding"]
    assert len(servers) == 6
    assert len(encodings) == 5  # one per answered request, each under its own server span
    assert {s.parent.span_id for s in encodings if s.parent} == {
        s.context.span_id for s in servers if s.attributes["http.status_code"] == 200
    }


def test_tracing_is_off_unless_an_exporter_is_named() -> None:
    assert not Tracing.from_exporter(None).on
    assert not Tracing.from_exporter("none").on
    assert Tracing.from_exporter("console").on
