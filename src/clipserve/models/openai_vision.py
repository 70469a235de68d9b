"""A remote captioner: an OpenAI-compatible chat-completions vision endpoint (``backend:
openai-vision``), behind :class:`~clipserve.models.base.CaptionBackend`.

``preprocess`` turns an image into the JPEG bytes that are sent (RGB, the longer side at most
:data:`MAX_SIDE` pixels), as a 1-D ``uint8`` tensor. ``generate`` sends one ``POST
{base_url}/chat/completions`` per input, the image as a ``data:image/jpeg;base64`` URL.

Concurrency contract:

* ``generate`` is synchronous and runs on the model's own executor thread, one batch at a time;
  it sends the batch's inputs concurrently, at most :data:`MAX_CONCURRENT_CALLS` calls in flight
  per model, through one shared ``httpx.Client`` (no proxies from the environment, no redirects
  followed, a timeout per call: the spec's ``timeout_s``, 30 s by default).
* Every input gets a text or a :class:`~clipserve.models.base.FailedGeneration` (a refused image,
  a remote failure that outlived its retries, a malformed answer), in order; ``generate`` raises
  only when the model is closed or on a bug, which fails the whole batch.
* Retries are bounded: at most ``max_retries`` (2) per input, on connection errors, timeouts,
  429 and 5xx, after ``Retry-After`` (at most :data:`MAX_RETRY_AFTER_S`) or an exponential
  backoff (0.5 s doubling, at most :data:`MAX_BACKOFF_S`); ``close`` cuts the sleeps short. An
  answer body is read up to :data:`MAX_ANSWER_BYTES`, and messages quote at most 200 characters
  of it.

The base URL is checked at load with the media SSRF rules (``media.denied_networks``, non-public
addresses unless ``media.allow_private_urls`` or ``media.allowed_networks``). It is the operator's
configuration, not a client's input, so the check is made once, on the addresses the host has at
load; connections then go by name. The API key never appears in a message or a log line.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit

import httpx
import torch
from PIL import Image
from pydantic import SecretStr

from clipserve.config import MediaSettings
from clipserve.errors import (
    ClipServeError,
    InferenceError,
    InvalidInputError,
    ModelLoadError,
    quote,
)
from clipserve.media.fetch import (
    IPAddress,
    IPNetwork,
    blocked_reason,
    network_of,
    parse_ip_literal,
    retry_after_header,
)
from clipserve.model_specs import ModelSpec
from clipserve.models.base import (
    BackendInfo,
    CaptionBackend,
    CaptionInput,
    FailedGeneration,
    Modality,
)

logger = logging.getLogger(__name__)

Sleep = Callable[[float], None]
"""Waits the given seconds between retries (injected by tests)."""
HostResolver = Callable[[str, int], list[str]]
"""A host name and a port -> the addresses it resolves to (``socket.getaddrinfo`` by default)."""

MAX_CONCURRENT_CALLS: Final = 8
MAX_SIDE: Final = 1024
JPEG_QUALITY: Final = 90
DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_MAX_RETRIES: Final = 2
MAX_RETRY_AFTER_S: Final = 10.0
FIRST_BACKOFF_S: Final = 0.5
MAX_BACKOFF_S: Final = 4.0
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
DEFAULT_CAPTION_PROMPT: Final = "Write a short, factual caption of this image in one sentence."
_QUOTED_CHARS: Final = 200
_MODALITIES: frozenset[Modality] = frozenset({"caption", "answer"})
_REFUSED_IMAGE_STATUSES: Final = frozenset({400, 413, 422})
_CREDENTIAL_STATUSES: Final = frozenset({401, 403})


def system_host_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (all families), with the system resolver."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class _RetryableError(Exception):
    """One attempt failed in a way worth retrying; ``error`` is the input's answer if it was the
    last one."""

    def __init__(self, error: ClipServeError, *, retry_after: float | None = None) -> None:
        super().__init__(error.message)
        self.error = error
        self.retry_after = retry_after


class OpenAIVisionBackend(CaptionBackend):
    """An OpenAI-compatible vision model behind a base URL. Build it with :meth:`load`.

    ``num_beams`` is ignored (chat-completions APIs decode as they do); ``max_new_tokens`` is
    sent as ``max_tokens``."""

    local: ClassVar[bool] = False

    def __init__(
        self,
        spec: ModelSpec,
        *,
        client: httpx.Client,
        url: str,
        shown_url: str,
        api_key: SecretStr | None,
        sleep: Sleep | None = None,
        max_concurrent_calls: int = MAX_CONCURRENT_CALLS,
    ) -> None:
        self._client = client
        self._url = url
        self._model = spec.model_name
        self._default_prompt = spec.prompt or DEFAULT_CAPTION_PROMPT
        self._max_retries = (
            spec.max_retries if spec.max_retries is not None else DEFAULT_MAX_RETRIES
        )
        key = api_key.get_secret_value() if api_key is not None else ""
        self._secret = key
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._closing = threading.Event()
        self._sleep: Sleep = sleep if sleep is not None else self._interruptible_sleep
        self._close_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=max_concurrent_calls, thread_name_prefix="openai-vision"
        )
        self._info = BackendInfo(
            backend="openai-vision",
            architecture="remote",
            embed_dim=0,
            context_length=0,
            modalities=_MODALITIES,
            device="remote",
            dtype="remote",
            image_size=None,
            extra={"base_url": shown_url, "model": spec.model_name},
        )

    @classmethod
    def load(
        cls,
        spec: ModelSpec,
        *,
        media: MediaSettings,
        api_key: SecretStr | None,
        sleep: Sleep | None = None,
        resolver: HostResolver = system_host_resolver,
        transport: httpx.BaseTransport | None = None,
    ) -> OpenAIVisionBackend:
        """Check ``spec.base_url`` (scheme, host, and the SSRF rules of ``media``) and open the
        client. ``spec.api_key`` wins over ``api_key`` (``OPENAI_API_KEY``); with neither, no
        ``Authorization`` header is sent. Nothing is sent to the remote API here. ``sleep``
        (between retries), ``resolver`` and ``transport`` are for tests. Raises
        :class:`ModelLoadError`."""
        url, shown_url, host, port = _parse_base_url(spec.base_url)
        _check_host(host, port, media, resolver)
        timeout = spec.timeout_s if spec.timeout_s is not None else DEFAULT_TIMEOUT_S
        client = httpx.Client(
            transport=transport,
            headers={"User-Agent": media.user_agent, "Accept": "application/json"},
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(
                max_connections=MAX_CONCURRENT_CALLS,
                max_keepalive_connections=MAX_CONCURRENT_CALLS,
            ),
            follow_redirects=False,
            trust_env=False,  # no proxies or .netrc credentials from the environment
        )
        key = spec.api_key if spec.api_key is not None else api_key
        return cls(spec, client=client, url=url, shown_url=shown_url, api_key=key, sleep=sleep)

    @property
    def info(self) -> BackendInfo:
        return self._info

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """The JPEG (quality 90) of ``image`` in RGB, its longer side at most 1024 pixels (aspect
        kept), as a 1-D ``uint8`` tensor of its bytes."""
        rgb = image.convert("RGB") if image.mode != "RGB" else image.copy()
        rgb.thumbnail((MAX_SIDE, MAX_SIDE))
        buffer = io.BytesIO()
        rgb.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def generate(self, inputs: Sequence[CaptionInput]) -> list[str | FailedGeneration]:
        """One text (or :class:`FailedGeneration`) per input, in order; the inputs are sent
        concurrently (at most :data:`MAX_CONCURRENT_CALLS` at once). ``num_beams`` is ignored."""
        if self._closing.is_set():
            raise InferenceError("the openai-vision model is closed")
        if not inputs:
            return []
        if len(inputs) == 1:
            return [self._generate_one(inputs[0])]
        try:
            futures = [self._pool.submit(self._generate_one, item) for item in inputs]
        except RuntimeError as exc:  # the pool was shut down: closed meanwhile
            raise InferenceError("the openai-vision model is closed") from exc
        wait(futures)
        return [self._outcome(future) for future in futures]

    def close(self) -> None:
        """Stop the retries' sleeps, drop queued calls and close the client (idempotent)."""
        with self._close_lock:
            if self._closing.is_set():
                return
            self._closing.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()

    # --- one input -------------------------------------------------------------------------------

    @staticmethod
    def _outcome(future: Future[str | FailedGeneration]) -> str | FailedGeneration:
        if future.cancelled():
            return FailedGeneration(InferenceError("the openai-vision model was closed"))
        return future.result()  # a bug in _generate_one fails the whole batch

    def _generate_one(self, item: CaptionInput) -> str | FailedGeneration:
        try:
            body = self._request_body(item)
        except ClipServeError as exc:
            return FailedGeneration(exc)
        attempts = self._max_retries + 1
        for attempt in range(attempts):
            if self._closing.is_set():
                return FailedGeneration(InferenceError("the openai-vision model was closed"))
            try:
                return self._call(body)
            except ClipServeError as exc:
                return FailedGeneration(exc)
            except _RetryableError as retry:
                if attempt + 1 == attempts or self._closing.is_set():
                    return FailedGeneration(retry.error)
                delay = self._delay(attempt, retry.retry_after)
                logger.info(
                    "openai-vision %s: %s; retrying in %.2f s (retry %d of %d)",
                    self._model,
                    retry.error.message,
                    delay,
                    attempt + 1,
                    self._max_retries,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")  # the loop returns on its last attempt

    def _request_body(self, item: CaptionInput) -> dict[str, Any]:
        pixels = item.pixels
        if pixels.dtype != torch.uint8 or pixels.dim() != 1:
            raise InferenceError(
                "openai-vision inputs must come from its own preprocess (JPEG bytes), not "
                f"a {pixels.dtype} tensor of shape {tuple(pixels.shape)}"
            )
        jpeg = pixels.detach().cpu().contiguous().numpy().tobytes()
        data_url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
        return {
            "model": self._model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": self._prompt(item)},
                        {"type": "image_url", "image_url": {"url": data_url}},
                    ],
                }
            ],
            "max_tokens": item.options.max_new_tokens,
        }

    def _prompt(self, item: CaptionInput) -> str:
        if item.task == "answer":
            if item.prompt is None or not item.prompt.strip():
                raise InvalidInputError("a question is needed to answer about an image")
            return item.prompt
        if item.prompt:
            return f"Write a short caption for this image that starts with: {item.prompt}"
        return self._default_prompt

    def _call(self, body: dict[str, Any]) -> str:
        """One attempt: the answer's text. Raises :class:`_RetryableError` or a ClipServeError."""
        try:
            with self._client.stream("POST", self._url, json=body, headers=self._headers) as resp:
                data = _read_capped(resp)
        except httpx.TimeoutException as exc:
            raise _RetryableError(
                InferenceError(f"the remote captioner did not answer in time ({_name(exc)})")
            ) from exc
        except httpx.TransportError as exc:
            raise _RetryableError(
                InferenceError(f"the remote captioner could not be reached ({_name(exc)})")
            ) from exc
        except RuntimeError as exc:  # httpx refuses a closed client
            if not self._closing.is_set():
                raise
            raise InferenceError("the openai-vision model was closed") from exc
        status = resp.status_code
        if 200 <= status < 300:
            return _answer_text(data)
        reason = self._reason(data)
        if status == 429 or status >= 500:
            what = " (rate limited)" if status == 429 else ""
            error = InferenceError(f"the remote captioner answered HTTP {status}{what}{reason}")
            raise _RetryableError(error, retry_after=retry_after_header(resp))
        if status in _CREDENTIAL_STATUSES:
            raise InferenceError(
                f"the remote captioner refused our credentials (HTTP {status}); check the "
                "model's api_key or OPENAI_API_KEY"
            )
        if status in _REFUSED_IMAGE_STATUSES:
            raise InvalidInputError(
                f"the remote captioner refused the image (HTTP {status}){reason}"
            )
        if 300 <= status < 400:
            raise InferenceError(
                f"the remote captioner answered HTTP {status}, a redirect (not followed); check "
                "the model's base_url"
            )
        raise InferenceError(f"the remote captioner answered HTTP {status}{reason}")

    def _reason(self, data: bytes) -> str:
        """``": <the remote's message>"`` (its OpenAI error message, or its body), quoted short
        and without our key; empty when there is none."""
        text = data.decode("utf-8", errors="replace")
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            error = parsed.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            if isinstance(message, str):
                text = message
        if self._secret:
            text = text.replace(self._secret, "***")
        text = " ".join(text.split())
        return f": {quote(text, _QUOTED_CHARS)}" if text else ""

    @staticmethod
    def _delay(attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, MAX_RETRY_AFTER_S)
        return float(min(FIRST_BACKOFF_S * 2**attempt, MAX_BACKOFF_S))

    def _interruptible_sleep(self, seconds: float) -> None:
        self._closing.wait(seconds)


