"""Two ways to embed a bulk job's rows behind one interface: in this process
(:class:`LocalEmbedder`, a :class:`~clipserve.local.LocalModel`) or through a running service's
``POST /v1/embeddings`` (:class:`RemoteEmbedder`).

Both answer a call all or nothing, as the engine and the OpenAI shape do. A call that fails
because of one of its inputs raises :class:`ItemError`; :func:`embed_each` then splits the call
in halves until the failing inputs stand alone, so one unreadable image costs its row, not the
run. Any other exception (model unavailable, service down) ends the run; finished shards stay.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

import httpx
import numpy as np

from clipserve.config import MediaSettings, Settings
from clipserve.engine.registry import BackendLoader
from clipserve.errors import (
    AuthenticationError,
    ClipServeError,
    InvalidInputError,
    ModelNotFoundError,
    UnsupportedModalityError,
)
from clipserve.local import LocalModel
from clipserve.media import ImageInput
from clipserve.scoring.scorers import ServiceUnreachableError, data_uri

T = TypeVar("T")

EMBEDDINGS_PATH: Final = "/v1/embeddings"
MODELS_PATH: Final = "/v1/system/models"
MAX_REQUEST_CHARS: Final = 24 * 1024 * 1024
"""Requests are split so their inputs stay under this many characters (the service's default
body limit is 32 MiB)."""
SERVICE_BATCH_LIMIT: Final = 1000
"""The service's default ``server.max_batch_items``."""


