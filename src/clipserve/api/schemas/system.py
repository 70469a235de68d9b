"""HTTP schemas of health and status."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class GpuMemory(BaseModel):
    device: str
    name: str
    total_mb: float
    free_mb: float
    allocated_mb: float
    reserved_mb: float


class HealthResponse(BaseModel):
    status: Literal["healthy", "degraded"] = Field(
        description="degraded when an enabled model failed to load (its requests get 503)."
    )
    version: str
    uptime_s: float
    default_model: str
    models: dict[str, str] = Field(description="Load state of each enabled model.")
    model_errors: dict[str, str] = Field(default_factory=dict)
    gpu: list[GpuMemory] | None = None


class StatusResponse(BaseModel):
    version: str
    uptime_s: float
    started_at: float
    python_version: str
    torch_version: str
    cuda_available: bool
    device: str
    default_model: str
    config_path: str | None
    last_reload_at: float | None
    last_reload_error: str | None
    models_total: int
    models_loaded: int
    models_failed: int
    limits: dict[str, float | int]
