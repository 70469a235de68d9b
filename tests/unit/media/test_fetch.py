"""UrlFetcher with httpx.MockTransport and a fake resolver: SSRF guard, redirects, retries, caps."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpcore
import httpx
import pytest

from clipserve.config import MediaSettings
from clipserve.errors import (
    MediaAccessDeniedError,
    MediaFetchError,
    MediaTooLargeError,
    MediaUpstreamError,
    UnsupportedMediaTypeError,
)
from clipserve.media import UrlFetcher
from clipserve.media import fetch as fetch_module
from clipserve.media.fetch import PinnedNetworkBackend, Pins, current_pins

PUBLIC = "93.184.215.14"
IMAGE = b"\x89PNG fake image bytes"
Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


class FakeResolver:
    """Maps host names to addresses; records every lookup."""

    def __init__(self, hosts: dict[str, list[str]] | None = None) -> None:
        self.hosts = {"img.example": [PUBLIC], **(hosts or {})}
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.hosts:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.hosts[host]


class Harness:
    """A fetcher over a mock transport, recording requests and backoff sleeps."""

    def __init__(self, handler: Handler, resolver: FakeResolver, **settings: Any) -> None:
        self.requests: list[httpx.Request] = []
        self.pins: list[Pins | None] = []
        self.sleeps: list[float] = []
        self.resolver = resolver

        async def record(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            self.pins.append(current_pins())  # what the connection of this request may go to
            response = await handler(request)
            if response.is_stream_consumed:  # built from bytes: stream them as a server would
                stream = httpx.ByteStream(response.content)
                return httpx.Response(response.status_code, headers=response.headers, stream=stream)
            return response

        async def sleep(delay: float) -> None:
            self.sleeps.append(delay)

        self.settings = MediaSettings(**settings)
        self.fetcher = UrlFetcher(
            self.settings, transport=httpx.MockTransport(record), resolver=resolver
        )
        self.fetcher._sleep = sleep  # backoff is asserted, not waited for

    async def fetch(self, url: str) -> bytes:
        return await self.fetcher.fetch(url)

    @property
    def addresses(self) -> list[str]:
        """The first address each request's connection was pinned to."""
        return [pins[1][0] for pins in self.pins if pins is not None]


@pytest.fixture
async def harness() -> AsyncIterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(
        handler: Handler | list[httpx.Response] | None = None,
        *,
        hosts: dict[str, list[str]] | None = None,
        resolver: FakeResolver | None = None,
        **settings: Any,
    ) -> Harness:
        if handler is None or isinstance(handler, list):
            responses = list(handler or [httpx.Response(200, content=IMAGE)])

            async def scripted(request: httpx.Request) -> httpx.Response:
                return responses.pop(0) if len(responses) > 1 else responses[0]

            handler = scripted
        made.append(Harness(handler, resolver or FakeResolver(hosts), **settings))
        return made[-1]

    yield make
    for item in made:
        await item.fetcher.aclose()


URL = "http://img.example/a.png"
ALLOW_HINT = "set media.allow_private_urls to allow it"


# --- success --------------------------------------------------------------------------------------