# --- the answer ----------------------------------------------------------------------------------


def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise InferenceError(
                f"the remote captioner's answer is over {MAX_ANSWER_BYTES // (1024 * 1024)} MiB"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _answer_text(data: bytes) -> str:
    """``choices[0].message.content``, stripped: a string, or the texts of its parts joined."""
    malformed = InferenceError("the remote captioner's answer had no choices[0].message.content")
    try:
        parsed = json.loads(data)
    except ValueError as exc:  # also UnicodeDecodeError
        raise malformed from exc
    content: Any = None
    if isinstance(parsed, dict):
        choices = parsed.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            message = choices[0].get("message")
            if isinstance(message, dict):
                content = message.get("content")
    if isinstance(content, str):
        return content.strip()
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
            if isinstance(part.get("text"), str)
        ]
        if texts:
            return "".join(texts).strip()
    raise malformed


def _name(exc: BaseException) -> str:
    return type(exc).__name__


# --- the base URL --------------------------------------------------------------------------------


def _parse_base_url(base_url: str | None) -> tuple[str, str, str, int]:
    """The chat-completions URL, the URL shown in ``info`` (no query), the host and the port."""
    if not base_url:
        raise ModelLoadError("openai-vision needs base_url (the API's …/v1 URL)")
    try:
        parts = urlsplit(base_url.strip())
        port = parts.port
    except ValueError as exc:
        raise ModelLoadError(f"openai-vision base_url is not a valid URL ({exc})") from exc
    if parts.scheme.lower() not in ("http", "https"):
        raise ModelLoadError(
            f"openai-vision base_url must be an http:// or https:// URL, not "
            f"'{quote(parts.scheme, 20)}:'"
        )
    if parts.username is not None or parts.password is not None:
        raise ModelLoadError(
            "openai-vision base_url must not hold credentials (user:password@); give the key as "
            "the model's api_key or OPENAI_API_KEY"
        )
    host = parts.hostname
    if not host:
        raise ModelLoadError("openai-vision base_url has no host")
    if parts.fragment:
        raise ModelLoadError("openai-vision base_url must not have a #fragment")
    scheme = parts.scheme.lower()
    path = parts.path.rstrip("/")
    shown = f"{scheme}://{parts.netloc}{path}"
    query = f"?{parts.query}" if parts.query else ""
    url = f"{shown}/chat/completions{query}"
    return url, shown, host, port if port is not None else (443 if scheme == "https" else 80)


