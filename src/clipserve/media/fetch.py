"""Fetching image URLs: one pooled client, retries with backoff, byte caps and an SSRF guard.

Every hop of a redirect chain is parsed and scheme-checked, its host is matched against
``media.denied_hosts`` / ``media.allowed_hosts``, and (unless ``allow_private_urls``) the host is
resolved by us and refused if any address is not public (``media.allowed_networks`` excepted) or
is in ``media.denied_networks``. The connection then goes to a checked address, so a second DNS
answer cannot redirect it (DNS rebinding): the checked addresses are pinned for the request (a
context variable) and :class:`PinnedNetworkBackend`, under httpx's connection pool, connects only
to them, trying the next one when one cannot be connected to. URLs, ``Host`` headers, TLS server
names, certificate checks and keep-alive pools all stay those of the host name, as without pinning.
With ``allow_private_urls`` and no ``denied_networks``, httpx resolves and connects by name.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import re
import socket
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Final, Self, TypeAlias
from urllib.parse import unquote, urlsplit

import httpcore
import httpx

from clipserve.config import MediaSettings
from clipserve.errors import (
    MediaAccessDeniedError,
    MediaFetchError,
    MediaTooLargeError,
    MediaUpstreamError,
    UnsupportedMediaTypeError,
    quote,
)
from clipserve.media.source import describe

Resolver: TypeAlias = Callable[[str, int], Awaitable[list[str]]]
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER_S: Final = 5.0  # a longer Retry-After ends the retries at once
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_ACCEPT: Final = "image/webp,image/png,image/jpeg,image/gif,image/*;q=0.8,*/*;q=0.5"
_NOT_IMAGE_TYPES: Final = frozenset(
    {
        "application/json",
        "application/xml",
        "application/xhtml+xml",
        "application/javascript",
        "application/x-javascript",
        "application/pdf",
        "image/svg+xml",
    }
)
_INET_ATON_PART: Final = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_HOST_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")  # names, after IDNA
_MAX_LABEL: Final = 63  # characters in one label of a host name (RFC 1035)
MAX_PINNED_ADDRESSES: Final = 4  # checked addresses tried in turn when connecting fails

Pins: TypeAlias = tuple[str, tuple[str, ...]]
"""The host a request is for, and the checked addresses its connection may go to."""
_PINS: contextvars.ContextVar[Pins | None] = contextvars.ContextVar("clipserve_pins", default=None)


def current_pins() -> Pins | None:
    """The pins of the request being sent in this task (None: connect by name)."""
    return _PINS.get()


class PinnedNetworkBackend(httpcore.AsyncNetworkBackend):
    """Opens TCP connections only to the addresses pinned for the current request.

    httpcore opens a pool's connections in the task of the request that needs them, so the pins
    set around ``client.send`` are the ones in force here. A connection for another host than the
    pinned one is refused; without pins (``allow_private_urls``) the host name is used as given.
    """

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pins = _PINS.get()
        if pins is None:
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        pinned_host, addresses = pins
        if host.strip("[]").lower() != pinned_host.strip("[]").lower():
            raise httpcore.ConnectError(f"refusing to connect to unchecked host '{host[:100]}'")
        *others, last = addresses[:MAX_PINNED_ADDRESSES]
        for address in others:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                logger.info("connecting to %s for '%s' failed (%s)", address, host[:100], exc)
        return await self._inner.connect_tcp(last, port, timeout, local_address, socket_options)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("image URLs are never fetched over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport over a pool whose connections go through the pinned backend."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(  # the only way in for a network backend
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=PinnedNetworkBackend(),
        )


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve ``host`` with the event loop's ``getaddrinfo`` (all families)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` denotes if it is an IP literal in any form ``inet_aton`` accepts
    (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``, ``[::1]``), else None."""
    host = unquote(host).strip("[]").removesuffix(".")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_INET_ATON_PART.fullmatch(p) for p in parts):
        return None
    # A part of more than 11 significant digits is over 2**32 in any base: no address (and no
    # 5000-digit int() conversion, which Python refuses with a ValueError).
    if any(len((p[2:] if p[:2].lower() == "0x" else p).lstrip("0")) > 11 for p in parts):
        return None
    numbers = [
        int(p[2:] or "0", 16) if p[:2].lower() == "0x" else int(p, 8 if p[:1] == "0" else 10)
        for p in parts
    ]
    *head, last = numbers
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        return None
    value = 0
    for n in head:
        value = value * 256 + n
    return ipaddress.IPv4Address(value * 256 ** (4 - len(head)) + last)