async def test_fetches_with_our_headers(harness: Callable[..., Harness]) -> None:
    h = harness(user_agent="clipserve-test/1")
    assert await h.fetch("https://img.example/a.png") == IMAGE

    (request,) = h.requests
    assert request.headers["user-agent"] == "clipserve-test/1"
    assert request.headers["accept"].startswith("image/")
    assert h.resolver.calls == [("img.example", 443)]


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "image/jpeg"])
async def test_allowed_content_types(
    harness: Callable[..., Harness], content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    h = harness([httpx.Response(200, headers=headers, content=IMAGE)])
    assert await h.fetch(URL) == IMAGE


async def test_private_addresses_are_allowed_when_configured(
    harness: Callable[..., Harness],
) -> None:
    h = harness(hosts={"intranet": ["10.0.0.7"]}, allow_private_urls=True)
    assert await h.fetch("http://intranet/a.png") == IMAGE
    assert await h.fetch("http://127.0.0.1:8080/a.png") == IMAGE
    assert h.resolver.calls == []  # httpx resolves on its own


# --- SSRF guard -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback"),
        ("127.8.9.10", "a loopback"),
        ("10.1.2.3", "a private"),
        ("172.16.5.4", "a private"),
        ("172.31.255.255", "a private"),
        ("192.168.1.1", "a private"),
        ("169.254.169.254", "a link-local"),  # cloud metadata
        ("0.0.0.0", "an unspecified"),
        ("224.0.0.1", "a multicast"),
        ("240.0.0.1", "a reserved"),
        ("100.64.0.1", "a non-public"),  # carrier-grade NAT
        ("::1", "a loopback"),
        ("::", "an unspecified"),
        ("fc00::1", "a private"),
        ("fd12:3456::1", "a private"),
        ("fe80::1", "a link-local"),
        ("ff02::1", "a multicast"),
        ("::ffff:127.0.0.1", "a loopback"),  # IPv4-mapped IPv6
        ("::ffff:169.254.169.254", "a link-local"),
        ("2002:a00:1::", "a private"),  # 6to4 wrapping 10.0.0.1
    ],
)
async def test_private_addresses_are_refused(
    harness: Callable[..., Harness], address: str, reason: str
) -> None:
    h = harness(hosts={"img.example": [address]})
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == (  # the internal address itself is not said
        f"image URL refused: host 'img.example' resolves to {reason} address; {ALLOW_HINT}"
    )
    assert "address" not in caught.value.detail
    assert str(ipaddress.ip_address(address)) not in str(caught.value)
    assert h.requests == []


async def test_any_private_address_refuses_the_host(harness: Callable[..., Harness]) -> None:
    h = harness(hosts={"img.example": [PUBLIC, "10.0.0.1"]})
    with pytest.raises(MediaAccessDeniedError, match=r"resolves to a private address"):
        await h.fetch(URL)
    assert h.requests == []


@pytest.mark.parametrize(
    ("url", "host", "address", "reason"),
    [
        ("http://127.0.0.1/", "127.0.0.1", "127.0.0.1", "a loopback"),
        ("http://2130706433/", "2130706433", "127.0.0.1", "a loopback"),  # decimal
        ("http://0x7f000001/", "0x7f000001", "127.0.0.1", "a loopback"),  # hex
        ("http://0177.0.0.1/", "0177.0.0.1", "127.0.0.1", "a loopback"),  # octal
        ("http://127.1/", "127.1", "127.0.0.1", "a loopback"),  # short
        ("http://0x7f.1/", "0x7f.1", "127.0.0.1", "a loopback"),  # mixed
        ("http://127.0.0.1./", "127.0.0.1.", "127.0.0.1", "a loopback"),  # trailing dot
        ("http://0/", "0", "0.0.0.0", "an unspecified"),
        (
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254",
            "169.254.169.254",
            "a link-local",
        ),  # fmt: skip
        ("http://[::1]:8080/", "::1", "::1", "a loopback"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:127.0.0.1", "::ffff:7f00:1", "a loopback"),
        ("http://[::ffff:a00:1]/", "::ffff:a00:1", "::ffff:a00:1", "a private"),
    ],
)
async def test_literal_ip_hosts_in_any_encoding_are_refused(
    harness: Callable[..., Harness], url: str, host: str, address: str, reason: str
) -> None:
    h = harness()
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch(url)
    assert str(caught.value) == (
        f"image URL refused: host '{host}' is {address}, {reason} address; {ALLOW_HINT}"
    )
    assert h.requests == []
    assert h.resolver.calls == []


async def test_redirect_to_a_private_host_is_refused(harness: Callable[..., Harness]) -> None:
    h = harness(
        [httpx.Response(302, headers={"location": "http://internal.example/secret.png"})],
        hosts={"internal.example": ["10.0.0.5"]},
    )
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == (
        f"image URL refused: host 'internal.example' resolves to a private address; {ALLOW_HINT}"
    )
    assert [str(r.url) for r in h.requests] == [URL]
    assert h.resolver.calls == [("img.example", 80), ("internal.example", 80)]


async def test_redirect_to_a_literal_metadata_ip_is_refused(
    harness: Callable[..., Harness],
) -> None:
    h = harness([httpx.Response(301, headers={"location": "http://169.254.169.254/"})])
    with pytest.raises(MediaAccessDeniedError, match=r"^image URL refused: host '169\.254"):
        await h.fetch(URL)
    assert len(h.requests) == 1


@pytest.mark.parametrize("location", ["file:///etc/passwd", "gopher://img.example/x"])
async def test_redirect_to_another_scheme_is_refused(
    harness: Callable[..., Harness], location: str
) -> None:
    h = harness([httpx.Response(302, headers={"location": location})])
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        await h.fetch(URL)
    scheme = location.split(":")[0]
    assert str(caught.value) == (
        f"unsupported image URL scheme '{scheme}' in a redirect from {URL}: only http and https "
        "URLs are fetched"
    )


@pytest.mark.parametrize("url", ["ftp://img.example/a.png", "file:///etc/passwd"])
async def test_non_http_schemes_are_refused(harness: Callable[..., Harness], url: str) -> None:
    h = harness()
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        await h.fetch(url)
    assert str(caught.value) == (
        f"unsupported image URL scheme '{url.split(':')[0]}': only http and https URLs are fetched"
    )
    assert h.requests == []


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http:///a.png", "invalid image URL http:///a.png: it has no host"),
        (
            "http://img.example:99999/",
            "invalid image URL http://img.example:99999/: port 99999 is out of range",
        ),  # fmt: skip
    ],
)
async def test_invalid_urls(harness: Callable[..., Harness], url: str, message: str) -> None:
    h = harness()
    with pytest.raises(MediaFetchError) as caught:
        await h.fetch(url)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "host",
    ["a..example", "a" * 64 + ".example", "img." + "b" * 100, "x." * 10 + "." + "y"],
)
async def test_host_names_no_resolver_could_look_up_are_refused_before_dns(
    harness: Callable[..., Harness], host: str
) -> None:
    h = harness()
    with pytest.raises(MediaFetchError, match="an empty label or one longer than 63 characters"):
        await h.fetch(f"http://{host}/a.png")
    assert h.resolver.calls == []


