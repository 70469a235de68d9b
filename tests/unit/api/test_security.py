from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from clipserve.api.security import ApiKeys, client_address, hash_key
from clipserve.cli import app as cli
from clipserve.config import AuthSettings, RateLimitSettings, Settings
from clipserve.errors import AuthenticationError, ConfigError, EngineNotReadyError
from clipserve.testing import FakeLoader

KEY = "sk-test-0123456789"
OTHER = "sk-other-9876543210"
EMBED = {"input_text": "hello"}


@pytest.fixture
async def keyed(client_for: Callable[..., Any], make_settings: Callable[..., Any]) -> Any:
    settings = make_settings(auth={"api_keys": [hash_key(KEY), hash_key(OTHER)]})
    return await client_for(settings, FakeLoader())


async def test_without_keys_configured_everything_is_open(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    client = await client_for(make_settings(), FakeLoader())
    assert (await client.post("/embed", json=EMBED)).status_code == 200


async def test_a_missing_key_is_401_with_a_clear_message(keyed: Any) -> None:
    response = await keyed.post("/embed", json=EMBED)
    assert response.status_code == 401
    assert response.json()["error"] == (
        "this server requires an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    )
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer {KEY}"},
        {"X-API-Key": KEY},
        {"X-API-Key": OTHER},
    ],
)
async def test_bearer_and_x_api_key_are_accepted(keyed: Any, headers: dict[str, str]) -> None:
    assert (await keyed.post("/embed", json=EMBED, headers=headers)).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {KEY}"},
        {"X-API-Key": KEY.upper()},
        {"Authorization": "Bearer "},
    ],
)
async def test_wrong_keys_are_refused(keyed: Any, headers: dict[str, str]) -> None:
    response = await keyed.post("/embed", json=EMBED, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] in {
        "invalid API key",
        "this server requires an API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
    }


async def test_probes_metrics_and_docs_stay_open(keyed: Any) -> None:
    for path in ("/health", "/ready", "/metrics", "/evaluator/health", "/openapi.json"):
        assert (await keyed.get(path)).status_code == 200, path
    assert (await keyed.get("/v1/system/models")).status_code == 401


