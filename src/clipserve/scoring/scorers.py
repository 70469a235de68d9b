"""Two ways to score a job's pairs behind one interface: in this process (:class:`LocalScorer`,
the same engine as the service) or through a running service's batch endpoint
(:class:`RemoteScorer`)."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import mimetypes
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import httpx
from PIL import Image
from pydantic import ValidationError

from clipserve.api.schemas.evaluation import BatchEvaluationResponse
from clipserve.api.schemas.inference import CaptionResponse
from clipserve.config import MediaSettings, Settings
from clipserve.engine.core import prefetch_window
from clipserve.engine.engine import Engine
from clipserve.engine.registry import BackendLoader
from clipserve.engine.tasks.evaluate import EvalItem, EvalResult
from clipserve.errors import ClipServeError, ModelNotFoundError
from clipserve.media import ImageInput, SourceKind, classify, read_local_image
from clipserve.scoring.rows import ScoringInputError

logger = logging.getLogger(__name__)

Advance = Callable[[int], None]
"""Called with the number of pairs just finished."""

BATCH_PATH: Final = "/evaluator/v1/evaluation/batch"
MODELS_PATH: Final = "/v1/system/models"
CAPTION_PATH: Final = "/api/v1/caption"
CAPTION_REQUEST_IMAGES: Final = 32
SERVICE_BATCH_LIMIT: Final = 1000
"""The service's default ``server.max_batch_items``; a lower limit is learnt from its 422."""
MAX_REQUEST_CHARS: Final = 32 * 1024 * 1024
"""Requests are split so their images (data URIs included) stay under this many characters."""


class ServiceUnreachableError(ClipServeError):
    """The scoring service cannot be reached (connection refused, unknown host...)."""


class Scorer(Protocol):
    async def start(
        self, models: Sequence[str | None], *, caption_model: str | None = None
    ) -> None:
        """Get ready to score with ``models`` (None: the default model) and to caption with
        ``caption_model``; raise :class:`~clipserve.errors.ModelNotFoundError` for an unknown
        name."""

    def model_name(self, model: str | None) -> str:
        """The config name ``model`` stands for (resolves None to the default model)."""

    async def score(
        self, items: Sequence[EvalItem], *, batch_size: int, advance: Advance | None = None
    ) -> list[EvalResult]:
        """Results in input order; a failing pair carries its error, the others their score."""

    async def caption(self, images: Sequence[ImageInput], model: str) -> list[str | ClipServeError]:
        """A caption per image by caption model ``model``, in order, or that image's error."""

    async def close(self) -> None: ...


class LocalScorer:
    """Scores with an :class:`Engine` in this process. Models load in :meth:`start`, so a model
    that cannot load fails the job at once instead of failing every row."""

    def __init__(self, settings: Settings, *, loader: BackendLoader | None = None) -> None:
        # A one-off job: no config file watcher, and only the models it uses are loaded.
        self.settings = settings.model_copy(
            update={"preload": False, "config_reload_interval_s": 0}
        )
        self._loader = loader
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("LocalScorer.start() was not called")
        return self._engine

    async def start(
        self, models: Sequence[str | None], *, caption_model: str | None = None
    ) -> None:
        self._engine = Engine(self.settings, loader=self._loader)
        await self._engine.start()
        names = [self.model_name(m) for m in models]
        if caption_model is not None:
            names.append(caption_model)
        for name in names:
            self._engine.registry.spec(name)  # unknown names fail before anything loads
        for name in names:
            await self._engine.registry.get(name)

    def model_name(self, model: str | None) -> str:
        return model or self.settings.default_model

    async def score(
        self, items: Sequence[EvalItem], *, batch_size: int, advance: Advance | None = None
    ) -> list[EvalResult]:
        reported = 0

        def progress(done: int, total: int) -> None:
            nonlocal reported
            if advance is not None and done > reported:
                advance(done - reported)
            reported = max(reported, done)

        results = await self.engine.evaluate(
            items, window=prefetch_window(batch_size), progress=progress
        )
        progress(len(items), len(items))
        return results

    async def caption(self, images: Sequence[ImageInput], model: str) -> list[str | ClipServeError]:
        out: list[str | ClipServeError] = []
        step = self.settings.server.max_images_per_request
        for start in range(0, len(images), step):
            result = await self.engine.caption(model, images[start : start + step])
            out.extend(c.error or c.caption or "" for c in result.captions)
        return out

    async def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            await engine.close()


