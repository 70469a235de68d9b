"""HTTP schemas of health, status, warm-up and capabilities."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clipserve.model_specs import Runtime
from clipserve.models.base import Modality


class GpuMemory(BaseModel):
    device: str
    name: str
    total_mb: float
    free_mb: float
    allocated_mb: float
    reserved_mb: float


class RecentRequestsInfo(BaseModel):
    window_s: float
    requests: int = Field(description="Requests answered in the window (this process).")
    server_errors: int = Field(description="Of which 5xx.")
    error_rate: float | None = Field(description="server_errors / requests; null without any.")


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
    recent: RecentRequestsInfo | None = None


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
    recent: RecentRequestsInfo
    gpu: list[GpuMemory] | None = None
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


# --- warm-up and capabilities -------------------------------------------------------------------


class WarmupRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": ["fast"]}, {}]})

    models: list[str] | None = Field(
        default=None, description="Model config names; absent or empty: every loaded model."
    )


class WarmupPass(BaseModel):
    modality: Modality
    batch_size: int
    duration_ms: float


class ModelWarmup(BaseModel):
    model: str
    status: Literal["ok", "error"]
    device: str | None = None
    modalities: list[Modality] = Field(description="The queues warmed.")
    passes: list[WarmupPass] = Field(description="Dummy forward passes run, in order.")
    duration_ms: float
    error: str | None = Field(default=None, description="Why this model failed to warm up.")


class WarmupResponse(BaseModel):
    models: list[ModelWarmup]
    total_ms: float


class QueueCapabilities(BaseModel):
    modality: str
    max_batch_size: int = Field(description="Current limit (lowered after out-of-memory).")
    probed_batch_size: int | None = Field(
        description="What the start-up probe found fits the device's free memory (CUDA only)."
    )


class ModelCapabilities(BaseModel):
    name: str
    backend: str
    architecture: str
    device: str
    dtype: str
    runtime: Runtime = Field(
        default="eager",
        description="What runs the encoders: the spec's runtime, or eager where it fell back.",
    )
    compiled: bool = Field(default=False, description="torch.compile graphs warmed at load.")
    runtime_towers: list[str] = Field(
        default_factory=list, description="The towers the runtime took (the others run eager)."
    )
    runtime_load_ms: float | None = Field(
        default=None, description="Compile or ONNX export/cache read, and the check, at load."
    )
    runtime_fallback: str | None = Field(
        default=None, description="Why a tower stayed eager, when one did."
    )
    modalities: list[str]
    queues: list[QueueCapabilities]
    load_time_ms: float | None = None
    warmup_time_ms: float | None = Field(default=None, description="Of the last warm-up.")
    warmed_up_at: float | None = Field(default=None, description="Unix time of the last warm-up.")


class CapabilitiesResponse(BaseModel):
    device: str = Field(description="The service's default device.")
    dtype: str | None = Field(description="Weights' dtype on it unless a model overrides it.")
    runtime: Runtime = Field(
        default="eager", description="The default; a model's spec may say compile or onnx."
    )
    compiled: bool = Field(default=False, description="Whether any loaded model is compiled.")
    image_decoder: Literal["pillow"] = "pillow"
    pillow_version: str
    backends: dict[str, bool] = Field(description="Which backend libraries are installed.")
    torch_version: str
    cuda_available: bool
    cuda_version: str | None
    gpu: list[GpuMemory] | None = Field(description="Per CUDA device; null without CUDA.")
    max_batch_size: int = Field(description="Configured items per forward pass.")
    models: list[ModelCapabilities] = Field(description="Loaded models.")


class ProfileRequest(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), extra="forbid")

    model: str | None = Field(default=None, description="Config name (default model).")
    modality: Literal["image", "text"] = "image"
    batch_size: int = Field(default=8, ge=1, le=4096, description="At most max_batch_size.")
    passes: int = Field(default=10, ge=1, le=100)


class ProfiledOperator(BaseModel):
    name: str
    calls: int
    self_cpu_ms: float
    cpu_ms: float
    self_device_ms: float
    self_cpu_memory_mb: float


class ProfileResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model: str
    modality: str
    batch_size: int
    passes: int
    wall_ms: float
    peak_memory_mb: float | None = Field(description="Peak device memory (CUDA only).")
    operators: list[ProfiledOperator] = Field(description="Top operators by self CPU time.")
    trace_url: str = Field(description="The Chrome trace (chrome://tracing, Perfetto).")
