"""Jobs through a real Redis (Debian's redis-server on loopback): replicas share them, and a job
survives its server stopping mid-way (another one finishes it, each item counted once)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from clipserve.api.app import create_app
from clipserve.testing import FakeLoader


async def until(
    client: httpx.AsyncClient, job_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    for _ in range(3000):
        body: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if done(body):
            return body
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} never got there: {body}")


def finished(body: dict[str, Any]) -> bool:
    return body["state"] in ("succeeded", "failed", "cancelled")


async def test_replicas_share_jobs_through_redis(
    redis_url: str, client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(jobs={"redis_url": redis_url, "chunk_size": 4})
    first = await client_for(settings, FakeLoader())
    second = await client_for(settings, FakeLoader())
    items = [{"text": f"caption {i}"} for i in range(10)]
    job = (await first.post("/v1/jobs", json={"type": "embed", "items": items})).json()
    done = await until(second, job["id"], finished)
    assert done["state"] == "succeeded"
    assert done["counts"]["succeeded"] == 10
    rows = [
        json.loads(line)
        for line in (await second.get(f"/v1/jobs/{job['id']}/results")).text.splitlines()
    ]
    assert [r["index"] for r in rows] == list(range(10))
    assert all(len(r["embedding"]) == len(rows[0]["embedding"]) > 0 for r in rows)
    cancelled = await second.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.json()["state"] == "succeeded"  # finished: left as it is


async def test_a_job_survives_its_server_stopping(
    redis_url: str, make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(jobs={"redis_url": redis_url, "chunk_size": 2, "max_running": 1})
    items = [{"text": f"caption {i}"} for i in range(400)]

    async def serve() -> tuple[LifespanManager, httpx.AsyncClient]:
        manager = LifespanManager(create_app(settings, loader=FakeLoader()), startup_timeout=60)
        await manager.__aenter__()
        transport = httpx.ASGITransport(app=manager.app)
        return manager, httpx.AsyncClient(transport=transport, base_url="http://testserver")

    manager, client = await serve()
    job = (await client.post("/v1/jobs", json={"type": "embed", "items": items})).json()
    midway = await until(client, job["id"], lambda b: b["counts"]["done"] >= 4)
    await client.aclose()
    await manager.__aexit__(None, None, None)  # a graceful stop, mid-job
    assert not finished(midway)

    manager, client = await serve()  # "after the restart": the same Redis, a new process
    try:
        done = await until(client, job["id"], finished)
        assert done["state"] == "succeeded"
        assert done["counts"] == {"total": 400, "done": 400, "succeeded": 400, "failed": 0}
        response = await client.get(f"/v1/jobs/{job['id']}/results")
        indices = [json.loads(line)["index"] for line in response.text.splitlines()]
        assert indices == list(range(400))  # each item once, in order
    finally:
        await client.aclose()
        await manager.__aexit__(None, None, None)
