from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from asgi_lifespan import LifespanManager

from clipserve.api.app import create_app
from clipserve.testing import DeviceGate, FakeLoader


async def test_a_disconnected_clients_queued_work_is_dropped(
    make_settings: Callable[..., Any],
) -> None:
    gate = DeviceGate()
    loader = FakeLoader(before_forward=gate)
    app = create_app(make_settings(batching={"max_batch_size": 1}), loader=loader)
    async with LifespanManager(app) as manager:
        engine = app.state.engine
        await engine.embed_texts("fast", ["load the model"])
        backend = loader.loaded["fake-fast"]
        gate.close()
        body = json.dumps({"model": "fast", "input": ["held on the device", "queued"]}).encode()
        disconnect = asyncio.Event()
        sent: list[dict[str, Any]] = []
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/embeddings",
            "raw_path": b"/v1/embeddings",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"testserver")],
            "client": ("127.0.0.1", 1234),
            "server": ("testserver", 80),
        }
        call = asyncio.ensure_future(manager.app(scope, receive, send))
        await gate.entered()
        async with asyncio.timeout(10):
            while engine.batcher.stats().queue_size < 1:
                await asyncio.sleep(0.005)
        disconnect.set()  # the client goes away
        await asyncio.wait_for(call, 10)  # the handler was cancelled: the call returns at once
        assert sent == []  # nothing was sent to the departed client
        gate.open()
        counter = engine.metrics.batcher_requests_total.labels("fast", "text", "cancelled")
        async with asyncio.timeout(10):
            while counter._value.get() < 1:  # noqa: SLF001
                await asyncio.sleep(0.005)
        assert backend.forwards("text") == [1, 1]  # the warm-up, the held one; "queued" never ran
        http = engine.metrics.http_requests_total.labels("POST", "/v1/embeddings", "499")
        assert http._value.get() == 1  # noqa: SLF001


async def test_finished_requests_are_not_cancelled(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(), FakeLoader())
    responses = await asyncio.gather(
        *(client.post("/v1/embeddings", json={"model": "fast", "input": f"t{i}"}) for i in range(8))
    )
    assert {r.status_code for r in responses} == {200}