def _check_host(host: str, port: int, media: MediaSettings, resolver: HostResolver) -> None:
    """Refuse a host with an address in ``media.denied_networks``, or a non-public one unless
    ``media.allow_private_urls`` or ``media.allowed_networks`` allows it."""
    denied = [ipaddress.ip_network(n) for n in media.denied_networks]
    allowed = [ipaddress.ip_network(n) for n in media.allowed_networks]
    shown = quote(host, 100)
    literal = parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
    elif media.allow_private_urls and not denied:
        return  # nothing could be refused: the name is resolved when connecting
    else:
        addresses = _resolve(host, port, resolver)
    for ip in addresses:
        why = _refusal(ip, media, allowed, denied)
        if why is None:
            continue
        if literal is not None:
            spelled = "" if str(ip) == host else f" ({ip})"
            raise ModelLoadError(f"openai-vision base_url host '{shown}'{spelled} is {why}")
        raise ModelLoadError(
            f"openai-vision base_url host '{shown}' resolves to {why}",
            technical=f"openai-vision base_url host {host!r} resolves to {ip}",
        )


def _refusal(
    ip: IPAddress, media: MediaSettings, allowed: list[IPNetwork], denied: list[IPNetwork]
) -> str | None:
    network = network_of(ip, denied)
    if network is not None:
        return f"an address in media.denied_networks ({network})"
    if media.allow_private_urls or network_of(ip, allowed) is not None:
        return None
    reason = blocked_reason(ip)
    if reason is None:
        return None
    return f"{reason} address; set media.allow_private_urls or media.allowed_networks to allow it"


def _resolve(host: str, port: int, resolver: HostResolver) -> list[IPAddress]:
    shown = quote(host, 100)
    try:
        raw = resolver(host, port)
    except (OSError, UnicodeError, ValueError) as exc:
        raise ModelLoadError(
            f"openai-vision base_url host '{shown}' could not be resolved ({_name(exc)})",
            technical=f"resolving {host!r}: {exc}",
        ) from exc
    if not raw:
        raise ModelLoadError(f"openai-vision base_url host '{shown}' resolved to no address")
    addresses: list[IPAddress] = []
    for text in raw:
        try:
            addresses.append(ipaddress.ip_address(text.split("%", 1)[0]))
        except ValueError as exc:
            raise ModelLoadError(
                f"openai-vision base_url host '{shown}' resolved to an invalid address"
            ) from exc
    return addresses
