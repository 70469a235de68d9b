"""A fake OpenAI-compatible chat-completions vision API on 127.0.0.1, for tests of the
``openai-vision`` backend.

It checks each request's shape as a vision model would need it (``POST /v1/chat/completions``,
a JSON body with ``model``, ``max_tokens`` and a user message holding a text part and an
``image_url`` part whose ``data:image/jpeg;base64`` URL decodes to a real JPEG), answers a wrong
one 400 with an OpenAI error object, and records every request. Answers are deterministic:
``a {w}x{h} image`` for the decoded JPEG, or ``you asked: {text}`` when the text ends with ``?``.

Failures are scripted two ways: :meth:`FakeOpenAIServer.fail_next` queues statuses answered to
the next requests whatever they hold (in arrival order), and
:meth:`FakeOpenAIServer.fail_matching` answers a status to every request whose text holds a
marker (for one input of a concurrent batch)::

    with FakeOpenAIServer(api_key="sk-test") as server:
        server.fail_next(429, retry_after=2)
        ...  # base_url=server.base_url
        assert server.requests[0].status == 429
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, Final, Self, cast

from PIL import Image, UnidentifiedImageError

from clipserve.testing.origin import QuietHTTPServer

CHAT_PATH: Final = "/v1/chat/completions"
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
_DATA_URL_PREFIX: Final = "data:image/jpeg;base64,"

Answer = Callable[[str, tuple[int, int]], str]
"""The prompt text and the image's (width, height) -> the answer's content."""


def default_answer(text: str, size: tuple[int, int]) -> str:
    """``you asked: <text>`` for a question (a text ending with '?'), else ``a {w}x{h} image``."""
    if text.rstrip().endswith("?"):
        return f"you asked: {text}"
    return f"a {size[0]}x{size[1]} image"


@dataclass(frozen=True, slots=True)
class ScriptedFailure:
    """A status answered instead of a completion, with an OpenAI error object (or ``body``)."""

    status: int
    retry_after: float | None = None
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake received it, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    """Lower-case names."""
    body: Any
    """The parsed JSON body, or None when it was not JSON."""
    status: int
    text: str | None = None
    """The text part of the first message, when there was one."""
    image_size: tuple[int, int] | None = None
    """The decoded JPEG's (width, height), when the image part was one."""


class _ShapeError(Exception):
    """The request is not one a vision model takes: answered 400 with this message."""


