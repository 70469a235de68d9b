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


class QueueInfo(BaseModel):
    model: str
    modality: str
    device: str
    size: int = Field(description="Items waiting.")
    max_batch_size: int = Field(description="Current limit (lowered after out-of-memory).")
    batches: int = Field(description="Batches run so far.")
    items: int = Field(description="Items answered so far.")
    drain_rate_items_per_s: float | None = None
    consecutive_failures: int = Field(default=0, description="Failed inputs in a row.")
    last_error: str | None = None
    running_for_s: float = Field(default=0.0, description="Age of the oldest running batch.")


class BatchProcessing(BaseModel):
    accepting: bool = Field(description="False while shutting down.")
    max_batch_size: int
    batch_timeout_s: float
    num_batching_workers: int
    max_concurrent_batches: int | None = Field(description="null: 1 on CPU, 2 on CUDA.")
    max_queue_size: int
    queue_overflow_action: str
    request_timeout_s: float
    batches_processed: int
    items_processed: int
    queues: list[QueueInfo]


class ServiceHealth(BaseModel):
    status: Literal["healthy", "unhealthy"]
    model: str = Field(description="The default model.")
    model_state: str | None = Field(description="not_loaded | loading | loaded | error")
    device: str
    queue_size: int
    inflight_batches: int
    batch_processing: BatchProcessing
    error: str | None = Field(default=None, description="Why the service is not ready.")


class ReadyResponse(BaseModel):
    status: Literal["ready", "not_ready"]
    error: str | None = None