async def test_a_resolver_that_raises_on_a_name_is_a_client_error(
    harness: Callable[..., Harness],
) -> None:
    class Raising(FakeResolver):
        async def __call__(self, host: str, port: int) -> list[str]:
            raise UnicodeError("encoding with 'idna' codec failed (label too long)")

    h = harness(resolver=Raising())
    with pytest.raises(MediaFetchError, match="is not a valid host name"):
        await h.fetch("http://weird.example/a.png")


async def test_unknown_host_is_not_retried(harness: Callable[..., Harness]) -> None:
    h = harness()
    with pytest.raises(MediaFetchError) as caught:
        await h.fetch("http://nohost.example/a.png")
    assert str(caught.value) == (
        "image could not be fetched: host 'nohost.example' could not be resolved "
        "(Name or service not known)"
    )
    assert type(caught.value) is MediaFetchError
    assert h.resolver.calls == [("nohost.example", 80)]


# --- connecting to the checked address ------------------------------------------------------------

PUBLIC_2 = "93.184.215.15"
PUBLIC_V6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


async def test_requests_are_pinned_to_the_checked_address(harness: Callable[..., Harness]) -> None:
    h = harness()
    assert await h.fetch("http://user:pw@img.example/a.png?size=2") == IMAGE

    (request,) = h.requests
    assert str(request.url) == "http://user:pw@img.example/a.png?size=2"  # the name, as usual
    assert request.headers["authorization"].startswith("Basic ")  # credentials still sent
    assert h.pins == [("img.example", (PUBLIC,))]


async def test_https_keeps_its_host_name_for_tls(harness: Callable[..., Harness]) -> None:
    h = harness(hosts={"v6.example": [PUBLIC_V6, PUBLIC]})
    assert await h.fetch("https://img.example:8443/a.png") == IMAGE
    assert await h.fetch("https://v6.example/a.png") == IMAGE

    first, second = h.requests
    assert str(first.url) == "https://img.example:8443/a.png"  # SNI and certificate: the name
    assert "sni_hostname" not in first.extensions
    assert str(second.url) == "https://v6.example/a.png"
    assert h.pins == [("img.example", (PUBLIC,)), ("v6.example", (PUBLIC_V6, PUBLIC))]


