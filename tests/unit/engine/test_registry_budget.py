"""The registry's per-device memory budget: refusals, evict_idle, reservations of loads at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import torch
from fastapi import FastAPI

from clipserve.api.errors import register_error_handlers
from clipserve.config import Settings
from clipserve.engine.executor import Executors
from clipserve.engine.registry import ModelRegistry, ModelState
from clipserve.errors import MemoryBudgetError, ModelLoadError, ModelUnavailableError
from clipserve.model_specs import ModelSpec
from clipserve.models.base import BackendInfo
from clipserve.observability.metrics import Metrics
from clipserve.testing import FakeBackend

GB = 10**9


@dataclasses.dataclass
class SizedBackend(FakeBackend):
    """A fake backend whose measured size (``info.memory_bytes``) the test chooses."""

    memory_bytes: int = 0

    @property
    def info(self) -> BackendInfo:
        return dataclasses.replace(super().info, memory_bytes=self.memory_bytes)


class SizedLoader:
    """Loads ``SizedBackend``s: ``sizes`` maps a model_name to its real size in GB (0 if not
    given); ``remote`` model names report device ``remote``; ``failing`` ones fail to load;
    ``gates[model_name]`` holds that load on the loading thread until set."""

    def __init__(self, sizes: dict[str, float] | None = None) -> None:
        self.sizes = sizes or {}
        self.remote: set[str] = set()
        self.failing: set[str] = set()
        self.gates: dict[str, threading.Event] = {}
        self.entered: dict[str, threading.Event] = {}
        self.before_load: Callable[[ModelSpec], None] | None = None
        self.loads: list[str] = []
        self.loaded: dict[str, SizedBackend] = {}

    def gate(self, model_name: str) -> threading.Event:
        self.entered[model_name] = threading.Event()
        self.gates[model_name] = threading.Event()
        return self.gates[model_name]

    def __call__(self, spec: ModelSpec, *, device: str, dtype: torch.dtype) -> SizedBackend:
        name = spec.model_name
        if name in self.gates:
            self.entered[name].set()
            assert self.gates[name].wait(10)
        if self.before_load is not None:
            self.before_load(spec)
        self.loads.append(name)
        if name in self.failing:
            raise ModelLoadError("simulated load failure")
        backend = SizedBackend(
            device="remote" if name in self.remote else device,
            memory_bytes=int(self.sizes.get(name, 0) * GB),
        )
        self.loaded[name] = backend
        return backend


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class QueuedWork:
    """Stands in for a batcher queue with items waiting (``size``)."""

    def __init__(self, size: int) -> None:
        self.size = size


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def registry_for(clock: Clock) -> AsyncIterator[Callable[..., ModelRegistry]]:
    made: list[tuple[ModelRegistry, Executors]] = []

    def make(settings: Settings, loader: SizedLoader) -> ModelRegistry:
        executors = Executors(2)
        registry = ModelRegistry(
            settings, loader=loader, executors=executors, metrics=Metrics(), clock=clock
        )
        made.append((registry, executors))
        return registry

    yield make
    for registry, executors in made:
        await registry.close()
        executors.shutdown(5.0)


def sized(gb: float | None, **fields: Any) -> dict[str, Any]:
    """A config entry whose spec estimate is ``gb`` (its model_name is set by ``models``)."""
    return {"memory_gb": gb, "device": "cpu", **fields}


def models(**entries: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: {"model_name": f"sized-{name}", **entry} for name, entry in entries.items()}


@contextlib.asynccontextmanager
async def leases(registry: ModelRegistry, name: str, count: int) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(registry.use(name))
        yield


async def test_models_within_the_budget_load(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 0.6, "sized-cap": 0.9})
    config = models(a=sized(0.6), cap=sized(0.9, backend="hf", task="caption"))
    registry = registry_for(make_settings(config, memory_budget_gb=2.0), loader)
    await registry.get("a")
    await registry.get("cap")  # a caption model counts like any other
    assert registry.status("a").state is ModelState.LOADED
    assert registry.status("cap").state is ModelState.LOADED


async def test_a_load_past_the_budget_is_refused_naming_what_is_loaded(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    loader = SizedLoader({"sized-a": 0.6, "sized-b": 0.3, "sized-c": 0.4})
    config = models(a=sized(0.6), b=sized(0.3), c=sized(0.4))
    settings = make_settings(config, memory_budget_gb=1.0)
    registry = registry_for(settings, loader)
    await registry.get("b")
    async with leases(registry, "a", 2):
        with pytest.raises(MemoryBudgetError) as refused:
            await registry.get("c")
    error = refused.value
    assert isinstance(error, ModelUnavailableError)  # a 503 like other unavailable models
    assert error.message == (
        "model 'c' needs about 0.4 GB on cpu but the memory budget (1.0 GB) has 0.1 GB left: "
        "loaded 'b' (0.3 GB, idle), 'a' (0.6 GB, 2 in flight); unload one, raise "
        "memory_budget_gb or set evict_idle"
    )
    assert error.detail["budget_gb"] == 1.0
    assert error.detail["needed_gb"] == 0.4
    assert error.detail["loaded"] == [
        {"model": "b", "gb": 0.3, "in_flight": 0, "queued": 0, "state": "loaded"},
        {"model": "a", "gb": 0.6, "in_flight": 2, "queued": 0, "state": "loaded"},
    ]
    assert error.retry_after_s == settings.model_retry_interval_s  # nothing frees by itself
    status = registry.status("c")
    assert status.state is ModelState.ERROR
    assert status.error == error.reason
    assert "sized-c" not in loader.loads  # refused before the loader ran

    # A refusal is not held for model_retry_interval_s: once 'b' is gone, 'c' loads at once.
    assert settings.config_path is not None
    settings.config_path.write_text(
        json.dumps({**fake_models, **models(a=sized(0.6), c=sized(0.4))})
    )
    await registry.reload()
    assert await registry.drain(10)
    assert (await registry.get("c")).name == "c"


async def test_evict_idle_unloads_the_least_recently_used_idle_model(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    names = ("queued", "busy", "old", "recent", "new")
    loader = SizedLoader({f"sized-{n}": 0.4 for n in names})
    config = models(**{n: sized(0.4) for n in names})
    registry = registry_for(make_settings(config, memory_budget_gb=1.6, evict_idle=True), loader)
    for name in ("queued", "busy", "old", "recent"):  # loaded at 1001, 1002, 1003, 1004
        clock.now += 1
        await registry.get(name)
    queued = await registry.get("queued")
    queued.queues = {"text": QueuedWork(2)}  # type: ignore[dict-item]  # work waits, no lease
    clock.now = 1010
    async with registry.use("recent"):  # used again: the most recent
        pass
    old = await registry.get("old")
    clock.now = 1020
    async with registry.use("busy"):  # a request in flight (its lease started at 1020)
        with caplog.at_level(logging.INFO, logger="clipserve.engine.memory_budget"):
            await registry.get("new")
        # The least recently used, 'queued' (queued work) and 'busy' (in flight) are skipped.
        assert old.retired
        assert "evicting model 'old' (idle, last used 17 s ago) to make room for 'new'" in (
            caplog.text
        )
        assert old.backend.closed  # type: ignore[attr-defined]  # closed before 'new' loaded
        assert registry.status("old").state is ModelState.NOT_LOADED
        for name in ("queued", "busy", "recent", "new"):
            assert registry.status(name).state is ModelState.LOADED
        clock.now = 1030  # the lease of 'busy' ends now

    # The evicted model loads again on its next use, evicting the least recently used idle one.
    clock.now = 1040
    async with registry.use("old") as handle:
        assert handle is not old
    assert loader.loads.count("sized-old") == 2
    assert registry.status("recent").state is ModelState.NOT_LOADED  # last used 1010
    assert registry.status("new").state is ModelState.LOADED  # loaded 1020
    assert registry.status("busy").state is ModelState.LOADED  # its lease ended 1030


async def test_evict_idle_refuses_when_only_busy_models_could_make_room(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 0.6, "sized-b": 0.3, "sized-d": 0.1, "sized-c": 0.5})
    config = models(a=sized(0.6), b=sized(0.3), d=sized(0.1), c=sized(0.5))
    registry = registry_for(make_settings(config, memory_budget_gb=1.1, evict_idle=True), loader)
    b = await registry.get("b")
    b.queues = {"image": QueuedWork(3)}  # type: ignore[dict-item]
    d = await registry.get("d")
    async with registry.use("a"):
        with pytest.raises(MemoryBudgetError) as refused:
            await registry.get("c")
    assert refused.value.message == (
        "model 'c' needs about 0.5 GB on cpu but the memory budget (1.1 GB) has 0.1 GB left: "
        "loaded 'b' (0.3 GB, 3 queued), 'd' (0.1 GB, idle), 'a' (0.6 GB, 1 in flight); no idle "
        "model can make room; retry when requests finish, or raise the budget"
    )
    assert refused.value.retry_after_s == 1.0  # requests finish soon
    assert not d.retired  # evicting the idle 'd' alone would not make room: nothing is unloaded
    assert not b.retired


async def test_a_model_larger_than_the_budget_is_refused_without_evicting(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 0.5})
    config = models(a=sized(0.5), huge=sized(3.0))
    registry = registry_for(make_settings(config, memory_budget_gb=2.0, evict_idle=True), loader)
    a = await registry.get("a")
    with pytest.raises(MemoryBudgetError, match="it does not fit even alone; raise memory_budget"):
        await registry.get("huge")
    assert not a.retired


async def test_two_loads_at_once_cannot_both_take_the_last_room(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 0.6, "sized-b": 0.6})
    release = loader.gate("sized-a")
    config = models(a=sized(0.6), b=sized(0.6))
    registry = registry_for(make_settings(config, memory_budget_gb=1.0), loader)
    loading = asyncio.ensure_future(registry.get("a"))
    assert await asyncio.to_thread(loader.entered["sized-a"].wait, 10)  # 'a' is loading
    with pytest.raises(MemoryBudgetError) as refused:
        await registry.get("b")
    assert "has 0.4 GB left: loaded 'a' (0.6 GB, loading)" in refused.value.message
    assert refused.value.retry_after_s == 1.0  # the load in progress may fail and free its room
    release.set()
    assert (await asyncio.wait_for(loading, 10)).name == "a"
    with pytest.raises(MemoryBudgetError, match="loaded 'a' \\(0.6 GB, idle\\)"):
        await registry.get("b")


async def test_loads_at_once_with_evict_idle_evict_once_and_wait_for_the_close(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 0.5, "sized-b": 0.6, "sized-c": 0.6})
    config = models(a=sized(0.5), b=sized(0.6), c=sized(0.6))
    registry = registry_for(make_settings(config, memory_budget_gb=1.0, evict_idle=True), loader)
    a = await registry.get("a")
    closed_before_b: list[bool] = []
    loader.before_load = lambda spec: (
        closed_before_b.append(a.backend.closed)  # type: ignore[attr-defined]
        if spec.model_name == "sized-b"
        else None
    )
    results = await asyncio.gather(registry.get("b"), registry.get("c"), return_exceptions=True)
    assert not isinstance(results[0], BaseException)
    assert results[0].name == "b"
    assert closed_before_b == [True]  # 'a' was unloaded before 'b' loaded
    assert isinstance(results[1], MemoryBudgetError)  # 'a' was taken for 'b' already
    assert "'a' (0.5 GB, unloading)" in results[1].message
    assert "'b' (0.6 GB, loading)" in results[1].message
    assert loader.loads.count("sized-c") == 0


async def test_a_failed_load_gives_its_reservation_back(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 0.6})
    loader.failing.add("sized-bad")
    config = models(bad=sized(0.8), a=sized(0.6))
    registry = registry_for(make_settings(config, memory_budget_gb=1.0), loader)
    with pytest.raises(ModelUnavailableError, match="simulated load failure"):
        await registry.get("bad")
    assert (await registry.get("a")).name == "a"  # the 0.8 GB 'bad' reserved is free again


async def test_a_load_superseded_by_a_reload_gives_its_reservation_back(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    loader = SizedLoader({"sized-a": 0.6, "sized-a2": 0.6, "sized-b": 0.3})
    release = loader.gate("sized-a")
    config = models(a=sized(0.6), b=sized(0.3))
    settings = make_settings(config, memory_budget_gb=1.0)
    registry = registry_for(settings, loader)
    waiting = asyncio.ensure_future(registry.get("a"))
    assert await asyncio.to_thread(loader.entered["sized-a"].wait, 10)
    assert settings.config_path is not None
    settings.config_path.write_text(
        json.dumps({**fake_models, **config, "a": {**config["a"], "model_name": "sized-a2"}})
    )
    await registry.reload()  # 'a' changes while its old spec loads
    release.set()
    handle = await asyncio.wait_for(waiting, 10)
    assert handle.spec.model_name == "sized-a2"
    assert await registry.drain(10)
    assert (await registry.get("b")).name == "b"  # only the new 'a' counts: 0.9 GB of 1.0


async def test_a_retired_model_still_serving_counts_until_it_is_closed(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    fake_models: dict[str, dict[str, Any]],
) -> None:
    loader = SizedLoader({"sized-a": 0.6, "sized-a2": 0.6})
    config = models(a=sized(0.6))
    settings = make_settings(config, memory_budget_gb=1.0, evict_idle=True)
    registry = registry_for(settings, loader)
    assert settings.config_path is not None
    async with registry.use("a") as old:
        settings.config_path.write_text(
            json.dumps({**fake_models, "a": {**config["a"], "model_name": "sized-a2"}})
        )
        await registry.reload()  # new weights: the old model serves its request, then closes
        assert old.retired
        with pytest.raises(MemoryBudgetError) as refused:
            await registry.get("a")
        assert "loaded 'a' (0.6 GB, unloading, 1 in flight)" in refused.value.message
        assert refused.value.retry_after_s == 1.0
    handle = await registry.get("a")  # closing now: the load waits for the close, then fits
    assert handle.spec.model_name == "sized-a2"
    assert old.backend.closed  # type: ignore[attr-defined]


async def test_remote_models_take_no_device_memory(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-api": 5.0, "sized-elsewhere": 5.0, "sized-a": 0.6})
    loader.remote.update({"sized-api", "sized-elsewhere"})
    config = models(
        api=sized(5.0, backend="openai-vision", base_url="http://127.0.0.1:9/v1"),
        elsewhere=sized(None),
        a=sized(0.6),
    )
    registry = registry_for(make_settings(config, memory_budget_gb=1.0), loader)
    await registry.get("api")  # its memory_gb is not reserved: the model runs elsewhere
    await registry.get("elsewhere")  # info.device 'remote': its memory_bytes count 0
    assert (await registry.get("a")).name == "a"


async def test_a_model_without_an_estimate_loads_unchecked_and_then_counts(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = SizedLoader({"sized-n": 1.2, "sized-a": 0.6})
    config = models(n=sized(None), a=sized(0.6))
    registry = registry_for(make_settings(config, memory_budget_gb=1.0, evict_idle=True), loader)
    with caplog.at_level(logging.WARNING, logger="clipserve.engine.memory_budget"):
        n = await registry.get("n")
    assert "model 'n' takes 1.20 GB on cpu, more than the whole memory budget (1.00 GB)" in (
        caplog.text
    )
    assert not n.retired  # kept: it is loaded
    async with registry.use("n"):
        with pytest.raises(MemoryBudgetError, match="has 0.0 GB left: loaded 'n' \\(1.2 GB, 1 in"):
            await registry.get("a")
    await registry.get("a")  # idle now: evicted for 'a'
    assert n.retired


async def test_an_estimate_below_the_real_size_is_corrected_after_the_load(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    caplog: pytest.LogCaptureFixture,
) -> None:
    loader = SizedLoader({"sized-a": 0.5, "sized-b": 0.7, "sized-c": 0.2})
    config = models(a=sized(0.5), b=sized(0.3), c=sized(0.2))
    registry = registry_for(make_settings(config, memory_budget_gb=1.0), loader)
    await registry.get("a")
    with caplog.at_level(logging.WARNING, logger="clipserve.engine.memory_budget"):
        await registry.get("b")  # said 0.3 GB, takes 0.7 GB
    assert "model 'b' takes 0.70 GB on cpu (estimated 0.3 GB)" in caplog.text
    with pytest.raises(MemoryBudgetError, match="'b' \\(0.7 GB, idle\\)"):
        await registry.get("c")


async def test_each_device_has_its_own_budget_and_cuda_is_cuda_0(
    make_settings: Callable[..., Settings],
    registry_for: Callable[..., ModelRegistry],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a mocked CUDA device
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    loader = SizedLoader({"sized-x": 0.6, "sized-y": 0.6, "sized-z": 0.6})
    config = models(
        x=sized(0.6, device="cuda"), y=sized(0.6, device="cuda:0"), z=sized(0.6, device="cpu")
    )
    registry = registry_for(make_settings(config, memory_budget_gb=1.0), loader)
    await registry.get("x")
    assert (await registry.get("z")).name == "z"  # the CPU's budget is its own
    with pytest.raises(MemoryBudgetError, match="on cuda:0 .* loaded 'x' \\(0.6 GB, idle\\)"):
        await registry.get("y")


async def test_without_a_budget_nothing_is_checked(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 100.0, "sized-b": 100.0})
    registry = registry_for(make_settings(models(a=sized(100.0), b=sized(100.0))), loader)
    await registry.get("a")
    await registry.get("b")
    assert loader.loads == ["sized-a", "sized-b"]


async def test_a_refusal_is_a_503_with_retry_after_and_the_budget_in_the_detail(
    make_settings: Callable[..., Settings], registry_for: Callable[..., ModelRegistry]
) -> None:
    loader = SizedLoader({"sized-a": 0.6})
    config = models(a=sized(0.6), b=sized(0.6))
    registry = registry_for(make_settings(config, memory_budget_gb=1.0), loader)
    await registry.get("a")
    app = FastAPI()
    register_error_handlers(app)

    @app.get("/b")
    async def load_b() -> None:
        await registry.get("b")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/b")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "30"
    body = response.json()
    assert body["error"].startswith("model 'b' needs about 0.6 GB on cpu but the memory budget")
    assert body["detail"]["loaded"] == [
        {"model": "a", "gb": 0.6, "in_flight": 0, "queued": 0, "state": "loaded"}
    ]
    assert body["detail"]["budget_gb"] == 1.0
