"""/v1/collections over the fake backend: the collection life cycle, items by JSON and upload,
searches by text, image and both, filters, persistence across a restart, and clear errors."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from clipserve.api.app import create_app
from clipserve.testing import FakeLoader

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture
async def client(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    return await client_for(make_settings(), FakeLoader())


@pytest.fixture
def uris(photo_bytes: Callable[..., bytes]) -> dict[str, str]:
    return {
        name: "data:image/png;base64," + base64.b64encode(photo_bytes(name, "PNG")).decode()
        for name in PHOTOS
    }


async def create(client: Any, name: str = "photos", **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/collections", json={"name": name, "model": "fast", **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def search(client: Any, name: str, **query: Any) -> list[dict[str, Any]]:
    response = await client.post(f"/v1/collections/{name}/search", json=query)
    assert response.status_code == 200, response.text
    results: list[dict[str, Any]] = response.json()["results"]
    return results


async def test_a_photo_finds_itself_first_and_a_caption_finds_its_text(
    client: Any, uris: dict[str, str]
) -> None:
    created = await create(client, index="hnsw")
    assert (created["size"], created["dim"], created["store"], created["index"]) == (
        0,
        16,
        "local",
        "hnsw",
    )
    items = [{"id": n, "image": uris[n], "metadata": {"kind": "photo", "name": n}} for n in PHOTOS]
    items += [
        {"id": f"caption-{n}", "text": f"a photo of {n}", "metadata": {"kind": "caption"}}
        for n in PHOTOS
    ]
    added = await client.post("/v1/collections/photos/items", json={"items": items})
    assert added.json() == {"collection": "photos", "added": 8, "errors": []}
    for name in PHOTOS:
        (best, *_) = await search(client, "photos", image=uris[name], top_k=3)
        assert best["id"] == name
        assert best["score"] == pytest.approx(1.0, abs=1e-5)
        assert best["metadata"] == {"kind": "photo", "name": name}
        (text_best, *_) = await search(client, "photos", text=f"a photo of {name}", top_k=3)
        assert text_best["id"] == f"caption-{name}"
    captions = await search(
        client, "photos", image=uris["coffee"], top_k=4, filter={"kind": "caption"}
    )
    assert len(captions) == 4
    assert all(hit["id"].startswith("caption-") for hit in captions)
    info = (await client.get("/v1/collections/photos")).json()
    assert info["size"] == 8
    assert info["memory_bytes"] > 0


async def test_a_multimodal_query_mixes_the_two_embeddings(
    client: Any, uris: dict[str, str]
) -> None:
    await create(client)
    items = [{"id": "img", "image": uris["rocket"]}, {"id": "txt", "text": "a red rocket"}]
    await client.post("/v1/collections/photos/items", json={"items": items})
    image_side = await search(
        client, "photos", text="a red rocket", image=uris["rocket"], text_weight=0.0, top_k=2
    )
    text_side = await search(
        client, "photos", text="a red rocket", image=uris["rocket"], text_weight=1.0, top_k=2
    )
    assert image_side[0]["id"] == "img"
    assert image_side[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert text_side[0]["id"] == "txt"
    assert text_side[0]["score"] == pytest.approx(1.0, abs=1e-5)
    both = await search(client, "photos", text="a red rocket", image=uris["rocket"], top_k=2)
    scores = {hit["id"]: hit["score"] for hit in both}
    assert scores["img"] < 1.0
    assert scores["txt"] < 1.0


async def test_items_are_upserted_deleted_and_failed_items_reported(client: Any) -> None:
    await create(client, name="texts", metric="ip")
    items = [
        {"id": "a", "text": "first"},
        {"id": "b", "text": " "},
        {"id": "c", "image": "missing.png"},
    ]
    added = (await client.post("/v1/collections/texts/items", json={"items": items})).json()
    assert added["added"] == 1
    assert [(e["index"], e["id"]) for e in added["errors"]] == [(1, "b"), (2, "c")]
    assert added["errors"][0]["error"] == "the text is empty (or only whitespace)"
    again = await client.post(
        "/v1/collections/texts/items", json={"items": [{"id": "a", "text": "second"}]}
    )
    assert again.json()["added"] == 1
    (hit,) = await search(client, "texts", text="second", top_k=1)
    assert hit["id"] == "a"  # replaced, not duplicated
    assert (await client.get("/v1/collections/texts")).json()["size"] == 1
    assert (await client.delete("/v1/collections/texts/items/a")).json() == {"deleted": "a"}
    gone = await client.delete("/v1/collections/texts/items/a")
    assert gone.status_code == 404
    assert gone.json()["error"] == "collection 'texts' has no item 'a'"


async def test_uploads_add_items_and_search_by_file(
    client: Any, photo_bytes: Callable[..., bytes]
) -> None:
    await create(client)
    files = [("files", (f"{n}.png", photo_bytes(n, "PNG"), "image/png")) for n in PHOTOS[:2]]
    added = await client.post(
        "/v1/collections/photos/items", files=files, data={"metadata": ['{"n": 1}', '{"n": 2}']}
    )
    assert added.status_code == 200, added.text
    assert added.json()["added"] == 2
    found = await client.post(
        "/v1/collections/photos/search",
        files={"file": ("q.png", photo_bytes("coffee", "PNG"), "image/png")},
        data={"top_k": "1"},
    )
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["id"] == "coffee.png"
    assert found.json()["results"][0]["metadata"] == {"n": 2}
    bad = await client.post("/v1/collections/photos/items", files=files, data={"ids": ["only-one"]})
    assert bad.status_code == 422
    assert "2 files need as many ids" in bad.json()["error"]


async def test_collections_survive_a_restart(
    make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    settings = make_settings(collections={"data_dir": tmp_path / "data", "save_interval_s": 3600})

    @contextlib.asynccontextmanager
    async def serving() -> AsyncIterator[httpx.AsyncClient]:
        async with LifespanManager(create_app(settings, loader=FakeLoader())) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                yield client

    async with serving() as first:
        await create(first, name="kept", index="ivf-pq")
        items = [{"id": f"x{i}", "text": f"kept text {i}", "metadata": {"i": i}} for i in range(30)]
        await first.post("/v1/collections/kept/items", json={"items": items})
        before = await search(first, "kept", text="kept text 7", top_k=3)
    async with serving() as second:  # saved on shutdown, loaded at start-up
        info = (await second.get("/v1/collections/kept")).json()
        assert (info["size"], info["index"], info["model"]) == (30, "ivf-pq", "fast")
        after = await search(second, "kept", text="kept text 7", top_k=3)
    assert [h["id"] for h in after] == [h["id"] for h in before]
    assert after[0] == {"id": "x7", "score": pytest.approx(1.0, abs=1e-5), "metadata": {"i": 7}}


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment"),
    [
        ("/v1/collections/nope/search", {"text": "x"}, 404, "collection 'nope' does not exist"),
        ("/v1/collections/photos/search", {}, 422, "a search needs a text, an image, or both"),
        ("/v1/collections/photos/search", {"text": "x", "top_k": 5}, 422, "exceeds the size"),
        ("/v1/collections/photos/search", {"text": "x", "top_k": 0}, 422, "top_k"),
        ("/v1/collections/photos/search", {"text": "x", "filter": {"$or": 1}}, 422, "filter"),
        (
            "/v1/collections/photos/items",
            {"items": [{"id": "a"}]},
            422,
            "one text, one image or one vector",
        ),
        ("/v1/collections/photos/items", {"items": []}, 422, "at least 1 item"),
        ("/v1/collections", {"name": "photos", "model": "fast"}, 409, "already exists"),
        ("/v1/collections", {"name": "../x"}, 422, "should match pattern"),
        ("/v1/collections", {"name": "m", "model": "nope"}, 404, "model config 'nope' is unknown"),
        ("/v1/collections", {"name": "m", "store": "milvus"}, 422, "collections.milvus_uri"),
    ],
)
async def test_clear_errors(
    client: Any, path: str, body: dict[str, Any], status: int, fragment: str
) -> None:
    await create(client)
    await client.post("/v1/collections/photos/items", json={"items": [{"id": "a", "text": "t"}]})
    response = await client.post(path, json=body)
    assert response.status_code == status, response.text
    assert fragment in response.text


async def test_an_empty_collection_and_a_model_gone_from_the_registry(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    write_config: Callable[..., Any],
    fake_models: dict[str, Any],
) -> None:
    mine = {"mine": {"model_name": "fake-mine"}}
    client = await client_for(make_settings(models=mine), FakeLoader())
    await create(client, name="empty", model="mine")
    empty = await client.post("/v1/collections/empty/search", json={"text": "x"})
    assert empty.status_code == 422
    assert "empty" in empty.json()["error"]
    write_config(fake_models)  # without "mine"
    assert (await client.post("/v1/system/models/reload")).status_code == 200
    gone = await client.post(
        "/v1/collections/empty/items", json={"items": [{"id": "a", "text": "t"}]}
    )
    assert gone.status_code == 422
    assert "built with model 'mine', which is no longer in the registry" in gone.json()["error"]
    assert (await client.delete("/v1/collections/empty")).json() == {"deleted": "empty"}
    assert (await client.get("/v1/collections")).json() == {"collections": []}


async def test_vectors_computed_elsewhere_are_added_as_they_are(client: Any) -> None:
    await create(client, name="vectors")
    embedded = await client.post("/v1/embeddings", json={"model": "fast", "input": "a red rocket"})
    vector = embedded.json()["data"][0]["embedding"]
    items = [
        {"id": "given", "vector": vector, "metadata": {"from": "elsewhere"}},
        {"id": "short", "vector": vector[:3]},
        {"id": "nan", "vector": [float("nan")] * len(vector)},
        {"id": "embedded", "text": "a blue boat"},
    ]
    response = await client.post(
        "/v1/collections/vectors/items",
        content=json_bytes(items),
        headers={"content-type": "application/json"},
    )
    added = response.json()
    assert added["added"] == 2
    assert [(e["id"], e["error"]) for e in added["errors"]] == [
        ("short", f"the vector has 3 values; the collection's dimension is {len(vector)}"),
        ("nan", "the vector holds NaN or infinite values"),
    ]
    (best, _) = await search(client, "vectors", text="a red rocket", top_k=2)
    assert best["id"] == "given"
    assert best["score"] == pytest.approx(1.0, abs=1e-5)


def json_bytes(items: list[dict[str, Any]]) -> bytes:
    import json

    return json.dumps({"items": items}, allow_nan=True).encode()


async def test_a_data_directory_held_elsewhere_is_a_503_not_a_failed_start(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], tmp_path: Path
) -> None:
    settings = make_settings(collections={"data_dir": tmp_path / "shared"})
    first = await client_for(settings, FakeLoader())
    await create(first, name="mine")
    second = await client_for(settings, FakeLoader())  # started, though it cannot own the folder
    assert (await second.get("/ready")).status_code == 200
    refused = await second.get("/v1/collections/mine")
    assert refused.status_code == 503
    assert "is in use by another clipserve process" in refused.json()["error"]
    assert (await first.get("/v1/collections/mine")).status_code == 200