async def test_literal_public_ip_is_pinned_without_resolving(
    harness: Callable[..., Harness],
) -> None:
    h = harness()
    assert await h.fetch(f"http://{PUBLIC}:8080/a.png") == IMAGE
    assert h.pins == [(PUBLIC, (PUBLIC,))]
    assert h.resolver.calls == []


async def test_nothing_is_pinned_when_private_urls_are_allowed(
    harness: Callable[..., Harness],
) -> None:
    h = harness(allow_private_urls=True)
    assert await h.fetch(URL) == IMAGE
    assert h.pins == [None]  # httpx resolves and connects by name


class RebindingResolver(FakeResolver):
    """Answers with a public address first and with loopback ever after."""

    async def __call__(self, host: str, port: int) -> list[str]:
        answer = await super().__call__(host, port)
        self.hosts[host] = ["127.0.0.1"]
        return answer


async def test_dns_rebinding_cannot_move_the_connection(harness: Callable[..., Harness]) -> None:
    h = harness(resolver=RebindingResolver())
    assert await h.fetch(URL) == IMAGE
    assert h.pins == [("img.example", (PUBLIC,))]  # the checked answer, not a second lookup's
    assert h.resolver.calls == [("img.example", 80)]


# --- the pinned network backend -------------------------------------------------------------------


class FakeBackend(httpcore.AsyncNetworkBackend):
    """Records connection attempts; refuses the addresses in ``down``."""

    def __init__(
        self, down: set[str] | None = None, error: type[Exception] = httpcore.ConnectError
    ):
        self.down = down or set()
        self.error = error
        self.attempts: list[tuple[str, int]] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.attempts.append((host, port))
        if host in self.down:
            raise self.error(f"{host} is unreachable")
        return object()

    async def sleep(self, seconds: float) -> None:
        return None


async def connect(
    backend: PinnedNetworkBackend, pins: Pins | None, host: str = "img.example"
) -> Any:
    token = fetch_module._PINS.set(pins)  # noqa: SLF001  (set by UrlFetcher._send in real use)
    try:
        return await backend.connect_tcp(host, 443)
    finally:
        fetch_module._PINS.reset(token)  # noqa: SLF001


async def test_the_backend_connects_only_to_pinned_addresses() -> None:
    inner = FakeBackend()
    backend = PinnedNetworkBackend(inner)
    assert await connect(backend, ("img.example", (PUBLIC,))) is not None
    assert inner.attempts == [(PUBLIC, 443)]
    with pytest.raises(httpcore.ConnectError, match="refusing to connect to unchecked host"):
        await connect(backend, ("img.example", (PUBLIC,)), host="evil.example")
    assert await connect(backend, None, host="by-name.example") is not None  # unpinned mode
    assert inner.attempts[-1] == ("by-name.example", 443)
    with pytest.raises(httpcore.ConnectError, match="unix sockets"):
        await backend.connect_unix_socket("/run/docker.sock")


@pytest.mark.parametrize("error", [httpcore.ConnectError, httpcore.ConnectTimeout])
async def test_the_backend_tries_the_next_address(error: type[Exception]) -> None:
    inner = FakeBackend(down={PUBLIC_V6}, error=error)
    backend = PinnedNetworkBackend(inner)
    assert await connect(backend, ("img.example", (PUBLIC_V6, PUBLIC))) is not None
    assert inner.attempts == [(PUBLIC_V6, 443), (PUBLIC, 443)]


async def test_the_backend_tries_at_most_four_addresses() -> None:
    answers = (PUBLIC, PUBLIC_2, "93.184.215.16", "93.184.215.17", "93.184.215.18")
    inner = FakeBackend(down=set(answers))
    with pytest.raises(httpcore.ConnectError, match="93.184.215.17 is unreachable"):
        await connect(PinnedNetworkBackend(inner), ("img.example", answers))
    assert [host for host, _ in inner.attempts] == list(answers[:4])


async def test_other_errors_do_not_try_the_next_address() -> None:
    inner = FakeBackend(down={PUBLIC}, error=OSError)
    with pytest.raises(OSError, match="unreachable"):
        await connect(PinnedNetworkBackend(inner), ("img.example", (PUBLIC, PUBLIC_2)))
    assert inner.attempts == [(PUBLIC, 443)]


