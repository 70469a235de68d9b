"""The openai-vision backend against the fake OpenAI-compatible server on loopback (no sleeps:
the retries' waits are recorded)."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import torch
from PIL import Image
from pydantic import SecretStr

from clipserve.config import MediaSettings
from clipserve.errors import InferenceError, InvalidInputError, ModelLoadError
from clipserve.model_specs import ModelSpec
from clipserve.models.base import CaptionInput, FailedGeneration, GenerationOptions
from clipserve.models.openai_vision import DEFAULT_CAPTION_PROMPT, OpenAIVisionBackend
from clipserve.testing.fake_openai import FakeOpenAIServer
from clipserve.testing.servers import free_port

KEY = "sk-test-0123456789abcdef"
MODEL = "gpt-4o-mini"
PRIVATE = MediaSettings(allow_private_urls=True)

Loader = Callable[..., OpenAIVisionBackend]


def _spec(base_url: str, **fields: Any) -> ModelSpec:
    return ModelSpec.model_validate(
        {"model_name": MODEL, "backend": "openai-vision", "base_url": base_url, **fields}
    )


def _image(width: int = 64, height: int = 48, mode: str = "RGB") -> Image.Image:
    return Image.new("RGB", (width, height), (200, 80, 40)).convert(mode)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=KEY, model=MODEL) as fake:
        yield fake


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def load(server: FakeOpenAIServer, sleeps: list[float]) -> Iterator[Loader]:
    """Load a backend on the fake server (spec fields, and ``given_key``: the key given to load
    besides the spec's), closed after the test."""
    loaded: list[OpenAIVisionBackend] = []

    def make(
        *, media: MediaSettings = PRIVATE, given_key: str | None = KEY, **fields: Any
    ) -> OpenAIVisionBackend:
        fields.setdefault("base_url", server.base_url)
        key = SecretStr(given_key) if given_key is not None else None
        backend = OpenAIVisionBackend.load(
            _spec(**fields), media=media, api_key=key, sleep=sleeps.append
        )
        loaded.append(backend)
        return backend

    yield make
    for backend in loaded:
        backend.close()


def _input(backend: OpenAIVisionBackend, image: Image.Image | None = None, **kw: Any) -> Any:
    return CaptionInput(backend.preprocess(image or _image()), **kw)


# --- answers and requests ----------------------------------------------------------------------


def test_caption_and_request_shape(load: Loader, server: FakeOpenAIServer) -> None:
    backend = load()
    options = GenerationOptions(max_new_tokens=20, num_beams=3)
    assert backend.generate([_input(backend, options=options)]) == ["a 64x48 image"]

    (request,) = server.requests
    assert request.status == 200
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"
    assert request.body["model"] == MODEL
    assert request.body["max_tokens"] == 20
    assert "num_beams" not in json.dumps(request.body)
    (message,) = request.body["messages"]
    assert message["role"] == "user"
    text, image = message["content"]
    assert text == {"type": "text", "text": DEFAULT_CAPTION_PROMPT}
    assert image["type"] == "image_url"
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert request.image_size == (64, 48)


def test_info_is_remote_and_hides_the_query(load: Loader, server: FakeOpenAIServer) -> None:
    backend = load(base_url=f"{server.base_url}/?api-version=2024-06-01")
    info = backend.info
    assert (info.backend, info.architecture, info.device, info.dtype) == ("openai-vision",) + (
        "remote",
    ) * 3
    assert (info.embed_dim, info.context_length, info.image_size) == (0, 0, None)
    assert info.modalities == frozenset({"caption", "answer"})
    assert dict(info.extra) == {"base_url": server.base_url, "model": MODEL}
    assert OpenAIVisionBackend.local is False

    assert backend.generate([_input(backend)]) == ["a 64x48 image"]
    assert server.requests[0].path == "/v1/chat/completions?api-version=2024-06-01"


def test_spec_prompt_and_input_prompt(load: Loader, server: FakeOpenAIServer) -> None:
    backend = load(prompt="Describe the colours.")
    backend.generate([_input(backend)])
    backend.generate([_input(backend, prompt="a photo of")])
    texts = [r.text for r in server.requests]
    assert texts == [
        "Describe the colours.",
        "Write a short caption for this image that starts with: a photo of",
    ]


def test_answer_sends_the_question(load: Loader, server: FakeOpenAIServer) -> None:
    backend = load(prompt="Describe the colours.")
    question = "What colour is the square?"
    assert backend.generate([_input(backend, task="answer", prompt=question)]) == [
        f"you asked: {question}"
    ]
    assert server.requests[0].text == question


def test_answer_without_a_question_fails_alone(load: Loader, server: FakeOpenAIServer) -> None:
    backend = load()
    results = backend.generate([_input(backend, task="answer", prompt=" "), _input(backend)])
    assert isinstance(results[0], FailedGeneration)
    assert isinstance(results[0].error, InvalidInputError)
    assert results[1] == "a 64x48 image"
    assert len(server.requests) == 1


def test_batch_answers_in_order(load: Loader, server: FakeOpenAIServer) -> None:
    backend = load()
    sizes = [(10 + i, 20 + i) for i in range(12)]
    results = backend.generate([_input(backend, _image(w, h)) for w, h in sizes])
    assert results == [f"a {w}x{h} image" for w, h in sizes]
    assert len(server.requests) == len(sizes)


def test_content_parts_are_joined(server: FakeOpenAIServer, load: Loader) -> None:
    server.content_parts = True
    backend = load()
    assert backend.generate([_input(backend)]) == ["a 64x48 image"]


# --- retries -----------------------------------------------------------------------------------


def test_429_with_retry_after_then_success(
    load: Loader, server: FakeOpenAIServer, sleeps: list[float]
) -> None:
    server.fail_next(429, retry_after=2)
    backend = load()
    assert backend.generate([_input(backend)]) == ["a 64x48 image"]
    assert sleeps == [2.0]
    assert [r.status for r in server.requests] == [429, 200]


def test_retry_after_is_capped(load: Loader, server: FakeOpenAIServer, sleeps: list[float]) -> None:
    server.fail_next(503, retry_after=3600)
    backend = load()
    assert backend.generate([_input(backend)]) == ["a 64x48 image"]
    assert sleeps == [10.0]


def test_backoff_doubles_up_to_its_cap(
    load: Loader, server: FakeOpenAIServer, sleeps: list[float]
) -> None:
    server.fail_next(*[502] * 6)
    backend = load(max_retries=5)
    (result,) = backend.generate([_input(backend)])
    assert isinstance(result, FailedGeneration)
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert len(server.requests) == 6


def test_500_exhausted_fails_one_input_of_the_batch(
    load: Loader, server: FakeOpenAIServer, sleeps: list[float]
) -> None:
    server.fail_matching("BROKEN", 500)
    backend = load()
    inputs = [_input(backend), _input(backend, prompt="BROKEN"), _input(backend, _image(8, 9))]
    first, failed, last = backend.generate(inputs)
    assert (first, last) == ("a 64x48 image", "a 8x9 image")
    assert isinstance(failed, FailedGeneration)
    assert isinstance(failed.error, InferenceError)
    assert "HTTP 500" in str(failed.error)
    assert "scripted failure" in str(failed.error)  # the remote's message, quoted
    assert sleeps == [0.5, 1.0]
    assert sum("BROKEN" in (r.text or "") for r in server.requests) == 3


def test_429_exhausted_is_an_inference_error(
    load: Loader, server: FakeOpenAIServer, sleeps: list[float]
) -> None:
    server.fail_next(429, 429)
    backend = load(max_retries=1)
    (result,) = backend.generate([_input(backend)])
    assert isinstance(result, FailedGeneration)
    assert isinstance(result.error, InferenceError)
    assert "HTTP 429 (rate limited)" in str(result.error)
    assert sleeps == [0.5]


def test_unreachable_and_slow_servers_fail_after_retries(sleeps: list[float]) -> None:
    spec = _spec(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    backend = OpenAIVisionBackend.load(spec, media=PRIVATE, api_key=None, sleep=sleeps.append)
    try:
        (result,) = backend.generate([_input(backend)])
    finally:
        backend.close()
    assert isinstance(result, FailedGeneration)
    assert "could not be reached (ConnectError)" in str(result.error)
    assert sleeps == [0.5]

    with FakeOpenAIServer(delay_s=5) as slow:
        spec = _spec(slow.base_url, timeout_s=0.1, max_retries=0)
        backend = OpenAIVisionBackend.load(spec, media=PRIVATE, api_key=None)
        try:
            (result,) = backend.generate([_input(backend)])
        finally:
            backend.close()
    assert isinstance(result, FailedGeneration)
    assert "did not answer in time" in str(result.error)


# --- refusals ----------------------------------------------------------------------------------


def test_401_names_the_credentials_but_not_the_key(
    load: Loader, server: FakeOpenAIServer, sleeps: list[float]
) -> None:
    wrong = "sk-wrong-key-that-must-not-leak"
    backend = load(given_key=wrong)
    (result,) = backend.generate([_input(backend)])
    assert isinstance(result, FailedGeneration)
    assert isinstance(result.error, InferenceError)
    message = str(result.error)
    assert "credentials (HTTP 401)" in message
    assert "api_key or OPENAI_API_KEY" in message
    assert wrong not in message
    assert wrong not in repr(result.error.detail)
    assert server.requests[0].status == 401  # the fake quoted the key it got: we did not
    assert sleeps == []


def test_refused_image_is_invalid_input_quoted_short(
    load: Loader, server: FakeOpenAIServer
) -> None:
    error = {"error": {"message": "image too large " + "x" * 5000, "type": "invalid_request"}}
    server.fail_matching("HUGE", 413, body=json.dumps(error).encode())
    backend = load()
    (result,) = backend.generate([_input(backend, prompt="HUGE")])
    assert isinstance(result, FailedGeneration)
    assert isinstance(result.error, InvalidInputError)
    message = str(result.error)
    assert message.startswith("the remote captioner refused the image (HTTP 413): image too large")
    assert len(message) < 320


def test_wrong_model_is_refused_without_retry(
    load: Loader, server: FakeOpenAIServer, sleeps: list[float]
) -> None:
    backend = load(model_name="no-such-model")
    (result,) = backend.generate([_input(backend)])
    assert isinstance(result, FailedGeneration)
    assert "does not exist" in str(result.error)
    assert sleeps == []


def _mock_backend(handler: Callable[[httpx.Request], httpx.Response]) -> OpenAIVisionBackend:
    return OpenAIVisionBackend.load(
        _spec("http://127.0.0.1:9/v1"),
        media=PRIVATE,
        api_key=None,
        sleep=lambda _s: None,
        transport=httpx.MockTransport(handler),
    )


@pytest.mark.parametrize(
    "answer",
    [b"not json", b"{}", b'{"choices": []}', b'{"choices": [{"message": {"content": null}}]}'],
)
def test_malformed_answer(answer: bytes) -> None:
    backend = _mock_backend(lambda _r: httpx.Response(200, content=answer))
    try:
        (result,) = backend.generate([_input(backend)])
    finally:
        backend.close()
    assert isinstance(result, FailedGeneration)
    assert str(result.error) == "the remote captioner's answer had no choices[0].message.content"


def test_oversized_answer_is_refused() -> None:
    backend = _mock_backend(lambda _r: httpx.Response(200, content=b" " * (5 * 1024 * 1024)))
    try:
        (result,) = backend.generate([_input(backend)])
    finally:
        backend.close()
    assert isinstance(result, FailedGeneration)
    assert "over 4 MiB" in str(result.error)


# --- the base URL ------------------------------------------------------------------------------


def test_loopback_refused_unless_allowed(server: FakeOpenAIServer) -> None:
    spec = _spec(server.base_url)
    with pytest.raises(ModelLoadError) as caught:
        OpenAIVisionBackend.load(spec, media=MediaSettings(), api_key=SecretStr(KEY))
    message = str(caught.value)
    assert message.startswith("openai-vision base_url host '127.0.0.1' is a loopback address")
    assert "media.allow_private_urls or media.allowed_networks" in message
    assert KEY not in message

    allowed = MediaSettings(allowed_networks=("127.0.0.0/8",))
    backend = OpenAIVisionBackend.load(spec, media=allowed, api_key=SecretStr(KEY))
    try:
        assert backend.generate([_input(backend)]) == ["a 64x48 image"]
    finally:
        backend.close()


def test_loopback_names_and_odd_literals_refused() -> None:
    with pytest.raises(ModelLoadError, match="host 'localhost' resolves to a loopback address"):
        OpenAIVisionBackend.load(
            _spec("http://localhost:8080/v1"), media=MediaSettings(), api_key=None
        )
    with pytest.raises(ModelLoadError, match=r"'2130706433' \(127.0.0.1\) is a loopback"):
        OpenAIVisionBackend.load(_spec("http://2130706433/v1"), media=MediaSettings(), api_key=None)
    with pytest.raises(ModelLoadError, match="'::1' is a loopback"):
        OpenAIVisionBackend.load(_spec("http://[::1]:80/v1"), media=MediaSettings(), api_key=None)


def test_denied_networks_win_over_allow_private() -> None:
    media = MediaSettings(allow_private_urls=True, denied_networks=("10.0.0.0/8",))
    with pytest.raises(ModelLoadError, match=r"in media.denied_networks \(10.0.0.0/8\)"):
        OpenAIVisionBackend.load(
            _spec("https://captioner.internal/v1"),
            media=media,
            api_key=None,
            resolver=lambda _h, _p: ["10.1.2.3"],
        )


def test_resolved_private_address_is_not_shown() -> None:
    with pytest.raises(ModelLoadError) as caught:
        OpenAIVisionBackend.load(
            _spec("https://captioner.internal/v1"),
            media=MediaSettings(),
            api_key=None,
            resolver=lambda _h, _p: ["93.184.216.34", "192.168.7.7"],
        )
    assert "'captioner.internal' resolves to a private address" in str(caught.value)
    assert "192.168.7.7" not in str(caught.value)
    assert "192.168.7.7" in (caught.value.technical or "")


def test_public_host_loads_without_calling_it() -> None:
    ports: list[int] = []

    def resolve(host: str, port: int) -> list[str]:
        ports.append(port)
        return ["93.184.216.34"]

    backend = OpenAIVisionBackend.load(
        _spec("https://api.example.com/v1"), media=MediaSettings(), api_key=None, resolver=resolve
    )
    backend.close()
    assert ports == [443]
    assert backend.info.extra["base_url"] == "https://api.example.com/v1"


def test_unresolvable_host() -> None:
    def fail(_host: str, _port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(ModelLoadError, match="'nowhere.invalid' could not be resolved"):
        OpenAIVisionBackend.load(
            _spec("https://nowhere.invalid/v1"), media=MediaSettings(), api_key=None, resolver=fail
        )


@pytest.mark.parametrize(
    ("base_url", "expected"),
    [
        ("ftp://example.com/v1", "must be an http:// or https:// URL, not 'ftp:'"),
        ("file:///etc/passwd", "must be an http:// or https:// URL"),
        ("https://user:hunter2@example.com/v1", "must not hold credentials"),
        ("http:///v1", "has no host"),
        ("http://example.com:99999/v1", "not a valid URL"),
    ],
)
def test_bad_base_url(base_url: str, expected: str) -> None:
    with pytest.raises(ModelLoadError, match="base_url") as caught:
        OpenAIVisionBackend.load(_spec(base_url), media=PRIVATE, api_key=None)
    assert expected in str(caught.value)
    assert "hunter2" not in str(caught.value)


# --- keys, preprocessing, closing --------------------------------------------------------------


def test_spec_key_wins_over_the_given_one(load: Loader, server: FakeOpenAIServer) -> None:
    backend = load(given_key="sk-from-openai-api-key", api_key=KEY)
    assert backend.generate([_input(backend)]) == ["a 64x48 image"]
    assert server.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(backend.info)


def test_no_key_sends_no_authorization(load: Loader, server: FakeOpenAIServer) -> None:
    server.api_key = None
    backend = load(given_key=None)
    assert backend.generate([_input(backend)]) == ["a 64x48 image"]
    assert "authorization" not in server.requests[-1].headers


def test_preprocess_is_a_bounded_jpeg(load: Loader) -> None:
    backend = load()
    pixels = backend.preprocess(_image(2000, 1000, "RGBA"))
    assert pixels.dtype == torch.uint8
    assert pixels.dim() == 1
    with Image.open(io.BytesIO(pixels.numpy().tobytes())) as decoded:
        assert decoded.format == "JPEG"
        assert decoded.mode == "RGB"
        assert decoded.size == (1024, 512)
    small = backend.preprocess(_image(30, 700, "L"))
    with Image.open(io.BytesIO(small.numpy().tobytes())) as decoded:
        assert (decoded.size, decoded.mode) == ((30, 700), "RGB")


def test_close_is_idempotent(load: Loader) -> None:
    backend = load()
    item = _input(backend)
    backend.close()
    backend.close()
    with pytest.raises(InferenceError, match="closed"):
        backend.generate([item])
