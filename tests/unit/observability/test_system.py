"""The GPU gauges: memory and utilisation per CUDA device when CUDA is present (utilisation only
with pynvml, which torch.cuda.utilization needs); on a CPU host no series at all."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from clipserve.observability import system
from clipserve.observability.metrics import Metrics
from clipserve.observability.system import publish_gpu
from clipserve.testing import FakeLoader

UTILIZATION = "clipserve_gpu_utilization_ratio"


@pytest.fixture(autouse=True)
def fresh_pynvml_check() -> Iterator[None]:
    """The pynvml check is made once per process: forgotten around each test."""
    clear = system._pynvml_importable.cache_clear  # kept: a test may replace the function
    clear()
    yield
    clear()


def never(*args: Any) -> Any:
    raise AssertionError("torch.cuda was read without CUDA")


def fake_cuda(monkeypatch: pytest.MonkeyPatch, utilization: Callable[[int], int]) -> None:
    """Two CUDA devices, as torch.cuda reports them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (3 * 2**30, 8 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 2**30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 2 * 2**30)
    monkeypatch.setattr(torch.cuda, "utilization", utilization)


def exposition(metrics: Metrics) -> str:
    return metrics.render().decode()


def sample_lines(text: str, prefix: str) -> list[str]:
    """The sample lines of a family (``name``) or of its series that start with ``prefix``."""
    start = prefix if "{" in prefix else prefix + "{"
    return [line for line in text.splitlines() if line.startswith(start)]


def test_utilisation_per_device_with_cuda_and_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, lambda i: (37, 100)[i])
    monkeypatch.setattr(system, "_pynvml_importable", lambda: True)
    metrics = Metrics()
    publish_gpu(metrics)
    text = exposition(metrics)
    assert sample_lines(text, UTILIZATION) == [
        f'{UTILIZATION}{{device="cuda:0"}} 0.37',
        f'{UTILIZATION}{{device="cuda:1"}} 1.0',
    ]
    (free,) = sample_lines(text, 'clipserve_gpu_memory_bytes{device="cuda:1",kind="free"')
    assert float(free.rsplit(" ", 1)[1]) == 3 * 2**30


def test_without_pynvml_there_is_no_utilisation_and_one_debug_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cuda(monkeypatch, never)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pynvml" else find_spec(name)
    )
    metrics = Metrics()
    with caplog.at_level(logging.DEBUG, logger=system.__name__):
        publish_gpu(metrics)
        publish_gpu(metrics)  # a second scrape says nothing new
    text = exposition(metrics)
    assert sample_lines(text, UTILIZATION) == []
    assert sample_lines(text, "clipserve_gpu_memory_bytes")  # memory needs no pynvml
    said = [r for r in caplog.records if "pynvml" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.DEBUG]


def test_an_nvml_error_skips_the_reading(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(index: int) -> int:
        raise RuntimeError("cuda driver can't be loaded, is cuda enabled?")

    fake_cuda(monkeypatch, broken)
    monkeypatch.setattr(system, "_pynvml_importable", lambda: True)
    metrics = Metrics()
    with caplog.at_level(logging.DEBUG, logger=system.__name__):
        publish_gpu(metrics)
    assert sample_lines(exposition(metrics), UTILIZATION) == []
    assert any("driver" in r.getMessage() for r in caplog.records)


async def test_cpu_leaves_the_gpu_gauges_without_series(
    monkeypatch: pytest.MonkeyPatch,
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU host, even on a GPU one
    monkeypatch.setattr(torch.cuda, "utilization", never)
    monkeypatch.setattr(torch.cuda, "mem_get_info", never)
    client = await client_for(make_settings(), FakeLoader())
    assert (await client.post("/v1/embeddings", json={"model": "fast", "input": "hi"})).is_success
    text = (await client.get("/metrics")).text
    assert f"# TYPE {UTILIZATION} gauge" in text  # declared, so the dashboard's query is valid
    assert sample_lines(text, UTILIZATION) == []
    assert sample_lines(text, "clipserve_gpu_memory_bytes") == []