async def test_the_default_transport_uses_the_pinned_backend() -> None:
    async with UrlFetcher(MediaSettings()) as fetcher:
        pool = fetcher._client._transport._pool  # noqa: SLF001
        assert isinstance(pool._network_backend, PinnedNetworkBackend)  # noqa: SLF001


# --- host and network lists -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://images.example.com/a.png", True),
        ("http://IMAGES.Example.COM./a.png", True),  # case and a trailing dot
        ("http://a.cdn.example/a.png", True),
        ("http://a.b.cdn.example/a.png", True),
        ("http://cdn.example/a.png", False),  # `*.` is for subdomains, not the apex
        ("http://xcdn.example/a.png", False),
        ("http://img.images.example.com/a.png", False),
        ("http://images.example.com.evil.test/a.png", False),
        (f"http://{PUBLIC}/a.png", False),
    ],
)
async def test_allowed_hosts(harness: Callable[..., Harness], url: str, allowed: bool) -> None:
    host = httpx.URL(url).host
    h = harness(
        hosts={host: [PUBLIC]},
        allowed_hosts=("Images.Example.com.", "*.CDN.example"),
    )
    if allowed:
        assert await h.fetch(url) == IMAGE
        assert h.addresses == [PUBLIC]
        return
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch(url)
    assert str(caught.value) == f"image URL refused: host '{host}' is not in media.allowed_hosts"
    assert h.requests == []
    assert h.resolver.calls == []


@pytest.mark.parametrize("allow_private_urls", [False, True])
async def test_denied_hosts_win_and_are_checked_first(
    harness: Callable[..., Harness], allow_private_urls: bool
) -> None:
    h = harness(
        hosts={"x.evil.example": [PUBLIC]},
        allowed_hosts=("*.evil.example",),
        denied_hosts=("x.evil.example",),
        allow_private_urls=allow_private_urls,
    )
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch("http://X.evil.example./a.png")
    assert str(caught.value) == "image URL refused: host 'x.evil.example.' is in media.denied_hosts"
    assert h.requests == []
    assert h.resolver.calls == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"denied_hosts": ("*.evil.example",)}, "is in media.denied_hosts"),
        ({"allowed_hosts": ("img.example",)}, "is not in media.allowed_hosts"),
    ],
)
async def test_host_lists_apply_to_every_redirect_hop(
    harness: Callable[..., Harness], setting: dict[str, tuple[str, ...]], message: str
) -> None:
    h = harness(
        [httpx.Response(302, headers={"location": "http://cdn.evil.example/a.png"})],
        hosts={"cdn.evil.example": [PUBLIC_2]},
        **setting,
    )
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == f"image URL refused: host 'cdn.evil.example' {message}"
    assert h.addresses == [PUBLIC]
    assert h.resolver.calls == [("img.example", 80)]


async def test_allowed_networks_let_a_private_address_through(
    harness: Callable[..., Harness],
) -> None:
    h = harness(
        hosts={"store.internal": ["10.1.2.7"], "other.internal": ["10.1.3.7"]},
        allowed_networks=("10.1.2.0/24",),
    )
    assert await h.fetch("http://store.internal/a.png") == IMAGE
    assert await h.fetch("http://10.1.2.8/a.png") == IMAGE
    assert h.addresses == ["10.1.2.7", "10.1.2.8"]  # still pinned to the checked address
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch("http://other.internal/a.png")
    assert str(caught.value) == (
        f"image URL refused: host 'other.internal' resolves to a private address; {ALLOW_HINT}"
    )


@pytest.mark.parametrize(
    ("url", "answer", "refusal"),
    [
        (URL, PUBLIC, "host 'img.example' resolves to an address in"),
        (URL, f"::ffff:{PUBLIC}", "host 'img.example' resolves to an address in"),
        (f"http://{PUBLIC}/", PUBLIC, f"host '{PUBLIC}' is {PUBLIC}, in"),
    ],
)
async def test_denied_networks_refuse_public_addresses(
    harness: Callable[..., Harness], url: str, answer: str, refusal: str
) -> None:
    h = harness(hosts={"img.example": [answer]}, denied_networks=("93.184.0.0/16",))
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch(url)
    assert str(caught.value) == (
        f"image URL refused: {refusal} media.denied_networks (93.184.0.0/16)"
    )
    assert h.requests == []