class FakeOpenAIServer:
    """A threaded HTTP server on a free loopback port; use it as a context manager (or
    :meth:`start` / :meth:`stop`). Thread-safe: handlers run on their own threads.

    ``api_key``: the ``Authorization: Bearer`` key required (None: none checked). A wrong or
    missing key gets 401, and its message repeats the key sent, as careless servers do (tests
    check that the client never quotes it). ``model``: the model name required (None: any).
    ``answer``: the completion's text. ``content_parts``: answer ``content`` as a list of text
    parts instead of a string. ``delay_s``: how long each answer waits (cut short by ``stop``).
    """

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model: str | None = None,
        answer: Answer = default_answer,
        content_parts: bool = False,
        delay_s: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.model = model
        self.answer = answer
        self.content_parts = content_parts
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._scripted: deque[ScriptedFailure] = deque()
        self._markers: list[tuple[str, ScriptedFailure]] = []
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Self:
        if self._httpd is not None:
            raise RuntimeError("the fake OpenAI server is running already")
        self._stopping.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent); delayed answers are cut short."""
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        self._stopping.set()
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the fake OpenAI server is not running")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``, what a spec's ``base_url`` is."""
        return f"http://127.0.0.1:{self.port}/v1"

    # --- scripting and records -----------------------------------------------------------------

    def fail_next(self, *statuses: int, retry_after: float | None = None) -> None:
        """Answer the next requests these statuses, one each, in arrival order (before any
        check), each with ``Retry-After: retry_after`` when given."""
        with self._lock:
            self._scripted.extend(ScriptedFailure(s, retry_after) for s in statuses)

    def fail_matching(
        self,
        marker: str,
        status: int,
        *,
        retry_after: float | None = None,
        body: bytes | None = None,
    ) -> None:
        """Answer ``status`` to every well-formed request whose text holds ``marker``."""
        with self._lock:
            self._markers.append((marker, ScriptedFailure(status, retry_after, body)))

    @property
    def requests(self) -> list[RecordedRequest]:
        """The requests received so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    # --- answering (handler threads) -----------------------------------------------------------

    def _handle(self, handler: _Handler, method: str) -> None:
        raw = handler.read_body()
        headers = {name.lower(): value for name, value in handler.headers.items()}
        body: Any = None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        text: str | None = None
        size: tuple[int, int] | None = None
        refusal: ScriptedFailure | None = None
        try:
            text, size = self._check(method, handler.path, headers, body)
        except _ShapeError as exc:
            refusal = ScriptedFailure(400, body=_error_body(str(exc)))
        except _AuthError as exc:
            refusal = ScriptedFailure(401, body=_error_body(str(exc), code="invalid_api_key"))
        with self._lock:
            scripted = self._scripted.popleft() if self._scripted else refusal
            if scripted is None and text is not None:
                scripted = next((f for m, f in self._markers if m in text), None)
            status = scripted.status if scripted is not None else 200
            self._requests.append(
                RecordedRequest(method, handler.path, headers, body, status, text, size)
            )
        if self.delay_s > 0:
            self._stopping.wait(self.delay_s)
        if scripted is not None:
            payload = scripted.body or _error_body(
                f"scripted failure (HTTP {scripted.status})", kind="server_error"
            )
            extra = {}
            if scripted.retry_after is not None:
                extra["Retry-After"] = f"{scripted.retry_after:g}"
            handler.answer(scripted.status, payload, extra)
            return
        assert text is not None
        assert size is not None
        handler.answer(200, self._completion(body, text, size))

    def _check(
        self, method: str, path: str, headers: dict[str, str], body: Any
    ) -> tuple[str, tuple[int, int]]:
        """The request's text and image size; raises _ShapeError or _AuthError."""
        if self.api_key is not None:
            given = headers.get("authorization", "")
            if given != f"Bearer {self.api_key}":
                raise _AuthError(f"Incorrect API key provided: {given.removeprefix('Bearer ')}")
        if method != "POST":
            raise _ShapeError(f"{method} is not allowed: POST {CHAT_PATH}")
        if path.split("?", 1)[0] != CHAT_PATH:
            raise _ShapeError(f"unknown path {path}: POST {CHAT_PATH}")
        if not headers.get("content-type", "").startswith("application/json"):
            raise _ShapeError("the body must be application/json")
        if not isinstance(body, dict):
            raise _ShapeError("the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _ShapeError("'model' must be a non-empty string")
        if self.model is not None and model != self.model:
            raise _ShapeError(f"The model '{model}' does not exist")
        max_tokens = body.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            raise _ShapeError("'max_tokens' must be a positive integer")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[0], dict):
            raise _ShapeError("'messages' must be a non-empty list of objects")
        content = messages[0].get("content")
        if messages[0].get("role") != "user" or not isinstance(content, list):
            raise _ShapeError("messages[0] must be a user message with a list of content parts")
        texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        images = [
            p.get("image_url")
            for p in content
            if isinstance(p, dict) and p.get("type") == "image_url"
        ]
        if len(texts) != 1 or not isinstance(texts[0], str) or not texts[0]:
            raise _ShapeError("messages[0].content must have one non-empty text part")
        if len(images) != 1 or not isinstance(images[0], dict):
            raise _ShapeError("messages[0].content must have one image_url part")
        return texts[0], _jpeg_size(images[0].get("url"))

    def _completion(self, body: dict[str, Any], text: str, size: tuple[int, int]) -> bytes:
        answer = self.answer(text, size)
        content: Any = [{"type": "text", "text": answer}] if self.content_parts else answer
        prompt_tokens = len(text.split()) + 85  # what one low-detail image costs
        completion_tokens = len(answer.split())
        completion = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
        return json.dumps(completion).encode()


class _AuthError(Exception):
    """The request's key is missing or wrong: answered 401 with this message."""


def _jpeg_size(url: Any) -> tuple[int, int]:
    if not isinstance(url, str) or not url.startswith(_DATA_URL_PREFIX):
        raise _ShapeError("image_url.url must be a data:image/jpeg;base64 URL")
    try:
        data = base64.b64decode(url.removeprefix(_DATA_URL_PREFIX), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _ShapeError(f"image_url.url is not valid base64 ({exc})") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                raise _ShapeError(f"the image is {image.format}, not the JPEG its URL says")
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise _ShapeError(f"the image could not be decoded ({exc})") from exc


def _error_body(
    message: str, *, kind: str = "invalid_request_error", code: str | None = None
) -> bytes:
    error = {"message": message, "type": kind, "param": None, "code": code}
    return json.dumps({"error": error}).encode()


class _Server(QuietHTTPServer):
    fake: FakeOpenAIServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real APIs: the client reuses connections
    disable_nagle_algorithm = True  # headers and body go out in two writes

    @property
    def fake(self) -> FakeOpenAIServer:
        return cast(_Server, self.server).fake

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.fake._handle(self, "POST")

    def do_GET(self) -> None:  # noqa: N802
        self.fake._handle(self, "GET")

    def read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = MAX_BODY_BYTES + 1
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            return b""
        return self.rfile.read(length) if length > 0 else b""

    def answer(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's signature)
        pass