def embedded_ipv4(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped, 6to4 or NAT64 IPv6 address wraps, else ``ip`` itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return embedded
    return ip


def blocked_reason(ip: IPAddress) -> str | None:
    """Why ``ip`` must not be fetched from ("a loopback", ...), or None when it is public."""
    ip = embedded_ipv4(ip)
    checks = (
        ("a loopback", ip.is_loopback),
        ("an unspecified", ip.is_unspecified),
        ("a link-local", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a reserved", ip.is_reserved),
        ("a private", ip.is_private),
        ("a non-public", not ip.is_global),
    )
    return next((reason for reason, hit in checks if hit), None)


class _RetryableError(Exception):
    """One attempt failed in a way worth retrying (network error, timeout, 5xx, 429)."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class UrlFetcher:
    """Downloads image URLs through one shared ``httpx.AsyncClient`` (close with :meth:`aclose`)."""

    def __init__(
        self,
        settings: MediaSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self._settings = settings
        self._resolver: Resolver = resolver or system_resolver
        self._allowed_networks = [ipaddress.ip_network(n) for n in settings.allowed_networks]
        self._denied_networks = [ipaddress.ip_network(n) for n in settings.denied_networks]
        self._semaphore = asyncio.Semaphore(settings.max_concurrent_fetches)
        self._sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        limits = httpx.Limits(
            max_connections=settings.max_concurrent_fetches,
            max_keepalive_connections=min(20, settings.max_concurrent_fetches),
        )
        self._client = httpx.AsyncClient(
            transport=transport or _PinnedTransport(limits),
            headers={
                "User-Agent": settings.user_agent,
                "Accept": _ACCEPT,
                "Accept-Encoding": "identity",  # images are compressed already; no gzip bombs
            },
            timeout=httpx.Timeout(settings.fetch_timeout_s, connect=settings.connect_timeout_s),
            follow_redirects=False,
            trust_env=False,  # no proxies or .netrc credentials from the environment
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def fetch(self, url: str) -> bytes:
        """The body of ``url`` (at most ``max_image_bytes``), following redirects and retrying."""
        return await self._fetch_with_retries(self._parse(url))

    async def _fetch_with_retries(self, url: httpx.URL) -> bytes:
        settings = self._settings
        attempts = settings.fetch_retries + 1
        made = 0
        failure = _RetryableError("no attempt made")
        while made < attempts:
            made += 1
            started = time.perf_counter()
            try:
                # A concurrency slot per attempt: never held while backing off between attempts.
                async with self._semaphore, asyncio.timeout(settings.fetch_timeout_s):
                    return await self._follow(url)
            except _RetryableError as exc:
                failure = exc
            except (TimeoutError, httpx.TimeoutException) as exc:
                elapsed = time.perf_counter() - started
                kind = type(exc).__name__ if isinstance(exc, httpx.TimeoutException) else "deadline"
                failure = _RetryableError(
                    f"timed out after {elapsed:.1f} s ({kind}, limit "
                    f"{settings.fetch_timeout_s:g} s) fetching {describe(str(url))}"
                )
            except httpx.TransportError as exc:
                failure = _RetryableError(
                    f"network error ({_exception_text(exc)}) fetching {describe(str(url))}"
                )
            if made >= attempts:
                break
            delay = settings.retry_backoff_s * 2 ** (made - 1)
            if failure.retry_after is not None:
                if failure.retry_after > MAX_RETRY_AFTER_S:
                    failure.reason += f" with Retry-After {failure.retry_after:g} s"
                    break
                delay = max(delay, failure.retry_after)
            logger.warning(
                "image fetch attempt %d/%d failed: %s; retrying in %.2f s",
                made,
                attempts,
                failure.reason,
                delay,
            )
            await self._sleep(delay)
        plural = "attempt" if made == 1 else "attempts"
        raise MediaUpstreamError(
            f"image could not be fetched: {failure.reason} (gave up after {made} {plural})",
            upstream_status=failure.status,
        )

    async def _follow(self, url: httpx.URL) -> bytes:
        current = url
        for _ in range(self._settings.max_redirects + 1):
            self._check_host_name(current)
            pinned = None
            if not self._settings.allow_private_urls or self._denied_networks:
                pinned = await self._check_host(current)
            response = await self._send(current, pinned)
            try:
                location = response.headers.get("location")
                if response.status_code in _REDIRECT_STATUSES and location:
                    current = self._parse(location, base=current)
                    continue
                return await self._read(response, current)
            finally:
                await response.aclose()
        raise MediaFetchError(
            f"image could not be fetched: too many redirects (more than "
            f"{self._settings.max_redirects}) starting at {describe(str(url))}",
            detail={"max_redirects": self._settings.max_redirects},
        )

    async def _send(self, url: httpx.URL, addresses: list[IPAddress] | None) -> httpx.Response:
        """GET ``url`` (streamed); with ``addresses``, its connection may go only to them."""
        request = self._client.build_request("GET", url)
        if addresses is None:
            return await self._client.send(request, stream=True)
        pinned = tuple(dict.fromkeys(str(ip) for ip in addresses))
        token = _PINS.set((url.raw_host.decode("ascii"), pinned))
        try:
            return await self._client.send(request, stream=True)
        finally:
            _PINS.reset(token)

    async def _read(self, response: httpx.Response, url: httpx.URL) -> bytes:
        shown = describe(str(url))
        status = response.status_code
        if status == 429 or status >= 500:
            raise _RetryableError(
                f"HTTP {status} from {shown}",
                status=status,
                retry_after=retry_after_header(response),
            )
        if not 200 <= status < 300:
            raise MediaFetchError(
                f"image could not be fetched: HTTP {status} from {shown}", upstream_status=status
            )
        mime = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if _is_clearly_not_image(mime):
            raise UnsupportedMediaTypeError(
                f"image URL returned content type '{mime[:80]}', not an image: {shown}",
                detail={"content_type": mime[:80]},
            )
        limit = self._settings.max_image_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MediaTooLargeError(
                f"image is too large: {shown} declares {int(declared)} bytes, over the limit of "
                f"{limit} bytes",
                detail={"num_bytes": int(declared), "max_image_bytes": limit},
            )
        wbits = _inflation(response, shown)
        inflate = None if wbits is None else zlib.decompressobj(wbits)
        body = bytearray()

        def add(data: bytes) -> None:
            body.extend(data)
            if len(body) > limit:
                raise MediaTooLargeError(
                    f"image is too large: {shown} sent more than {limit} bytes",
                    detail={"max_image_bytes": limit},
                )

        # Raw bytes: httpx's own decoding inflates a whole chunk at once, and a few kilobytes of
        # nested gzip inflate to gigabytes. Here the cap applies to the inflated stream as it
        # grows: zlib never returns more than what is left of the budget (+1, to see it pass).
        # A gzip body may hold several members (`cat a.gz b.gz`): each one that ends starts the
        # next on what follows it. A stream that ends before its trailer (CRC and length) is cut.
        try:
            async for chunk in response.aiter_raw():
                if inflate is None or wbits is None:
                    add(chunk)
                    continue
                pending = chunk
                while pending:
                    add(inflate.decompress(pending, limit + 1 - len(body)))
                    if not inflate.eof:
                        pending = inflate.unconsumed_tail
                    elif wbits > zlib.MAX_WBITS and (pending := inflate.unused_data):
                        inflate = zlib.decompressobj(wbits)  # the next gzip member
                    else:
                        pending = b""  # what follows a deflate stream is ignored
            if inflate is not None:
                add(inflate.flush())
                if not inflate.eof:
                    raise MediaFetchError(
                        f"image could not be fetched: the compressed response from {shown} ends "
                        "before its compressed stream does (truncated)"
                    )
        except zlib.error as exc:
            raise MediaFetchError(
                f"image could not be fetched: the compressed response from {shown} is corrupt "
                f"({exc})"
            ) from exc
        return bytes(body)

    def _parse(self, url: str, *, base: httpx.URL | None = None) -> httpx.URL:
        """Parse (or resolve against ``base``) and check scheme, host and port."""
        try:
            parsed = base.join(url) if base is not None else httpx.URL(url.strip())
        except httpx.InvalidURL as exc:
            self._refuse_literal_host(url)  # e.g. `0177.0.0.1`, which httpx rejects outright
            # httpx's text repeats the offending host or port: quoted short, like all input.
            raise MediaFetchError(f"invalid image URL {describe(url)}: {quote(str(exc))}") from exc
        shown = describe(str(parsed) if base is not None else url)
        try:
            parsed.host  # noqa: B018 - decodes an 'xn--' label, which may not be valid IDNA
        except UnicodeError as exc:  # idna.IDNAError is one
            raise MediaFetchError(
                f"invalid image URL {shown}: its host is not a valid internationalised domain "
                f"name ({quote(str(exc), 100)})"
            ) from exc
        if parsed.scheme not in ("http", "https"):
            where = f" in a redirect from {describe(str(base))}" if base is not None else ""
            raise UnsupportedMediaTypeError(
                f"unsupported image URL scheme '{parsed.scheme[:20]}'{where}: only http and https "
                "URLs are fetched"
            )
        if not parsed.host:
            raise MediaFetchError(f"invalid image URL {shown}: it has no host")
        raw_host = parsed.raw_host.decode("ascii", "replace")
        if parse_ip_literal(raw_host) is None:  # a name: refused before any DNS lookup
            if not _HOST_RE.fullmatch(raw_host):
                raise MediaFetchError(
                    f"invalid image URL {shown}: the host name '{raw_host[:100]}' has characters "
                    "a host name cannot have"
                )
            labels = raw_host.removesuffix(".").split(".")
            if any(not label or len(label) > _MAX_LABEL for label in labels):
                raise MediaFetchError(  # the resolver would raise on these, not answer
                    f"invalid image URL {shown}: the host name '{raw_host[:100]}' has an empty "
                    f"label or one longer than {_MAX_LABEL} characters"
                )
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise MediaFetchError(f"invalid image URL {shown}: port {parsed.port} is out of range")
        return parsed

    def _refuse_literal_host(self, url: str) -> None:
        try:
            host = urlsplit(url.strip()).hostname or ""
        except ValueError:
            return
        ip = parse_ip_literal(host)
        if ip is not None:
            self._check_address(host, ip, literal=True)

    def _check_host_name(self, url: httpx.URL) -> None:
        """Refuse ``url``'s host if ``media.denied_hosts`` has it or ``media.allowed_hosts``
        (when set) has not."""
        host = url.raw_host.decode("ascii")
        ip = parse_ip_literal(host)
        key = str(ip) if ip is not None else host.lower().removesuffix(".")
        settings = self._settings
        if any(_host_matches(key, pattern) for pattern in settings.denied_hosts):
            where = "is in media.denied_hosts"
        elif settings.allowed_hosts and not any(
            _host_matches(key, pattern) for pattern in settings.allowed_hosts
        ):
            where = "is not in media.allowed_hosts"
        else:
            return
        raise MediaAccessDeniedError(
            f"image URL refused: host '{host[:100]}' {where}", detail={"host": host[:100]}
        )

    async def _check_host(self, url: httpx.URL) -> list[IPAddress]:
        """Resolve ``url``'s host and refuse it unless every address may be fetched from."""
        host = url.raw_host.decode("ascii")
        literal = parse_ip_literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            addresses = await self._resolve(host, port)
        for ip in addresses:
            self._check_address(host, ip, literal=literal is not None)
        return addresses

    def _check_address(self, host: str, ip: IPAddress, *, literal: bool) -> None:
        """Refuse ``ip`` if it is in ``media.denied_networks``, or not public (unless
        ``allow_private_urls`` or ``media.allowed_networks`` allows it)."""
        denied = network_of(ip, self._denied_networks)
        if denied is not None:
            raise _refused(host, ip, f"in media.denied_networks ({denied})", literal=literal)
        if self._settings.allow_private_urls or network_of(ip, self._allowed_networks):
            return
        reason = blocked_reason(ip)
        if reason is not None:
            why = f"{reason} address; set media.allow_private_urls to allow it"
            raise _refused(host, ip, why, literal=literal)

    async def _resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            raw = await self._resolver(host, port)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                raise _RetryableError(f"DNS lookup of '{host[:100]}' failed ({exc})") from exc
            raise MediaFetchError(
                f"image could not be fetched: host '{host[:100]}' could not be resolved "
                f"({exc.strerror or exc})"
            ) from exc
        except OSError as exc:
            raise _RetryableError(f"DNS lookup of '{host[:100]}' failed ({exc})") from exc
        except (UnicodeError, ValueError) as exc:  # what the resolver cannot even look up
            raise MediaFetchError(
                f"image could not be fetched: host '{host[:100]}' is not a valid host name"
            ) from exc
        if not raw:
            raise MediaFetchError(
                f"image could not be fetched: host '{host[:100]}' resolved to no address"
            )
        addresses: list[IPAddress] = []
        for text in raw:
            try:
                addresses.append(ipaddress.ip_address(text))
            except ValueError as exc:
                raise MediaAccessDeniedError(
                    f"image URL refused: host '{host[:100]}' resolved to an invalid address "
                    f"'{text[:60]}'"
                ) from exc
        return addresses


def _refused(host: str, ip: IPAddress, why: str, *, literal: bool) -> MediaAccessDeniedError:
    """The refusal. A name's resolved address is not said (the log has it): it would map the
    internal network for whoever asks."""
    if literal:
        return MediaAccessDeniedError(
            f"image URL refused: host '{host[:100]}' is {ip}, {why}",
            detail={"host": host[:100], "address": str(ip)},
        )
    logger.info("image URL refused: host %r resolves to %s, %s", host[:100], ip, why)
    return MediaAccessDeniedError(
        f"image URL refused: host '{host[:100]}' resolves to {_article(why)}",
        detail={"host": host[:100]},
    )


def _article(why: str) -> str:
    """``a loopback address; ...`` as it is; ``in media.denied_networks (...)`` with a noun."""
    return f"an address {why}" if why.startswith("in ") else why


def _host_matches(host: str, pattern: str) -> bool:
    """``host`` (lower-case, no trailing dot) is ``pattern``, or a subdomain for ``*.domain``."""
    return host.endswith(pattern[1:]) if pattern.startswith("*.") else host == pattern


def network_of(ip: IPAddress, networks: list[IPNetwork]) -> IPNetwork | None:
    """The first of ``networks`` holding ``ip`` or the IPv4 address it wraps."""
    candidates = {ip, embedded_ipv4(ip)}
    return next((net for net in networks if any(a in net for a in candidates)), None)


def _is_clearly_not_image(mime: str) -> bool:
    return (
        mime.startswith(("text/", "audio/", "video/"))
        or mime in _NOT_IMAGE_TYPES
        or mime.endswith(("+json", "+xml"))
    )


_INFLATE_WBITS = {
    "gzip": 16 + zlib.MAX_WBITS,
    "x-gzip": 16 + zlib.MAX_WBITS,
    "deflate": zlib.MAX_WBITS,
}


def _inflation(response: httpx.Response, shown: str) -> int | None:
    """zlib's ``wbits`` for a response sent with one layer of gzip or deflate (though we ask for
    identity), None for an uncompressed one; any other encoding, or more than one layer, is
    refused."""
    layers = [
        token.strip().lower()
        for token in response.headers.get("content-encoding", "").split(",")
        if token.strip() and token.strip().lower() != "identity"
    ]
    if not layers:
        return None
    if len(layers) > 1 or layers[0] not in _INFLATE_WBITS:
        encoding = ", ".join(layers)[:80]
        raise UnsupportedMediaTypeError(
            f"image URL sent its body with Content-Encoding '{encoding}': only an uncompressed "
            f"body, or one layer of gzip or deflate, is accepted: {shown}",
            detail={"content_encoding": encoding},
        )
    return _INFLATE_WBITS[layers[0]]


def retry_after_header(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (a number or an HTTP date), or None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _exception_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
