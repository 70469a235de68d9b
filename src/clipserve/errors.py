"""The one exception hierarchy of clipserve.

These errors say *what* went wrong in domain terms; they know nothing about HTTP. The single place
that turns them into status codes and response bodies is :mod:`clipserve.api.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

QUOTE_LIMIT = 200
"""How many characters of a client's input an error message quotes."""


def quote(value: str, limit: int = QUOTE_LIMIT) -> str:
    """Client input as a message may quote it: at most ``limit`` characters, then an ellipsis
    and the full length, so an error never echoes a large input."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… ({len(value)} characters)"


class ClipServeError(Exception):
    """Base class of every error clipserve raises on purpose.

    ``message`` is safe to show to a client; ``detail`` is optional structured context (also
    client-safe).
    """

    def __init__(self, message: str, *, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


# --- input
# -----------------------------------------------------------------------------------------


class InvalidInputError(ClipServeError):
    """The request is well-formed but asks for something impossible (oversized batch...)."""


class UnsupportedModalityError(InvalidInputError):
    """The model cannot embed this kind of input (e.g. images sent to a text-only model)."""


# --- models
# ----------------------------------------------------------------------------------------


class ModelNotFoundError(ClipServeError):
    """No enabled model has this config name."""

    def __init__(self, name: str, known: list[str], *, disabled: bool = False) -> None:
        what = "is disabled" if disabled else "is unknown"
        shown = quote(name, 100)
        super().__init__(
            f"model config '{shown}' {what}; available models: {', '.join(known) or '(none)'}",
            detail={"model": shown, "available_models": known, "disabled": disabled},
        )
        self.name = name
        self.known = known


class ModelUnavailableError(ClipServeError):
    """The model is registered but cannot serve: loading failed (no weights, no network...)."""

    def __init__(self, name: str, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(
            f"model '{name}' is unavailable: {reason}",
            detail={"model": name, "reason": reason},
        )
        self.name = name
        self.reason = reason
        self.retry_after_s = retry_after_s


def _gb(value: float) -> str:
    return f"{value:.1f}" if value >= 0.1 or value == 0 else f"{value:.2g}"


@dataclass(frozen=True, slots=True)
class MemoryUse:
    """One model's share of a device's memory budget, as a :class:`MemoryBudgetError` lists it.

    ``state``: ``loaded``, ``loading`` (a load in progress: its estimate is reserved) or
    ``unloading`` (retired; its memory is not released until its last request ends and it is
    closed)."""

    model: str
    gb: float
    in_flight: int = 0
    queued: int = 0
    state: Literal["loaded", "loading", "unloading"] = "loaded"

    def describe(self) -> str:
        parts: list[str] = [] if self.state == "loaded" else [self.state]
        if self.in_flight:
            parts.append(f"{self.in_flight} in flight")
        elif self.queued:
            parts.append(f"{self.queued} queued")
        elif self.state == "loaded":
            parts.append("idle")
        return f"'{self.model}' ({_gb(self.gb)} GB, {', '.join(parts)})"


class MemoryBudgetError(ModelUnavailableError):
    """Loading the model would take its device past the memory budget (``memory_budget_gb``),
    and no idle model could be unloaded to make room (or ``evict_idle`` is off)."""

    def __init__(
        self,
        name: str,
        *,
        device: str,
        needed_gb: float,
        budget_gb: float,
        left_gb: float,
        loaded: list[MemoryUse],
        hint: str,
        retry_after_s: float | None = None,
    ) -> None:
        listed = ", ".join(use.describe() for use in loaded)
        reason = (
            f"needs about {_gb(needed_gb)} GB on {device} but the memory budget "
            f"({_gb(budget_gb)} GB) has {_gb(left_gb)} GB left: "
            f"{'loaded ' + listed if listed else 'nothing else is loaded'}; {hint}"
        )
        super().__init__(name, reason, retry_after_s=retry_after_s)
        self.message = f"model '{name}' {reason}"
        self.args = (self.message,)
        self.detail = {
            "model": name,
            "reason": reason,
            "device": device,
            "budget_gb": round(budget_gb, 3),
            "needed_gb": round(needed_gb, 3),
            "left_gb": round(left_gb, 3),
            "loaded": [
                {
                    "model": use.model,
                    "gb": round(use.gb, 3),
                    "in_flight": use.in_flight,
                    "queued": use.queued,
                    "state": use.state,
                }
                for use in loaded
            ],
        }
        self.loaded = loaded


class ModelLoadError(ClipServeError):
    """Raised by a backend loader when weights or config cannot be loaded.

    ``message`` is client-safe: what failed and how to fix it, without filesystem paths or the
    library's exception text. ``technical`` is for the server log only: the full cause (exception
    types and texts, the paths involved), or None when the message is the whole story.
    """

    def __init__(self, message: str, *, detail: Any = None, technical: str | None = None) -> None:
        super().__init__(message, detail=detail)
        self.technical = technical


class ConfigError(ClipServeError):
    """The model registry configuration (file or environment) is invalid."""


# --- media
# -----------------------------------------------------------------------------------------


class MediaError(InvalidInputError):
    """Base class of every problem with an image input."""


class InvalidImageError(MediaError):
    """The bytes are not a decodable image ("image could not be decoded: ...")."""


class UnsupportedMediaTypeError(MediaError):
    """The input declares or contains a media type we do not accept (e.g. ``data:text/plain``)."""


class MediaTooLargeError(MediaError):
    """The image exceeds a byte or pixel limit."""


class MediaAccessDeniedError(MediaError):
    """The input points where we refuse to read: a path outside the media root, a private URL..."""


class MediaFetchError(MediaError):
    """The image URL could not be fetched because of the origin's answer (4xx) or a bad URL."""

    def __init__(
        self, message: str, *, detail: Any = None, upstream_status: int | None = None
    ) -> None:
        super().__init__(message, detail=detail)
        self.upstream_status = upstream_status


