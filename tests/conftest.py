"""Shared test setup: offline hub, loopback-only sockets, folder markers, photos, tiny models."""

from __future__ import annotations

import copy
import io
import ipaddress
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clipserve.config import BATCHING_ENV_NAMES

# A stray hub call must fail at once, not wait on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _key in [
    k
    for k in os.environ
    if k.startswith(("MODEL_CONFIG_", "CLIPSERVE_")) or k in BATCHING_ENV_NAMES
]:
    del os.environ[_key]  # tests build their own settings

_TESTS = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).relative_to(_TESTS).parts
        if parts and parts[0] in ("unit", "integration"):
            item.add_marker(getattr(pytest.mark, parts[0]))


# --- network: loopback only --------------------------------------------------------------------


def _is_loopback(address: Any) -> bool:
    if not isinstance(address, tuple):
        return True  # AF_UNIX paths
    host = address[0]
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def _loopback_only() -> Iterator[None]:
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(address: Any) -> None:
        if not _is_loopback(address):
            raise ConnectionRefusedError(f"tests may only connect to loopback, not {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        guard(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        guard(address)
        return real_connect_ex(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    yield
    socket.socket.connect = real_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = real_connect_ex  # type: ignore[method-assign]


# --- images ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def photos() -> dict[str, Any]:
    """Real photos from scikit-image as RGB PIL images."""
    from PIL import Image
    from skimage import data

    return {
        name: Image.fromarray(getattr(data, name)())
        for name in ("astronaut", "chelsea", "coffee", "rocket")
    }


@pytest.fixture(scope="session")
def photo_bytes(photos: dict[str, Any]) -> Callable[..., bytes]:
    def encode(name: str, fmt: str = "JPEG") -> bytes:
        buffer = io.BytesIO()
        photos[name].save(buffer, format=fmt)
        return buffer.getvalue()

    return encode


# --- tiny models (built once per session, seeded) -----------------------------------------------


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """open_clip (CLIP and SigLIP-style), transformers CLIP and SigLIP, and the transformers copy
    of the open_clip CLIP model (same weights)."""
    from clipserve.testing.tiny import (
        build_tiny_hf_clip,
        build_tiny_hf_siglip,
        build_tiny_open_clip,
        convert_open_clip_to_hf_clip,
    )

    root = tmp_path_factory.mktemp("tiny-models")
    open_clip_dir = build_tiny_open_clip(root / "open_clip", seed=0)
    return {
        "open_clip": open_clip_dir,
        "open_clip_siglip": build_tiny_open_clip(root / "open_clip_siglip", siglip=True, seed=1),
        "hf_clip": build_tiny_hf_clip(root / "hf_clip", seed=2),
        "hf_siglip": build_tiny_hf_siglip(root / "hf_siglip", seed=3),
        "open_clip_as_hf": convert_open_clip_to_hf_clip(open_clip_dir, root / "open_clip_as_hf"),
    }


@pytest.fixture(scope="session")
def tiny_registry(tiny_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Registry entries for the tiny real models (real loaders, random weights)."""
    return {
        "tiny": {"model_name": f"local-dir:{tiny_dirs['open_clip']}", "backend": "open_clip"},
        "tiny-hf": {"model_name": str(tiny_dirs["hf_clip"]), "backend": "hf"},
        "tiny-siglip": {"model_name": str(tiny_dirs["hf_siglip"]), "backend": "hf"},
    }


# --- settings and apps with the fake backend ----------------------------------------------------

FAKE_MODELS: dict[str, dict[str, Any]] = {
    "fast": {"model_name": "fake-fast", "description": "fake fast"},
    "accurate": {"model_name": "fake-accurate"},
    "minilm": {"model_name": "fake-text", "backend": "sentence-transformers"},
    "broken": {"model_name": "fake-broken"},
    "hidden": {"model_name": "fake-hidden", "enabled": False},
}


@pytest.fixture
def fake_models() -> dict[str, dict[str, Any]]:
    """A fresh copy of the fake registry that ``make_settings`` writes."""
    return copy.deepcopy(FAKE_MODELS)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    path = tmp_path / "models.json"

    def write(models: dict[str, Any]) -> Path:
        path.write_text(json.dumps(models))
        return path

    return write


@pytest.fixture
def make_settings(
    tmp_path: Path, write_config: Callable[[dict[str, Any]], Path]
) -> Callable[..., Any]:
    """Settings whose registry holds FAKE_MODELS (plus ``models``), media root = tmp_path."""
    from clipserve.config import Settings

    def make(models: dict[str, Any] | None = None, **overrides: Any) -> Settings:
        config = write_config({**FAKE_MODELS, **(models or {})})
        media = {"media_root": tmp_path, "allow_private_urls": True, **overrides.pop("media", {})}
        overrides.setdefault("config_reload_interval_s", 0)
        return Settings(config_path=config, media=media, **overrides)

    return make


@pytest.fixture
async def client_for() -> AsyncIterator[Callable[..., Any]]:
    """``await client_for(settings, loader)`` → an httpx client bound to a started app."""
    import httpx
    from asgi_lifespan import LifespanManager

    from clipserve.api.app import create_app

    managers: list[LifespanManager] = []
    clients: list[httpx.AsyncClient] = []

    async def make(settings: Any, loader: Any = None) -> httpx.AsyncClient:
        app = create_app(settings, loader=loader)
        manager = LifespanManager(app, startup_timeout=60, shutdown_timeout=60)
        await manager.__aenter__()
        managers.append(manager)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=manager.app), base_url="http://testserver"
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()
    for manager in reversed(managers):
        await manager.__aexit__(None, None, None)