def data_uri(value: ImageInput, media: MediaSettings) -> str:
    """An image input as the service can take it: a local file (read here, under
    ``media.media_root``), bytes or a PIL image become a base64 data URI; URLs and data URIs
    pass through. Raises :class:`ClipServeError` for an unreadable file or unsupported input."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    if isinstance(value, bytes):
        return "data:application/octet-stream;base64," + base64.b64encode(value).decode("ascii")
    if classify(value) is not SourceKind.PATH:
        return value.strip()
    data = read_local_image(value, media)
    mime = mimetypes.guess_type(value.strip())[0] or ""
    if not mime.startswith("image/"):
        mime = "application/octet-stream"  # the service sniffs the bytes
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


class RemoteScorer:
    """Scores through ``POST /evaluator/v1/evaluation/batch`` of a running service.

    Local file paths are read here and sent as data URIs (the service cannot see this machine's
    files); URLs are fetched by the service. Requests hold at most ``max_items`` pairs (lowered
    when the service answers that its limit is smaller). A request that fails (non-200 answer,
    timeout) fails only its own pairs, with the service's error message; a refused connection
    raises :class:`ServiceUnreachableError` and ends the job.
    """

    def __init__(
        self,
        base_url: str,
        *,
        media: MediaSettings,
        timeout_s: float = 300.0,
        max_items: int = SERVICE_BATCH_LIMIT,
        max_request_chars: int = MAX_REQUEST_CHARS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if not base_url.lower().startswith(("http://", "https://")):
            raise ScoringInputError(f"service URL must start with http:// or https://: {base_url}")
        self.base_url = base_url.rstrip("/")
        self.media = media
        self.timeout_s = timeout_s
        self.max_items = max_items
        self.max_request_chars = max_request_chars
        self.default_model: str | None = None
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,
            headers={"User-Agent": "clipserve-score"},
        )

    async def start(
        self, models: Sequence[str | None], *, caption_model: str | None = None
    ) -> None:
        """Check the service is up and knows ``models`` and ``caption_model`` (skipped if it has
        no model list)."""
        response = await self._send("GET", MODELS_PATH)
        if response.status_code != 200:
            logger.warning("no model list from %s (HTTP %d)", self.base_url, response.status_code)
            return
        try:
            listing = response.json()
            known = [str(m["name"]) for m in listing["models"]]
            self.default_model = str(listing["default_model"])
        except (ValueError, KeyError, TypeError):
            logger.warning("unexpected model list from %s", self.base_url)
            return
        for model in (*models, caption_model):
            if model is not None and model not in known:
                raise ModelNotFoundError(model, known)

    def model_name(self, model: str | None) -> str:
        return model or self.default_model or "default"

    async def score(
        self, items: Sequence[EvalItem], *, batch_size: int, advance: Advance | None = None
    ) -> list[EvalResult]:
        """Items are encoded one at a time and sent as soon as a request is full, so at most
        about ``max_request_chars`` of images are held in memory."""
        results: list[EvalResult | None] = [None] * len(items)
        request: list[int] = []
        images: dict[int, str] = {}
        size = 0
        previous: tuple[ImageInput, str | ClipServeError] | None = None
        for index, item in enumerate(items):
            if previous is not None and previous[0] is item.image:
                image = previous[1]  # compare mode: the same row's image for the next model
            else:
                image = await self._encode(item.image)
                previous = (item.image, image)
            if isinstance(image, ClipServeError):
                results[index] = EvalResult(self.model_name(item.model), None, image)
                if advance is not None:
                    advance(1)
                continue
            if request and (
                len(request) >= self.max_items or size + len(image) > self.max_request_chars
            ):
                await self._send_batch(request, items, images, results, batch_size, advance)
                request, size = [], 0
            request.append(index)
            images[index] = image
            size += len(image)
        if request:
            await self._send_batch(request, items, images, results, batch_size, advance)
        return [r for r in results if r is not None]

    async def _encode(self, value: ImageInput) -> str | ClipServeError:
        try:
            return await asyncio.to_thread(data_uri, value, self.media)
        except ClipServeError as exc:
            return exc

    async def _send_batch(
        self,
        request: list[int],
        items: Sequence[EvalItem],
        images: dict[int, str],
        results: list[EvalResult | None],
        batch_size: int,
        advance: Advance | None,
    ) -> None:
        """Send one request (split again if the service's limit turns out lower) and record its
        results; the images are released afterwards."""
        answer = await self._post(
            [items[i] for i in request], [images[i] for i in request], batch_size
        )
        if answer is None:  # the service's limit is lower: max_items was lowered to it
            for start in range(0, len(request), self.max_items):
                part = request[start : start + self.max_items]
                await self._send_batch(part, items, images, results, batch_size, advance)
            return
        for index, result in zip(request, answer, strict=True):
            results[index] = result
            images.pop(index, None)
        if advance is not None:
            advance(len(request))

    async def _post(
        self, items: list[EvalItem], images: list[str], batch_size: int
    ) -> list[EvalResult] | None:
        """The results of one request, failed pairs for a failed request, or None when the
        service's batch limit is below ``max_items`` (which is then lowered)."""
        body = {
            "evaluations": [
                {"image_input": image, "text_prompt": item.text, "model_config_name": item.model}
                for item, image in zip(items, images, strict=True)
            ],
            "batch_size": max(1, min(batch_size, 1024)),
            "show_progress": False,
        }
        try:
            response = await self._send("POST", BATCH_PATH, json=body)
        except httpx.TimeoutException:
            return self._failed(items, f"the service did not answer within {self.timeout_s:g} s")
        except httpx.TransportError as exc:
            return self._failed(items, f"request to the service failed: {type(exc).__name__}")
        if response.status_code == 200:
            try:
                parsed = BatchEvaluationResponse.model_validate_json(response.content)
            except ValidationError:
                return self._failed(items, "the service sent an invalid batch response")
            if len(parsed.results) != len(items):
                return self._failed(
                    items, f"the service answered {len(parsed.results)} results for {len(items)}"
                )
            return [
                EvalResult(
                    model=r.model_used,
                    score=r.clip_score,
                    error=ClipServeError(r.error) if r.error is not None else None,
                    text_truncated=r.text_truncated,
                    processing_time_ms=r.processing_time_ms,
                )
                for r in parsed.results
            ]
        error, detail = _error_body(response)
        limit = detail.get("max_batch_items") if isinstance(detail, dict) else None
        if isinstance(limit, int) and 0 < limit < len(items):
            self.max_items = limit
            return None
        return self._failed(items, f"service error (HTTP {response.status_code}): {error}")

    async def caption(self, images: Sequence[ImageInput], model: str) -> list[str | ClipServeError]:
        """Through ``POST /api/v1/caption``, :data:`CAPTION_REQUEST_IMAGES` images a request
        (local files sent as data URIs); a failed request fails its images."""
        out: list[str | ClipServeError] = []
        for start in range(0, len(images), CAPTION_REQUEST_IMAGES):
            part = images[start : start + CAPTION_REQUEST_IMAGES]
            encoded = [await self._encode(image) for image in part]
            sent = [e for e in encoded if isinstance(e, str)]
            answers = iter(await self._post_captions(sent, model) if sent else [])
            out.extend(e if isinstance(e, ClipServeError) else next(answers) for e in encoded)
        return out

    async def _post_captions(self, images: list[str], model: str) -> list[str | ClipServeError]:
        try:
            response = await self._send(
                "POST", CAPTION_PATH, json={"model": model, "images": images}
            )
        except httpx.TimeoutException:
            failure = ClipServeError(f"the service did not answer within {self.timeout_s:g} s")
            return [failure] * len(images)
        except httpx.TransportError as exc:
            failure = ClipServeError(f"request to the service failed: {type(exc).__name__}")
            return [failure] * len(images)
        if response.status_code != 200:
            error, _ = _error_body(response)
            failure = ClipServeError(f"service error (HTTP {response.status_code}): {error}")
            return [failure] * len(images)
        try:
            parsed = CaptionResponse.model_validate_json(response.content)
        except ValidationError:
            failure = ClipServeError("the service sent an invalid caption response")
            return [failure] * len(images)
        if len(parsed.captions) != len(images):
            failure = ClipServeError(
                f"the service answered {len(parsed.captions)} captions for {len(images)}"
            )
            return [failure] * len(images)
        return [
            ClipServeError(c.error) if c.error is not None else (c.caption or "")
            for c in parsed.captions
        ]

    def _failed(self, items: Sequence[EvalItem], message: str) -> list[EvalResult]:
        error = ClipServeError(message)
        return [EvalResult(self.model_name(item.model), None, error) for item in items]

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise ServiceUnreachableError(
                f"cannot connect to the clipserve service at {self.base_url}: {exc or 'refused'}"
            ) from exc

    async def close(self) -> None:
        await self._client.aclose()


def _error_body(response: httpx.Response) -> tuple[str, Any]:
    """``(error, detail)`` from a ``{"error", "detail"}`` body, or a snippet of any other body."""
    try:
        body = response.json()
    except ValueError:
        return (response.text.strip()[:200] or response.reason_phrase), None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"], body.get("detail")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # OpenAI-style
        return str(body["error"].get("message", body["error"])), None
    return str(body)[:200], None