class ItemError(Exception):
    """An input of the call cannot be embedded (an unreadable image...)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RemoteServiceError(ClipServeError):
    """The service failed a request for a reason no input explains (5xx, bad answer, timeout)."""


class Embedder(Protocol):
    model: str
    """The model's config name (the default resolved)."""
    chunk_size: int
    """Inputs per call: enough to keep the model busy, few enough to split cheaply."""

    def prepare_image(self, image: ImageInput) -> ImageInput:
        """The image as :meth:`embed_images` takes it; raises :class:`ItemError`."""

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """(n, dim) float32 L2-normalised, in order; raises :class:`ItemError`."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def embed_dim(self) -> int: ...

    def close(self) -> None: ...


def embed_each(
    embed: Callable[[Sequence[T]], np.ndarray], items: Sequence[T]
) -> list[np.ndarray | str]:
    """Per item, its vector or the message of its :class:`ItemError`: a failing call is split
    in halves until each failure is alone (about ``2 log2(n)`` extra calls per bad item)."""
    out: list[np.ndarray | str] = [""] * len(items)

    def run(lo: int, hi: int) -> None:
        try:
            vectors = embed(items[lo:hi])
        except ItemError as exc:
            if hi - lo == 1:
                out[lo] = exc.message
                return
            middle = (lo + hi) // 2
            run(lo, middle)
            run(middle, hi)
            return
        if len(vectors) != hi - lo:
            raise RuntimeError(f"{len(vectors)} embeddings for {hi - lo} inputs")
        out[lo:hi] = list(vectors)

    if items:
        run(0, len(items))
    return out


class LocalEmbedder:
    """A :class:`~clipserve.local.LocalModel` in this process (loaded on construction)."""

    def __init__(
        self,
        settings: Settings,
        model: str | None,
        *,
        batch_size: int,
        loader: BackendLoader | None = None,
    ) -> None:
        self._model = LocalModel(model, settings=settings, loader=loader)
        self.model = self._model.name
        self.batch_size = batch_size
        limit = min(settings.server.max_images_per_request, settings.server.max_batch_items)
        self.chunk_size = max(1, min(4 * batch_size, limit))

    def prepare_image(self, image: ImageInput) -> ImageInput:
        return image

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        return self._call(self._model.embed_images, images)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._call(self._model.embed_texts, texts)

    def _call(self, embed: Callable[..., np.ndarray], inputs: Sequence[Any]) -> np.ndarray:
        try:
            return embed(inputs, batch_size=self.batch_size)
        except UnsupportedModalityError:
            raise  # the model, not an input: every row would fail
        except InvalidInputError as exc:  # media errors included
            raise ItemError(exc.message) from exc

    def embed_dim(self) -> int:
        info = self._model.status.info
        if info is None:
            return int(self.embed_texts(["a"]).shape[1])
        return info.embed_dim

    def close(self) -> None:
        self._model.close()

    def __enter__(self) -> LocalEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteEmbedder:
    """``POST /v1/embeddings`` of a running clipserve service (OpenAI's body, ``modality``
    ``image`` for images, base64 vectors). Local files are read here and sent as data URIs (under
    ``media.media_root``); URLs are fetched by the service.

    Answers 400/415 (``invalid_image``), 413, 422 and 502 (``invalid_image``, the image's
    origin failed) blame the inputs (:class:`ItemError`); 429 and 503 are retried after their
    ``Retry-After``; anything else raises :class:`RemoteServiceError`.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None,
        *,
        media: MediaSettings,
        batch_size: int,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        retries: int = 5,
        max_request_chars: int = MAX_REQUEST_CHARS,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not base_url.lower().startswith(("http://", "https://")):
            raise InvalidInputError(f"service URL must start with http:// or https://: {base_url}")
        self.base_url = base_url.rstrip("/")
        self.media = media
        self.chunk_size = max(1, min(batch_size, SERVICE_BATCH_LIMIT))
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_request_chars = max_request_chars
        headers = {"User-Agent": "clipserve-embed"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.Client(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            headers=headers,
            transport=transport,
        )
        self._dim: int | None = None
        try:
            self.model = self._resolve(model)
        except BaseException:
            self.close()
            raise

    def _resolve(self, model: str | None) -> str:
        """Check the service is up and knows ``model``; the default model's name for None."""
        response = self._send("GET", MODELS_PATH)
        if response.status_code == 401:
            raise AuthenticationError(f"{self.base_url} requires an API key: pass --api-key")
        if response.status_code != 200:
            if model is None:
                raise RemoteServiceError(
                    f"no model list from {self.base_url} (HTTP {response.status_code}): "
                    "name the model with --model"
                )
            return model
        try:
            listing = response.json()
            known = [str(m["name"]) for m in listing["models"]]
            default = str(listing["default_model"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteServiceError(f"unexpected model list from {self.base_url}") from exc
        if model is not None and model not in known:
            raise ModelNotFoundError(model, known)
        return model or default

    def prepare_image(self, image: ImageInput) -> ImageInput:
        try:
            return data_uri(image, self.media)
        except ClipServeError as exc:
            raise ItemError(exc.message) from exc

    def embed_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        values = [i for i in images if isinstance(i, str)]
        if len(values) != len(images):
            raise TypeError("prepare_image() turns every image into a string first")
        return self._embed(values, "image")

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._embed(list(texts), "text")

    def _embed(self, inputs: list[str], modality: str) -> np.ndarray:
        parts: list[list[str]] = [[]]
        size = 0
        for value in inputs:
            if parts[-1] and size + len(value) > self.max_request_chars:
                parts.append([])
                size = 0
            parts[-1].append(value)
            size += len(value)
        vectors = [self._post(part, modality) for part in parts if part]
        return np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)

    def _post(self, inputs: list[str], modality: str) -> np.ndarray:
        body = {
            "model": self.model,
            "input": inputs,
            "modality": modality,
            "encoding_format": "base64",
        }
        for attempt in range(self.retries + 1):
            try:
                response = self._send("POST", EMBEDDINGS_PATH, json=body)
            except httpx.TimeoutException as exc:
                raise RemoteServiceError(
                    f"the service did not answer within {self.timeout_s:g} s"
                ) from exc
            status = response.status_code
            if status == 200:
                return self._vectors(response, len(inputs))
            message, code = _error(response)
            if status in (429, 503) and attempt < self.retries:
                time.sleep(_retry_after(response, attempt))
                continue
            if status == 401:
                raise AuthenticationError(f"the service refused the API key: {message}")
            blamed = status in (413, 422) or (status in (400, 415, 502) and code == "invalid_image")
            if blamed:
                raise ItemError(message)
            raise RemoteServiceError(f"the service answered HTTP {status}: {message}")
        raise AssertionError("unreachable")

    def _vectors(self, response: httpx.Response, count: int) -> np.ndarray:
        try:
            data = sorted(response.json()["data"], key=lambda d: int(d["index"]))
            rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
            vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 0), np.float32)
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteServiceError("the service sent an invalid embeddings response") from exc
        if len(vectors) != count:
            raise RemoteServiceError(f"the service answered {len(vectors)} embeddings for {count}")
        self._dim = int(vectors.shape[1])
        return vectors

    def embed_dim(self) -> int:
        if self._dim is not None:
            return self._dim
        response = self._send("GET", f"{MODELS_PATH}/{self.model}/info")
        try:
            dim = response.json()["runtime"]["embed_dim"]
        except (ValueError, KeyError, TypeError):
            dim = None
        if isinstance(dim, int):
            self._dim = dim
            return dim
        return int(self.embed_texts(["a"]).shape[1])

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ServiceUnreachableError(
                f"cannot connect to the clipserve service at {self.base_url}: {exc or 'refused'}"
            ) from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RemoteEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _error(response: httpx.Response) -> tuple[str, str | None]:
    """``(message, code)`` from an OpenAI error body (or a snippet of any other body)."""
    try:
        body = response.json()
    except ValueError:
        return (response.text.strip()[:200] or response.reason_phrase), None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        return str(error.get("message", error)), code if isinstance(code, str) else None
    if isinstance(error, str):
        return error, None
    return str(body)[:200], None


def _retry_after(response: httpx.Response, attempt: int) -> float:
    try:
        seconds = float(response.headers.get("retry-after", ""))
    except ValueError:
        seconds = 2.0**attempt
    return min(max(seconds, 0.0), 30.0)
