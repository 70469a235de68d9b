"""Typed dependencies: routes reach the engine, settings and metrics only through these.

They are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency on its thread pool, a
thread hand-off per dependency per request for what is an attribute read."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from clipserve.api.security import InputBudget, ItemCharge, input_budget, item_charge
from clipserve.config import Settings
from clipserve.engine.engine import Engine
from clipserve.observability.metrics import Metrics


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_caller(request: Request) -> str | None:
    """Who is asking (``key:<name>`` or ``ip:<address>``, from :class:`AccessMiddleware`), whose
    share of each queue a request counts against; None on paths it does not guard."""
    caller: str | None = getattr(request.state, "caller", None)
    return caller


EngineDep = Annotated[Engine, Depends(get_engine)]
CallerDep = Annotated[str | None, Depends(get_caller)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
InputsDep = Annotated[InputBudget, Depends(input_budget)]
"""``await admit(n, what)``: the per-request input limit and the caller's item rate limit."""
JobItemsDep = Annotated[ItemCharge, Depends(item_charge)]
"""``await charge(n)``: a job's items against the caller's item rate (``jobs.max_items`` bounds
its size)."""
