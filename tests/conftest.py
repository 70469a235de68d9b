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

from clipserve.config import PLAIN_ENV_NAMES

# A stray hub call must fail at once, not wait on the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _key in [
    k for k in os.environ if k.startswith(("MODEL_CONFIG_", "CLIPSERVE_")) or k in PLAIN_ENV_NAMES
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


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's collections (its apps', and its server processes', which inherit the
    environment) live in its own folder, never in the working directory."""
    monkeypatch.setenv("CLIPSERVE_COLLECTIONS__DATA_DIR", str(tmp_path / "collections"))


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
def tiny_blip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random transformers BLIP folders: ``caption`` (BlipForConditionalGeneration),
    ``vqa`` (BlipForQuestionAnswering) and ``blip2`` (Blip2ForConditionalGeneration)."""
    from clipserve.testing.tiny import build_tiny_blip, build_tiny_blip2

    root = tmp_path_factory.mktemp("tiny-blip")
    return {
        "caption": build_tiny_blip(root / "caption", seed=4),
        "vqa": build_tiny_blip(root / "vqa", seed=5, vqa=True),
        "blip2": build_tiny_blip2(root / "blip2", seed=6),
    }


@pytest.fixture(scope="session")
def tiny_caption_registry(tiny_blip_dirs: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """Registry entries for the tiny BLIP models: ``blip`` (captions), ``vqa`` (answers) and
    ``blip2`` (both)."""
    return {
        name: {"model_name": str(tiny_blip_dirs[folder]), "backend": "hf", "task": "caption"}
        for name, folder in (("blip", "caption"), ("vqa", "vqa"), ("blip2", "blip2"))
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
    "blip": {"model_name": "fake-blip", "backend": "hf", "task": "caption"},
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
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A fresh real ``redis-server`` on loopback for this test (skipped, saying why, without
    one), stopped by its process id afterwards: a :class:`clipserve.testing.servers.RedisServer`
    (``url``, ``stop()``)."""
    from clipserve.testing.servers import RedisUnavailableError, redis_server

    try:
        context = redis_server(tmp_path)
        server = context.__enter__()
    except RedisUnavailableError as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture
def redis_url(redis_server: Any) -> str:
    url: str = redis_server.url
    return url


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


# --- comparing floats from different calls -----------------------------------------------------
# Matrix kernels pick code paths by batch size and CPU model (AVX2, AVX-512, thread count), so the
# same input encoded in another call or batch composition (another request, chunk, batch size, or
# whatever the dynamic batcher grouped it with) may differ in the last bits. Compare such values
# with these helpers; compare exactly only the same call's output on the same inputs (e.g. the
# float and base64 encodings of one response, or a vector deduplicated within one request). The
# non-float parts (statuses, indices, order, texts, None) are always compared exactly.

SCORE_TOLERANCE = 1e-5
"""Absolute tolerance for CLIP scores (``max(100 * cos, 0)``, the 0-100 scale)."""
SIMILARITY_TOLERANCE = 1e-6
"""Absolute tolerance for values on the unit scale: cosines, relevance scores, probabilities."""
VECTOR_MIN_COSINE = 1 - 1e-6
"""Embedding vectors: the least cosine between the two, whose norms also agree to 1e-6."""


def _assert_tree_close(actual: Any, expected: Any, tolerance: float, where: str) -> None:
    """``actual == expected`` for JSON-like values, except floats, which may differ by
    ``tolerance``; dict keys, lengths, ints, bools, strings and None must match exactly."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r} is not a dict"
        assert actual.keys() == expected.keys(), f"{where}: keys {list(actual)} != {list(expected)}"
        for key, value in expected.items():
            _assert_tree_close(actual[key], value, tolerance, f"{where}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert type(actual) is type(expected), f"{where}: {actual!r} != {expected!r}"
        assert len(actual) == len(expected), f"{where}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_tree_close(a, e, tolerance, f"{where}[{i}]")
    elif isinstance(expected, float) or isinstance(actual, float):
        assert type(actual) in (int, float), f"{where}: {actual!r} != {expected!r}"
        assert type(expected) in (int, float), f"{where}: {actual!r} != {expected!r}"
        assert abs(actual - expected) <= tolerance, (
            f"{where}: {actual!r} != {expected!r} within {tolerance}"
        )
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _assert_scores_close(actual: Any, expected: Any) -> None:
    _assert_tree_close(actual, expected, SCORE_TOLERANCE, "scores")


def _assert_similarities_close(actual: Any, expected: Any) -> None:
    _assert_tree_close(actual, expected, SIMILARITY_TOLERANCE, "body")


def _assert_vectors_close(actual: Any, expected: Any) -> None:
    import numpy as np

    a, b = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} != {b.shape}"
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    norm_a, norm_b = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    cosine = (a * b).sum(-1) / (norm_a * norm_b)
    assert (cosine >= VECTOR_MIN_COSINE).all(), f"cosine {cosine.min()} < {VECTOR_MIN_COSINE}"
    assert (np.abs(norm_a - norm_b) <= 1e-6 * np.maximum(norm_a, norm_b)).all(), (
        f"norms differ: {norm_a} != {norm_b}"
    )


@pytest.fixture(scope="session")
def assert_scores_close() -> Callable[[Any, Any], None]:
    """``assert_scores_close(actual, expected)``: CLIP scores (a number, None, or lists and dicts
    of them) from different calls, within ``SCORE_TOLERANCE``."""
    return _assert_scores_close


@pytest.fixture(scope="session")
def assert_similarities_close() -> Callable[[Any, Any], None]:
    """``assert_similarities_close(actual, expected)``: JSON bodies or values holding cosines,
    relevance scores or probabilities from different calls, within ``SIMILARITY_TOLERANCE``."""
    return _assert_similarities_close


@pytest.fixture(scope="session")
def assert_vectors_close() -> Callable[[Any, Any], None]:
    """``assert_vectors_close(actual, expected)``: embedding vectors (or rows of them) from
    different calls: same shape, cosine >= ``VECTOR_MIN_COSINE``, norms equal to 1e-6."""
    return _assert_vectors_close
