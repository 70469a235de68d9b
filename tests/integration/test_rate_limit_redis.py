"""Rate limits shared through a real Redis (Debian's redis-server, started here on loopback)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from clipserve.testing import FakeLoader
from clipserve.testing.servers import free_port

EMBED = {"input_text": "hello"}


async def test_replicas_share_one_limit_through_redis(
    redis_url: str, client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(rate_limit={"requests": "3/minute", "storage_url": redis_url})
    first = await client_for(settings, FakeLoader())
    second = await client_for(settings, FakeLoader())  # another replica, same Redis
    statuses = [(await c.post("/embed", json=EMBED)).status_code for c in (first, second, first)]
    assert statuses == [200, 200, 200]
    limited = await second.post("/embed", json=EMBED)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert "3 per 1 minute requests for ip:127.0.0.1" in limited.json()["error"]


async def test_an_unreachable_redis_lets_requests_through_and_counts_it(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    client = await client_for(
        make_settings(rate_limit={"requests": "1/minute", "storage_url": url}), FakeLoader()
    )
    assert [(await client.post("/embed", json=EMBED)).status_code for _ in range(3)] == [200] * 3
    metrics = (await client.get("/metrics")).text
    assert "clipserve_rate_limit_storage_errors_total 3.0" in metrics
