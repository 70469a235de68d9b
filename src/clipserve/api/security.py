"""Who is calling and how much they may do: optional API keys, and rate limits per caller.

Both run in ASGI middleware (:class:`AccessMiddleware`), from the headers, before the body is
read; their errors go through the one error mapping (401 / 429, OpenAI-shaped on OpenAI paths).
Keys are kept hashed (``sha256:<hex>``); a caller is its key's id when keys are on, else its
address. Rate limits use
the ``limits`` library's sliding-window counter (O(1) state per caller and limit, no bursts at
window edges), in memory or in Redis so that replicas share them. When the Redis storage fails,
requests are let through and the failure is logged and counted: an outage of the limiter must not
become an outage of the service.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from clipserve.config import AuthSettings, RateLimitSettings
from clipserve.errors import (
    AuthenticationError,
    ClipServeError,
    ConfigError,
    EngineNotReadyError,
    ForbiddenError,
    InvalidInputError,
    RateLimitedError,
)
from clipserve.observability.metrics import Metrics

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/evaluator/health", "/evaluator/metrics"})
"""Probes and metrics: open without a key (and never rate limited) when ``public_health``."""
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
UI_PREFIX = "/ui"
"""The playground's static page (``/ui``, ``/ui/...``): open, since its key is typed into it."""
_FILE_CHECK_INTERVAL_S = 2.0

Kind = Literal["requests", "items"]


