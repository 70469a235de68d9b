"""/v1/collections on the Milvus store (milvus-lite, the real engine, in a local file): the same
API as the local store, side by side with a local collection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clipserve.testing import FakeLoader

pytest.importorskip("pymilvus", reason="pymilvus is not installed")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed")


async def test_a_milvus_collection_serves_the_same_api(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    settings = make_settings(
        collections={"data_dir": tmp_path / "local", "milvus_uri": str(tmp_path / "milvus.db")}
    )
    client = await client_for(settings, FakeLoader())
    for name, store in (("remote", "milvus"), ("here", "local")):
        created = await client.post(
            "/v1/collections", json={"name": name, "model": "fast", "store": store}
        )
        assert created.status_code == 201, created.text
        assert created.json()["store"] == store
    items = [
        {"id": f"t{i}", "text": f"caption {i}", "metadata": {"even": i % 2 == 0}} for i in range(12)
    ]
    for name in ("remote", "here"):
        added = await client.post(f"/v1/collections/{name}/items", json={"items": items})
        assert added.json()["added"] == 12
    answers = {}
    for name in ("remote", "here"):
        response = await client.post(
            f"/v1/collections/{name}/search",
            json={"text": "caption 4", "top_k": 3, "filter": {"even": True}},
        )
        assert response.status_code == 200, response.text
        answers[name] = [(h["id"], round(h["score"], 4)) for h in response.json()["results"]]
    assert answers["remote"] == answers["here"]
    assert answers["remote"][0] == ("t4", 1.0)
    listed = (await client.get("/v1/collections")).json()["collections"]
    assert [(c["name"], c["store"], c["size"]) for c in listed] == [
        ("here", "local", 12),
        ("remote", "milvus", 12),
    ]
    taken = await client.post("/v1/collections", json={"name": "remote", "model": "fast"})
    assert taken.status_code == 409  # names are unique across stores
    assert (await client.delete("/v1/collections/remote/items/t4")).status_code == 200
    assert (await client.get("/v1/collections/remote")).json()["size"] == 11
    assert (await client.delete("/v1/collections/remote")).json() == {"deleted": "remote"}
    assert (await client.get("/v1/collections/remote")).status_code == 404
