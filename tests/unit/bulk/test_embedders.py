from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from clipserve.bulk import ItemError, LocalEmbedder, RemoteEmbedder, embed_each
from clipserve.bulk.embedders import RemoteServiceError
from clipserve.config import MediaSettings
from clipserve.errors import (
    AuthenticationError,
    InvalidInputError,
    ModelNotFoundError,
    UnsupportedModalityError,
)
from clipserve.scoring import ServiceUnreachableError
from clipserve.testing import FakeLoader


def test_embed_each_isolates_the_failing_items_by_halving() -> None:
    calls: list[int] = []

    def embed(items: Sequence[int]) -> np.ndarray:
        calls.append(len(items))
        if any(i in (3, 9) for i in items):
            raise ItemError("bad item")
        return np.array([[float(i)] for i in items])

    out = embed_each(embed, list(range(16)))
    assert [o if isinstance(o, str) else float(o[0]) for o in out] == [
        "bad item" if i in (3, 9) else float(i) for i in range(16)
    ]
    assert len(calls) < 16  # far fewer calls than one per item
    assert embed_each(embed, []) == []


def test_embed_each_lets_other_errors_end_the_run() -> None:
    def embed(items: Sequence[int]) -> np.ndarray:
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        embed_each(embed, [1, 2])


def test_the_local_embedder_blames_bad_images_but_not_the_model(
    make_settings: Callable[..., Any], photo_bytes: Callable[..., bytes]
) -> None:
    with LocalEmbedder(make_settings(), "fast", batch_size=4, loader=FakeLoader()) as embedder:
        assert embedder.model == "fast"
        assert embedder.chunk_size == 16
        assert embedder.embed_dim() == 16
        assert embedder.embed_images([photo_bytes("chelsea")]).shape == (1, 16)
        with pytest.raises(ItemError, match="could not be decoded"):
            embedder.embed_images([photo_bytes("chelsea"), b"junk"])
    with (
        LocalEmbedder(make_settings(), "minilm", batch_size=4, loader=FakeLoader()) as text_only,
        pytest.raises(UnsupportedModalityError),
    ):
        text_only.embed_images([photo_bytes("chelsea")])


MODELS = {"models": [{"name": "fast"}, {"name": "accurate"}], "default_model": "fast"}


def vectors_body(count: int, dim: int = 3) -> dict[str, Any]:
    return {
        "object": "list",
        "model": "fast",
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(np.full(dim, i, dtype="<f4").tobytes()).decode(),
            }
            for i in reversed(range(count))  # answered out of order: sorted by index
        ],
    }


def remote(
    handler: Callable[[httpx.Request], httpx.Response], tmp_path: Path, **options: Any
) -> RemoteEmbedder:
    return RemoteEmbedder(
        "http://service.test",
        options.pop("model", None),
        media=MediaSettings(media_root=tmp_path),
        batch_size=8,
        transport=httpx.MockTransport(handler),
        **options,
    )


def test_the_remote_embedder_sends_openai_bodies_and_reads_base64(
    tmp_path: Path, photo_bytes: Callable[..., bytes]
) -> None:
    (tmp_path / "cat.jpg").write_bytes(photo_bytes("chelsea"))
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer secret"
        if request.url.path == "/v1/system/models":
            return httpx.Response(200, json=MODELS)
        body = json.loads(request.content)
        bodies.append(body)
        return httpx.Response(200, json=vectors_body(len(body["input"])))

    embedder = remote(handler, tmp_path, api_key="secret", max_request_chars=100)
    assert embedder.model == "fast"  # the service's default
    image = embedder.prepare_image(str(tmp_path / "cat.jpg"))
    assert isinstance(image, str)
    assert image.startswith("data:image/jpeg;base64,")
    assert embedder.prepare_image("https://example.com/a.jpg") == "https://example.com/a.jpg"
    with pytest.raises(ItemError, match="not found"):
        embedder.prepare_image(str(tmp_path / "missing.jpg"))
    vectors = embedder.embed_texts(["a", "b", "c"])
    np.testing.assert_array_equal(vectors[:, 0], [0, 1, 2])
    assert bodies[-1] == {
        "model": "fast",
        "input": ["a", "b", "c"],
        "modality": "text",
        "encoding_format": "base64",
    }
    vectors = embedder.embed_images(["x" * 60, "y" * 60, "z" * 30])  # over 100 chars: split
    assert [len(b["input"]) for b in bodies[-2:]] == [1, 2]
    assert bodies[-1]["modality"] == "image"
    assert vectors.shape == (3, 3)
    assert embedder.embed_dim() == 3
    embedder.close()


@pytest.mark.parametrize(
    ("status", "code", "raised"),
    [
        (400, "invalid_image", ItemError),
        (413, None, ItemError),
        (422, None, ItemError),
        (502, "invalid_image", ItemError),
        (400, None, RemoteServiceError),
        (500, None, RemoteServiceError),
        (401, "invalid_api_key", AuthenticationError),
    ],
)
def test_the_remote_embedder_blames_inputs_only_for_input_errors(
    tmp_path: Path, status: int, code: str | None, raised: type[Exception]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/system/models":
            return httpx.Response(200, json=MODELS)
        error = {"message": "input[0]: nope", "type": "invalid_request_error", "code": code}
        return httpx.Response(status, json={"error": error})

    with remote(handler, tmp_path, model="accurate") as embedder, pytest.raises(raised):
        embedder.embed_texts(["a"])


def test_the_remote_embedder_retries_busy_answers(tmp_path: Path) -> None:
    answers = iter([429, 503, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/system/models":
            return httpx.Response(200, json=MODELS)
        status = next(answers)
        if status != 200:
            return httpx.Response(status, headers={"Retry-After": "0"}, json={"error": "busy"})
        return httpx.Response(200, json=vectors_body(1))

    with remote(handler, tmp_path) as embedder:
        assert embedder.embed_texts(["a"]).shape == (1, 3)
    with remote(handler, tmp_path, retries=0) as embedder:
        answers = iter([503])
        with pytest.raises(RemoteServiceError, match="HTTP 503"):
            embedder.embed_texts(["a"])


def test_the_remote_embedder_checks_the_service_first(tmp_path: Path) -> None:
    def models(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=MODELS)

    with pytest.raises(ModelNotFoundError, match="'nope' is unknown"):
        remote(models, tmp_path, model="nope")

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(ServiceUnreachableError, match="cannot connect"):
        remote(refused, tmp_path)

    def locked(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": "no key"})

    with pytest.raises(AuthenticationError, match="--api-key"):
        remote(locked, tmp_path)
    with pytest.raises(InvalidInputError, match="must start with http"):
        RemoteEmbedder("ftp://x", None, media=MediaSettings(), batch_size=1)
