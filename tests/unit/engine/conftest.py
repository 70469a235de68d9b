"""Engine fixtures: engines over the fake backend, closed after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.testing import FakeLoader


@pytest.fixture
async def engine_for() -> AsyncIterator[Callable[..., Engine]]:
    """``engine_for(settings, loader=None)``: an engine (fake models unless ``loader``)."""
    engines: list[Engine] = []

    def make(settings: Settings, loader: FakeLoader | None = None) -> Engine:
        engine = Engine(settings, loader=loader or FakeLoader())
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()