async def test_denied_networks_apply_with_allow_private_urls(
    harness: Callable[..., Harness],
) -> None:
    h = harness(
        hosts={"intranet": ["10.0.0.5"], "printer": ["192.168.1.5"]},
        allow_private_urls=True,
        denied_networks=("10.0.0.0/8",),
        allowed_networks=("10.0.0.0/8",),  # the denial wins
    )
    with pytest.raises(MediaAccessDeniedError) as caught:
        await h.fetch("http://intranet/a.png")
    assert str(caught.value) == (
        "image URL refused: host 'intranet' resolves to an address in media.denied_networks "
        "(10.0.0.0/8)"
    )
    assert await h.fetch("http://printer/a.png") == IMAGE
    assert h.addresses == ["192.168.1.5"]  # resolved by us, checked and pinned
    assert h.resolver.calls == [("intranet", 80), ("printer", 80)]


# --- redirects ------------------------------------------------------------------------------------


async def test_redirects_are_followed_and_rechecked(harness: Callable[..., Harness]) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "img.example":
            return httpx.Response(301, headers={"location": "https://cdn.example/b/c.png"})
        if request.url.path == "/b/c.png":
            return httpx.Response(307, headers={"location": "../final.png"})
        return httpx.Response(200, content=IMAGE)

    h = harness(handler, hosts={"cdn.example": ["93.184.215.15"]})
    assert await h.fetch(URL) == IMAGE
    assert [str(r.url) for r in h.requests] == [
        URL,
        "https://cdn.example/b/c.png",
        "https://cdn.example/final.png",
    ]
    assert h.addresses == [PUBLIC, "93.184.215.15", "93.184.215.15"]
    assert h.resolver.calls == [("img.example", 80), ("cdn.example", 443), ("cdn.example", 443)]