async def test_probes_can_require_keys_too(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(auth={"api_keys": [hash_key(KEY)], "public_health": False})
    client = await client_for(settings, FakeLoader())
    assert (await client.get("/health")).status_code == 401
    assert (await client.get("/health", headers={"X-API-Key": KEY})).status_code == 200


async def test_the_openai_client_gets_an_authentication_error(keyed: Any) -> None:
    api = openai.AsyncOpenAI(api_key="wrong", base_url="http://testserver/v1", http_client=keyed)
    with pytest.raises(openai.AuthenticationError, match="invalid API key") as refused:
        await api.embeddings.create(model="fast", input="x")
    assert refused.value.code == "invalid_api_key"
    good = openai.AsyncOpenAI(api_key=KEY, base_url="http://testserver/v1", http_client=keyed)
    assert len((await good.embeddings.create(model="fast", input="x")).data) == 1


@pytest.mark.parametrize("path", ["/v1/embeddings", "/evaluator/v1/evaluation/batch"])
async def test_refused_before_the_body_is_read(
    client_for: Callable[..., Any], make_settings: Callable[..., Any], path: str
) -> None:
    """No key: 401 from the headers alone; the 64 MB body is never pulled, let alone parsed."""
    settings = make_settings(auth={"api_keys": [hash_key(KEY)]})
    client = await client_for(settings, FakeLoader())
    pulled = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal pulled
        for _ in range(1024):
            pulled += 1
            yield b" " * 65536

    response = await client.post(path, content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 401
    assert pulled == 0
    if path == "/v1/embeddings":
        assert response.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape there
    else:
        assert response.json()["error"].startswith("this server requires an API key")


def test_keys_must_be_configured_as_hashes() -> None:
    with pytest.raises(ValidationError, match="hold hashes"):
        AuthSettings(api_keys=(KEY,))
    assert AuthSettings(api_keys=(hash_key(KEY).upper(),)).api_keys == (hash_key(KEY)[7:],)


def test_the_key_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# team a\n{hash_key(KEY)}\n\n")
    now = [0.0]
    keys = ApiKeys(AuthSettings(api_keys_file=path), clock=lambda: now[0])
    assert keys.enabled
    assert keys.identify(KEY) == f"key:{hash_key(KEY)[7:19]}"
    with pytest.raises(AuthenticationError):
        keys.identify(OTHER)
    path.write_text(f"{hash_key(OTHER)}  # rotated\n")
    now[0] = 5.0
    assert keys.identify(OTHER).startswith("key:")
    with pytest.raises(AuthenticationError):
        keys.identify(KEY)
    path.write_text("not a hash\n")  # a broken edit may be a revocation: every key is refused
    now[0] = 10.0
    with pytest.raises(EngineNotReadyError, match="key file is unusable"):
        keys.identify(OTHER)
    path.unlink()  # so is a deleted file
    now[0] = 15.0
    with pytest.raises(EngineNotReadyError, match="every key is refused"):
        keys.identify(OTHER)
    path.write_text(f"{hash_key(KEY)}\n")  # fixed: the file's keys again
    now[0] = 20.0
    assert keys.identify(KEY).startswith("key:")
    with pytest.raises(AuthenticationError):
        keys.identify(OTHER)


def test_a_bad_key_file_fails_start_up(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    with pytest.raises(ConfigError, match="line 1: not a 'sha256:<64 hex digits>' hash"):
        ApiKeys(AuthSettings(api_keys_file=path))
    with pytest.raises(ConfigError, match="could not be read"):
        ApiKeys(AuthSettings(api_keys_file=tmp_path / "missing"))


def test_hash_key_reads_the_key_from_stdin_only() -> None:
    result = CliRunner().invoke(cli, ["hash-key"], input=f"{KEY}\n")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == hash_key(KEY)
    assert len(hash_key(KEY)) == 7 + 64
    on_argv = CliRunner().invoke(cli, ["hash-key", KEY])
    assert on_argv.exit_code == 2  # a key on the command line is not taken
    assert hash_key(KEY) not in on_argv.output
    empty = CliRunner().invoke(cli, ["hash-key"], input="\n")
    assert empty.exit_code == 2


# --- rate limits ---------------------------------------------------------------------------------


async def test_request_rate_is_limited_per_caller(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(rate_limit={"requests": "2/minute", "trusted_proxies": 1})
    client = await client_for(settings, FakeLoader())
    alice = {"X-Forwarded-For": "203.0.113.7"}
    bob = {"X-Forwarded-For": "203.0.113.7, 198.51.100.2"}  # what bob wrote, then his address
    assert [(await client.post("/embed", json=EMBED, headers=alice)).status_code for _ in "ab"] == [
        200,
        200,
    ]
    limited = await client.post("/embed", json=EMBED, headers=alice)
    assert limited.status_code == 429
    assert (
        limited.json()["error"] == "rate limit exceeded: 2 per 1 minute requests for ip:203.0.113.7"
    )
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert (await client.post("/embed", json=EMBED, headers=bob)).status_code == 200
    assert (await client.get("/health", headers=alice)).status_code == 200  # probes are exempt


async def test_item_rate_counts_inputs(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(rate_limit={"items": "5/minute"})
    client = await client_for(settings, FakeLoader())
    three = {"model": "fast", "input": ["a", "b", "c"]}
    assert (await client.post("/v1/embeddings", json=three)).status_code == 200
    limited = await client.post("/v1/embeddings", json=three)
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert "5 per 1 minute items" in limited.json()["error"]["message"]
    too_big = await client.post("/v1/embeddings", json={"model": "fast", "input": ["x"] * 6})
    assert too_big.status_code == 422
    assert too_big.json()["error"]["message"] == (
        "this request has 6 items; the limit allows at most 5 per 1 minute"
    )


async def test_rate_limits_follow_api_keys(
    client_for: Callable[..., Any], make_settings: Callable[..., Any]
) -> None:
    settings = make_settings(
        auth={"api_keys": [hash_key(KEY), hash_key(OTHER)]}, rate_limit={"requests": "1/minute"}
    )
    client = await client_for(settings, FakeLoader())
    first = {"X-API-Key": KEY}
    assert (await client.post("/embed", json=EMBED, headers=first)).status_code == 200
    limited = await client.post("/embed", json=EMBED, headers=first)
    assert limited.status_code == 429
    assert f"for key:{hash_key(KEY)[7:19]}" in limited.json()["error"]
    assert (
        await client.post("/embed", json=EMBED, headers={"X-API-Key": OTHER})
    ).status_code == 200
    # unauthenticated requests are refused before they count against anyone
    assert (await client.post("/embed", json=EMBED)).status_code == 401


def test_rate_limit_settings_are_validated() -> None:
    with pytest.raises(ValidationError, match="not a rate limit"):
        RateLimitSettings(requests="lots")
    with pytest.raises(ValidationError, match="storage_url"):
        RateLimitSettings(storage_url="mysql://x")
    assert not RateLimitSettings().enabled
    assert RateLimitSettings(items="10/second;100/minute").enabled
    assert Settings(rate_limit={"requests": " "}).rate_limit.requests is None


@pytest.mark.parametrize(
    ("header", "proxies", "caller"),
    [
        (None, 0, "127.0.0.1"),
        ("203.0.113.7", 0, "127.0.0.1"),  # no proxy configured: the header is ignored
        ("203.0.113.7", 1, "203.0.113.7"),
        ("1.2.3.4, 203.0.113.7", 1, "203.0.113.7"),  # a spoofed left part is skipped
        ("1.2.3.4, 203.0.113.7, 10.0.0.2", 2, "203.0.113.7"),  # two proxies
        ("203.0.113.7", 2, "127.0.0.1"),  # shorter than the proxy chain: not trusted
        ("not-an-ip", 1, "127.0.0.1"),
    ],
)
def test_the_client_address_is_read_from_the_right(
    header: str | None, proxies: int, caller: str
) -> None:
    from starlette.requests import Request

    headers = [(b"x-forwarded-for", header.encode())] if header else []
    scope = {"type": "http", "headers": headers, "client": ("127.0.0.1", 5555)}
    assert client_address(Request(scope), trusted_proxies=proxies) == caller