def hash_key(key: str) -> str:
    """The form API keys are configured in: ``sha256:<hex digest>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def _parse_key_file(path: Path) -> frozenset[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API key file {path} could not be read: {exc}") from exc
    digests = set()
    for number, line in enumerate(lines, start=1):
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        digest = entry.removeprefix("sha256:")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(
                f"API key file {path}, line {number}: not a 'sha256:<64 hex digits>' hash "
                "(store hashes from `clipserve hash-key`, not keys)"
            )
        digests.add(digest)
    return frozenset(digests)


class ApiKeys:
    """The accepted key hashes: from settings, plus a file re-read when it changes."""

    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.monotonic):
        self.enabled = settings.enabled
        self._inline = frozenset(settings.api_keys) | frozenset(settings.admin_keys)
        self._admin = frozenset(settings.admin_keys)
        self._file = settings.api_keys_file
        self._clock = clock
        self._file_keys: frozenset[str] = frozenset()
        self._broken: str | None = None
        """Why the key file could not be read since it changed: then every key is refused."""
        self._stamp: tuple[int, int] | None = None
        self._checked_at = -math.inf
        if self._file is not None:
            self._file_keys = _parse_key_file(self._file)  # a bad file fails start-up loudly
            self._stamp = self._file_stamp()
            self._checked_at = clock()

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self._file is not None
        try:
            stat = self._file.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _refresh(self) -> None:
        if self._file is None or self._clock() - self._checked_at < _FILE_CHECK_INTERVAL_S:
            return
        self._checked_at = self._clock()
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        try:
            self._file_keys, self._broken = _parse_key_file(self._file), None
        except ConfigError as exc:
            # A deleted or corrupt file may be a revocation: keeping the old keys would keep
            # honouring keys someone meant to withdraw. Every key is refused until it is fixed.
            self._file_keys, self._broken = frozenset(), exc.message
            logger.error("API key file unusable, every key is refused: %s", exc.message)
        else:
            logger.info("API key file reloaded: %d keys", len(self._file_keys))
        self._stamp = stamp

    def identify(self, presented: str | None) -> str:
        """The caller id (``key:<first 12 hex of the hash>``); raises when the key is wrong."""
        if not presented:
            raise AuthenticationError(
                "this server requires an API key: send 'Authorization: Bearer <key>' or "
                "'X-API-Key: <key>'"
            )
        self._refresh()
        if self._broken is not None:
            logger.error("refusing a key: the API key file is unusable (%s)", self._broken)
            raise EngineNotReadyError(
                "the server's API key file is unusable (deleted or corrupt): every key is refused "
                "until an operator fixes it"
            )
        digest = hashlib.sha256(presented.encode("utf-8")).hexdigest()
        if digest in self._inline or digest in self._file_keys:
            return f"key:{digest[:12]}"
        raise AuthenticationError("invalid API key")

    def is_admin(self, presented: str | None) -> bool:
        if not presented:
            return False
        return hashlib.sha256(presented.encode("utf-8")).hexdigest() in self._admin


def presented_key(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = request.headers.get("x-api-key", "").strip()
    return key or None


def client_address(request: Request, *, trusted_proxies: int) -> str:
    """The client's address: the peer's, or behind ``trusted_proxies`` proxies, the
    ``X-Forwarded-For`` entry that many places from the right (each proxy appends the address
    it saw; entries further left are whatever the client wrote, and cannot be trusted)."""
    peer = request.client.host if request.client else "unknown"
    if trusted_proxies <= 0:
        return peer
    entries = [e.strip() for e in ",".join(request.headers.getlist("x-forwarded-for")).split(",")]
    if len(entries) < trusted_proxies:
        return peer  # fewer entries than proxies: the chain is not what it was configured as
    candidate = entries[-trusted_proxies]
    try:
        return str(ipaddress.ip_address(candidate))
    except ValueError:
        return peer


class RateLimiter:
    """Sliding-window limits per caller on requests and on items (``limits`` library)."""

    def __init__(self, settings: RateLimitSettings, metrics: Metrics) -> None:
        from limits import parse_many
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from limits.storage import storage_from_string

        self.enabled = settings.enabled
        self._limits = {
            "requests": parse_many(settings.requests) if settings.requests else [],
            "items": parse_many(settings.items) if settings.items else [],
        }
        url = settings.storage_url
        if url.startswith(("redis://", "rediss://", "memory://")):
            url = "async+" + url  # the asyncio implementations of the same storages
        self._storage: Any = storage_from_string(url)
        self._limiter = SlidingWindowCounterRateLimiter(self._storage)
        self._errors = metrics.rate_limit_storage_errors_total

    async def charge(self, caller: str, kind: Kind, cost: int = 1) -> None:
        """Count ``cost`` against every ``kind`` limit of ``caller``, or refuse with 429."""
        limits = self._limits[kind]
        if not limits or cost <= 0:
            return
        for item in limits:
            if cost > item.amount:
                raise InvalidInputError(
                    f"this request has {cost} {kind}; the limit allows at most {item}",
                    detail={"limit": str(item), kind: cost},
                )
        try:
            for item in limits:
                if not await self._limiter.test(item, kind, caller, cost=cost):
                    stats = await self._limiter.get_window_stats(item, kind, caller)
                    raise RateLimitedError(
                        f"rate limit exceeded: {item} {kind} for {caller}",
                        retry_after_s=max(1.0, stats.reset_time - time.time()),
                        detail={"limit": str(item), "kind": kind, "caller": caller},
                    )
            for item in limits:
                await self._limiter.hit(item, kind, caller, cost=cost)
        except RateLimitedError:
            raise
        except Exception as exc:  # the storage (Redis) is down: serve, and say so in the log
            self._errors.inc()
            logger.warning("rate limiting skipped: storage error %s: %s", type(exc).__name__, exc)


class Security:
    """API keys and rate limits of one app."""

    def __init__(self, auth: AuthSettings, rate_limit: RateLimitSettings, metrics: Metrics) -> None:
        self.auth = auth
        self.keys = ApiKeys(auth)
        self.limiter = RateLimiter(rate_limit, metrics)
        self._trusted_proxies = rate_limit.trusted_proxies

    def is_open(self, path: str) -> bool:
        if path in DOCS_PATHS or path == UI_PREFIX or path.startswith(UI_PREFIX + "/"):
            return True
        return self.auth.public_health and path in OPEN_PATHS

    def caller(self, request: Request) -> str:
        if self.keys.enabled:
            return self.keys.identify(presented_key(request))
        return "ip:" + client_address(request, trusted_proxies=self._trusted_proxies)


class AccessMiddleware:
    """Authenticates a request and counts it against its caller's request rate from its headers
    alone, before anything reads the body: an unauthenticated or over-limit client cannot make
    the server read (let alone parse) 60 MB of JSON. The caller id is left in the request's
    state for the item limits, which need the parsed body. Refusals go through ``refuse`` (the
    app's one error mapping, OpenAI-shaped on OpenAI paths)."""

    def __init__(
        self, app: ASGIApp, security: Security, refuse: Callable[[Scope, ClipServeError], Response]
    ) -> None:
        self.app = app
        self.security = security
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.security.is_open(scope.get("path", "")):
            try:
                caller = self.security.caller(Request(scope))
                await self.security.limiter.charge(caller, "requests")
            except ClipServeError as exc:
                await self.refuse(scope, exc)(scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


InputBudget = Callable[[int, str], Awaitable[None]]


async def input_budget(request: Request) -> InputBudget:
    """A dependency for routes that take many inputs: ``await admit(n, "documents")`` refuses
    more than ``server.max_batch_items`` (422) and counts them against the caller's item rate."""
    security: Security = request.app.state.security
    limit = request.app.state.settings.server.max_batch_items
    caller: str | None = getattr(request.state, "caller", None)

    async def admit(n: int, what: str) -> None:
        request.state.log = {"items": n}
        _check_count(n, what, limit)
        if caller is not None:
            await security.limiter.charge(caller, "items", n)

    return admit


ItemCharge = Callable[[int], Awaitable[None]]


async def item_charge(request: Request) -> ItemCharge:
    """A dependency for jobs, whose size has its own limit (``jobs.max_items``): ``await
    charge(n)`` counts ``n`` items against the caller's item rate."""
    security: Security = request.app.state.security
    caller: str | None = getattr(request.state, "caller", None)

    async def charge(n: int) -> None:
        request.state.log = {"items": n}
        if caller is not None:
            await security.limiter.charge(caller, "items", n)

    return charge


def _check_count(n: int, what: str, limit: int) -> None:
    if n > limit:
        raise InvalidInputError(
            f"the request has {n} {what}; the limit is {limit}",
            detail={"max_batch_items": limit},
        )


def counted_before_validation(
    field: str, what: str | None = None
) -> Callable[[Request], Awaitable[None]]:
    """A route dependency that refuses a JSON body whose list ``field`` holds more than
    ``server.max_batch_items`` entries before the body is validated: FastAPI has parsed the JSON
    (Starlette keeps it on the request, so this reads it for free) but solves dependencies before
    it validates the body, and validating 5000 items to refuse them costs 30 ms of CPU and a
    list of 10,000 errors. The route still admits the count it validated (``InputsDep``); ``what``
    names the items in the error (default: ``field``)."""

    async def check(request: Request) -> None:
        if not request.headers.get("content-type", "").startswith("application/json"):
            return
        try:
            body = await request.json()
        except ValueError:  # FastAPI answers a body that is not JSON itself
            return
        items = body.get(field) if isinstance(body, dict) else None
        if isinstance(items, list):
            limit = request.app.state.settings.server.max_batch_items
            _check_count(len(items), what or field, limit)

    return check


async def require_admin(request: Request) -> None:
    """A route dependency: with API keys on, only an admin key (``auth.admin_keys``) may pass
    (403 otherwise); without keys, the service is open, as every other route."""
    security: Security = request.app.state.security
    if security.keys.enabled and not security.keys.is_admin(presented_key(request)):
        raise ForbiddenError("this endpoint needs an admin key (auth.admin_keys)")
