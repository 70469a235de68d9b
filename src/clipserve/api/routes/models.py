"""The model registry API under /v1/system/models."""

from __future__ import annotations

from fastapi import APIRouter

from clipserve.api.deps import EngineDep
from clipserve.api.schemas.models import (
    ModelInfoResponse,
    ModelListResponse,
    ModelRuntime,
    ModelSummary,
    ReloadResponse,
)
from clipserve.engine.registry import ModelStatus
from clipserve.model_specs import ModelSpec

router = APIRouter(prefix="/v1/system/models", tags=["models"])


def _summary(status: ModelStatus) -> ModelSummary:
    return ModelSummary(
        name=status.name,
        **status.spec.model_dump(exclude={"device", "precision"}),
        status=status.state.value,
        loaded=status.loaded,
        error=status.error,
    )


def _runtime(status: ModelStatus) -> ModelRuntime:
    info = status.info
    return ModelRuntime(
        status=status.state.value,
        loaded=status.loaded,
        device=status.device,
        dtype=status.dtype,
        load_time_s=status.load_time_s,
        loaded_at=status.loaded_at,
        memory_mb=round(info.memory_bytes / 2**20, 2) if info else None,
        parameter_count=info.parameter_count if info else None,
        architecture=info.architecture if info else None,
        embed_dim=info.embed_dim if info else None,
        context_length=info.context_length if info else None,
        image_size=info.image_size if info else None,
        modalities=sorted(info.modalities) if info else None,
        runtime=info.runtime.name if info else None,
        runtime_fallback=info.runtime.fallback if info else None,
        in_flight=status.in_flight,
        error=status.error,
    )


def _list(engine: EngineDep, *, include_disabled: bool) -> ModelListResponse:
    statuses = engine.registry.statuses(include_disabled=include_disabled)
    return ModelListResponse(
        models=[_summary(s) for s in statuses],
        default_model=engine.settings.default_model,
        total=len(statuses),
    )


@router.get("", response_model=ModelListResponse)
async def list_models(engine: EngineDep) -> ModelListResponse:
    """Enabled models with their load state."""
    return _list(engine, include_disabled=False)


@router.get("/all", response_model=ModelListResponse)
async def list_all_models(engine: EngineDep) -> ModelListResponse:
    """Every configured model, disabled ones included."""
    return _list(engine, include_disabled=True)


@router.get("/specs", response_model=dict[str, ModelSpec])
async def model_specs(engine: EngineDep) -> dict[str, ModelSpec]:
    """The enabled models' specs, in the shape of `config/models.json`."""
    return {name: engine.registry.spec(name) for name in engine.registry.names()}


@router.get("/{config_name}/info", response_model=ModelInfoResponse)
async def model_info(config_name: str, engine: EngineDep) -> ModelInfoResponse:
    """Spec and runtime (loaded?, device, dtype, load time, memory) of one model."""
    status = engine.registry.status(config_name)
    return ModelInfoResponse(name=config_name, spec=status.spec, runtime=_runtime(status))


@router.post("/reload", response_model=ReloadResponse)
async def reload_models(engine: EngineDep) -> ReloadResponse:
    """Re-read the config file now. Removed or changed models are unloaded once idle."""
    result = await engine.registry.reload()
    return ReloadResponse(
        added=result.added,
        removed=result.removed,
        changed=result.changed,
        updated=result.updated,
        models=engine.registry.names(),
    )