class MediaUpstreamError(MediaFetchError):
    """The image origin failed (network error, timeout, 5xx) even after retries."""


# --- access
# ----------------------------------------------------------------------------------------


class AuthenticationError(ClipServeError):
    """API keys are required and the request has none, or a wrong one."""


class ForbiddenError(ClipServeError):
    """The key is valid but may not do this (an admin endpoint without an admin key)."""


class RateLimitedError(ClipServeError):
    """The client (API key or address) exceeded its request or item rate."""

    def __init__(self, message: str, *, retry_after_s: float, detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.retry_after_s = retry_after_s


# --- engine
# ----------------------------------------------------------------------------------------


class QueueFullError(ClipServeError):
    """The service is overloaded and refuses new work."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReadyError(ClipServeError):
    """The engine is starting up or shutting down."""


class InferenceTimeoutError(ClipServeError):
    """The request's deadline passed before its result was ready."""


class InferenceError(ClipServeError):
    """The model failed while computing a batch (a real server-side failure)."""


class JobNotFoundError(ClipServeError):
    """No job has this id (or it was submitted with another API key, or has expired)."""

    def __init__(self, job_id: str) -> None:
        shown = quote(job_id, 100)
        super().__init__(f"job '{shown}' does not exist", detail={"job_id": shown})


# --- vector index
# ----------------------------------------------------------------------------------


class CollectionNotFoundError(ClipServeError):
    """No vector collection has this name (or it was deleted while in use)."""

    def __init__(self, name: str, *, known: list[str] | None = None) -> None:
        shown = quote(name, 100)
        listed = "" if known is None else f"; collections: {', '.join(known[:20]) or '(none)'}"
        super().__init__(
            f"collection '{shown}' does not exist{listed}", detail={"collection": shown}
        )
        self.name = name


class CollectionConflictError(ClipServeError):
    """A collection with this name already exists."""

    def __init__(self, name: str) -> None:
        shown = quote(name, 100)
        super().__init__(f"collection '{shown}' already exists", detail={"collection": shown})
        self.name = name


class DimensionMismatchError(InvalidInputError):
    """A vector's length is not the collection's dimension."""

    def __init__(self, collection: str, expected: int, got: int, *, what: str = "vector") -> None:
        super().__init__(
            f"{what} has dimension {got} but collection '{collection}' has dimension {expected}",
            detail={"collection": collection, "expected_dim": expected, "dim": got},
        )
        self.expected = expected
        self.got = got


class IndexBackendError(ClipServeError):
    """The vector index backend cannot serve: an optional library is not installed, a stored
    collection cannot be loaded, or a remote index (Milvus) failed. A server-side problem."""


class ItemNotFoundError(ClipServeError):
    """The collection has no item with this id."""

    def __init__(self, collection: str, item_id: str) -> None:
        shown = quote(item_id, 100)
        super().__init__(
            f"collection '{quote(collection, 100)}' has no item '{shown}'",
            detail={"collection": collection, "id": shown},
        )