async def test_too_many_redirects(harness: Callable[..., Harness]) -> None:
    h = harness([httpx.Response(302, headers={"location": "/loop"})], max_redirects=2)
    with pytest.raises(MediaFetchError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == (
        f"image could not be fetched: too many redirects (more than 2) starting at {URL}"
    )
    assert len(h.requests) == 3
    assert h.sleeps == []


# --- retries --------------------------------------------------------------------------------------


async def test_5xx_is_retried_with_exponential_backoff(harness: Callable[..., Harness]) -> None:
    h = harness(
        [httpx.Response(503), httpx.Response(502), httpx.Response(200, content=IMAGE)],
        retry_backoff_s=0.25,
    )
    assert await h.fetch(URL) == IMAGE
    assert len(h.requests) == 3
    assert h.sleeps == [0.25, 0.5]


async def test_the_fetch_slot_is_not_held_while_backing_off(
    harness: Callable[..., Harness],
) -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/flaky.png" and len(h.requests) == 1:
            return httpx.Response(503)
        return httpx.Response(200, content=IMAGE)

    h = harness(handler, max_concurrent_fetches=1)
    others: list[bytes] = []

    async def sleep(delay: float) -> None:  # while backing off, the only slot is free
        others.append(await asyncio.wait_for(h.fetch(URL), 5))

    h.fetcher._sleep = sleep
    assert await h.fetch("http://img.example/flaky.png") == IMAGE
    assert others == [IMAGE]


async def test_exhausted_retries(harness: Callable[..., Harness]) -> None:
    h = harness([httpx.Response(503)], fetch_retries=3, retry_backoff_s=0.1)
    with pytest.raises(MediaUpstreamError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == (
        f"image could not be fetched: HTTP 503 from {URL} (gave up after 4 attempts)"
    )
    assert caught.value.upstream_status == 503
    assert len(h.requests) == 4
    assert h.sleeps == pytest.approx([0.1, 0.2, 0.4])


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451])
async def test_4xx_fails_at_once(harness: Callable[..., Harness], status: int) -> None:
    h = harness([httpx.Response(status)])
    with pytest.raises(MediaFetchError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == f"image could not be fetched: HTTP {status} from {URL}"
    assert type(caught.value) is MediaFetchError
    assert caught.value.upstream_status == status
    assert len(h.requests) == 1
    assert h.sleeps == []


async def test_messages_hide_url_credentials(harness: Callable[..., Harness]) -> None:
    h = harness([httpx.Response(404)])
    with pytest.raises(MediaFetchError) as caught:
        await h.fetch("http://user:secret@img.example/a.png")
    assert (
        str(caught.value)
        == "image could not be fetched: HTTP 404 from http://***@img.example/a.png"
    )


async def test_connection_errors_are_retried(harness: Callable[..., Harness]) -> None:
    async def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    h = harness(refuse, fetch_retries=2)
    with pytest.raises(MediaUpstreamError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == (
        "image could not be fetched: network error (ConnectError: connection refused) fetching "
        f"{URL} (gave up after 3 attempts)"
    )
    assert caught.value.upstream_status is None
    assert len(h.requests) == 3
    assert h.sleeps == [0.2, 0.4]


async def test_connection_error_then_success(harness: Callable[..., Harness]) -> None:
    calls = 0

    async def flaky(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ReadTimeout("read timed out", request=request)
        return httpx.Response(200, content=IMAGE)

    h = harness(flaky)
    assert await h.fetch(URL) == IMAGE
    assert calls == 2


async def test_whole_download_deadline(harness: Callable[..., Harness]) -> None:
    never = asyncio.Event()

    async def hang(request: httpx.Request) -> httpx.Response:
        await never.wait()
        return httpx.Response(200)

    h = harness(hang, fetch_timeout_s=0.05, fetch_retries=1)
    with pytest.raises(MediaUpstreamError) as caught:
        await h.fetch(URL)
    assert str(caught.value).startswith("image could not be fetched: timed out after 0.")
    assert str(caught.value).endswith(
        f"(deadline, limit 0.05 s) fetching {URL} (gave up after 2 attempts)"
    )
    assert len(h.requests) == 2


async def test_429_honours_a_small_retry_after(harness: Callable[..., Harness]) -> None:
    h = harness(
        [httpx.Response(429, headers={"retry-after": "1.5"}), httpx.Response(200, content=IMAGE)]
    )
    assert await h.fetch(URL) == IMAGE
    assert h.sleeps == [1.5]


async def test_429_with_a_long_retry_after_gives_up(harness: Callable[..., Harness]) -> None:
    h = harness([httpx.Response(429, headers={"retry-after": "3600"})])
    with pytest.raises(MediaUpstreamError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == (
        f"image could not be fetched: HTTP 429 from {URL} with Retry-After 3600 s "
        "(gave up after 1 attempt)"
    )
    assert caught.value.upstream_status == 429
    assert h.sleeps == []


async def test_no_retries_when_disabled(harness: Callable[..., Harness]) -> None:
    h = harness([httpx.Response(500)], fetch_retries=0)
    with pytest.raises(MediaUpstreamError, match=r"\(gave up after 1 attempt\)$"):
        await h.fetch(URL)
    assert len(h.requests) == 1


# --- size and type --------------------------------------------------------------------------------


async def test_declared_content_length_over_the_cap(harness: Callable[..., Harness]) -> None:
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        pulled += 1
        yield b"x" * 1000

    h = harness(
        [httpx.Response(200, headers={"content-length": "1000"}, content=body())],
        max_image_bytes=100,
    )
    with pytest.raises(MediaTooLargeError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == (
        f"image is too large: {URL} declares 1000 bytes, over the limit of 100 bytes"
    )
    assert pulled == 0
    assert h.sleeps == []


async def test_streamed_body_is_cut_at_the_cap(harness: Callable[..., Harness]) -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(10_000):
            pulled += 1
            yield b"x" * 64

    h = harness([httpx.Response(200, content=endless())], max_image_bytes=1000)
    with pytest.raises(MediaTooLargeError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == f"image is too large: {URL} sent more than 1000 bytes"
    assert pulled == 16


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def _encoded(encoding: str, raw: bytes) -> httpx.Response:
    """A response whose body is sent as these raw bytes (httpx would decode `content=`)."""
    headers = {"content-encoding": encoding, "content-length": str(len(raw))}
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(raw))


async def test_a_gzip_body_is_inflated_within_the_cap(harness: Callable[..., Harness]) -> None:
    for encoding, body in (
        ("gzip", _gzip(IMAGE)),
        ("x-gzip", _gzip(IMAGE)),
        ("deflate", zlib.compress(IMAGE)),
        ("identity", IMAGE),
    ):
        h = harness([_encoded(encoding, body)])
        assert await h.fetch(URL) == IMAGE, encoding


async def test_a_gzip_bomb_is_cut_at_the_cap_while_inflating(
    harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = _gzip(b"\0" * (64 * 2**20))  # 64 MiB of zeros in about 64 KiB
    assert len(bomb) < 100_000
    inflated: list[int] = []
    real = zlib.decompressobj

    class Recording:
        """Records how much each decompress call returned: never more than the budget left."""

        def __init__(self, wbits: int) -> None:
            self._inner = real(wbits)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            assert max_length > 0  # 0 would mean "no limit" to zlib
            out = self._inner.decompress(data, max_length)
            inflated.append(len(out))
            return out

        @property
        def unconsumed_tail(self) -> bytes:
            return self._inner.unconsumed_tail

        def flush(self) -> bytes:
            return self._inner.flush()

    h = harness([_encoded("gzip", bomb)], max_image_bytes=200_000)  # more than the bomb's size
    monkeypatch.setattr(fetch_module.zlib, "decompressobj", Recording)
    with pytest.raises(MediaTooLargeError, match="sent more than 200000 bytes"):
        await h.fetch(URL)
    assert sum(inflated) <= 200_001  # never inflated past the cap


@pytest.mark.parametrize("encoding", ["gzip, gzip", "br", "zstd", "compress", "gzip, identity, br"])
async def test_other_or_nested_encodings_are_refused(
    harness: Callable[..., Harness], encoding: str
) -> None:
    h = harness([_encoded(encoding, IMAGE)])
    with pytest.raises(UnsupportedMediaTypeError, match="only an uncompressed body") as caught:
        await h.fetch(URL)
    assert f"Content-Encoding '{encoding.replace(', identity', '')}'" in str(caught.value)


async def test_a_corrupt_gzip_body_is_a_clear_error(harness: Callable[..., Harness]) -> None:
    h = harness([_encoded("gzip", b"not gzip at all")])
    with pytest.raises(MediaFetchError, match="the compressed response from .* is corrupt"):
        await h.fetch(URL)


async def test_body_exactly_at_the_cap(harness: Callable[..., Harness]) -> None:
    h = harness([httpx.Response(200, content=b"x" * 100)], max_image_bytes=100)
    assert await h.fetch(URL) == b"x" * 100


@pytest.mark.parametrize(
    ("content_type", "shown"),
    [
        ("text/html; charset=utf-8", "text/html"),
        ("text/plain", "text/plain"),
        ("application/json", "application/json"),
        ("application/xml", "application/xml"),
        ("application/problem+json", "application/problem+json"),
        ("image/svg+xml", "image/svg+xml"),
        ("video/mp4", "video/mp4"),
    ],
)
async def test_clearly_non_image_types_are_refused(
    harness: Callable[..., Harness], content_type: str, shown: str
) -> None:
    h = harness([httpx.Response(200, headers={"content-type": content_type}, content=b"<html>")])
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        await h.fetch(URL)
    assert str(caught.value) == f"image URL returned content type '{shown}', not an image: {URL}"


# --- concurrency ----------------------------------------------------------------------------------


async def test_concurrent_fetches_are_capped(harness: Callable[..., Harness]) -> None:
    active = peak = 0
    two_in, release = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active == 2:
            two_in.set()
        await release.wait()
        active -= 1
        return httpx.Response(200, content=IMAGE)

    h = harness(slow, max_concurrent_fetches=2)
    tasks = [asyncio.create_task(h.fetch(f"http://img.example/{i}.png")) for i in range(5)]
    await asyncio.wait_for(two_in.wait(), timeout=5)
    for _ in range(50):  # give the other three every chance to (wrongly) start
        await asyncio.sleep(0)
    assert active == 2
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*tasks), timeout=5) == [IMAGE] * 5
    assert peak == 2
    assert len(h.requests) == 5
