"""HTTP schemas of the model registry API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from clipserve.model_specs import ModelSpec, Runtime


class ModelSummary(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    model_name: str
    pretrained: str | None
    backend: str
    task: str = Field(default="embed", description="embed | caption")
    description: str
    memory_gb: float | None
    avg_inference_time_ms: float | None
    accuracy_score: float | None
    enabled: bool
    status: str = Field(description="not_loaded | loading | loaded | error")
    loaded: bool
    error: str | None = None


class ModelListResponse(BaseModel):
    models: list[ModelSummary]
    default_model: str
    total: int


class ModelRuntime(BaseModel):
    status: str
    loaded: bool
    device: str | None = None
    dtype: str | None = None
    load_time_s: float | None = None
    loaded_at: float | None = Field(default=None, description="Unix time of the last load.")
    memory_mb: float | None = Field(default=None, description="Weights and buffers.")
    parameter_count: int | None = None
    architecture: str | None = None
    embed_dim: int | None = None
    context_length: int | None = None
    image_size: int | None = None
    modalities: list[str] | None = None
    runtime: Runtime | None = Field(
        default=None, description="What runs the encoders once loaded (eager where it fell back)."
    )
    runtime_fallback: str | None = Field(
        default=None, description="Why the spec's runtime did not take a tower."
    )
    in_flight: int = Field(default=0, description="Requests currently using the model.")
    error: str | None = None


class ModelInfoResponse(BaseModel):
    name: str
    spec: ModelSpec
    runtime: ModelRuntime


class ReloadResponse(BaseModel):
    added: list[str]
    removed: list[str]
    changed: list[str] = Field(description="Reloaded weights on next use (old model retired).")
    updated: list[str] = Field(description="Metadata changed only.")
    models: list[str] = Field(description="Enabled models after the reload.")
