"""Typed settings: the one place that reads the environment.

``Settings`` is built once (by the CLI, or by a test) and passed down. It holds what the model
registry is built from (:mod:`clipserve.model_specs` merges the layers): the registry file
(``--config`` / ``CLIPSERVE_CONFIG``), the seed variables ``CLIP_MODEL`` and ``MODEL_NAME``, and
``MODEL_CONFIG_<NAME>`` variables holding a JSON object each. Other plain names the seeds and the
issue tracker use (``LOG_LEVEL``, ``MAX_BATCH_SIZE``, ``BATCH_WAIT_TIME_MS``, ``MAX_QUEUE_SIZE``...)
are read onto their nested fields; ``CLIPSERVE_*`` names and CLI flags win over them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from clipserve.errors import ConfigError
from clipserve.model_specs import (
    CudaPrecision,
    check_fields,
    is_config_name,
    json_type,
    source_config_name,
)

OverflowAction = Literal["reject", "wait"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

MODEL_ENV_PREFIX = "MODEL_CONFIG_"


class MediaSettings(BaseModel):
    """Limits and policies for image inputs."""

    model_config = ConfigDict(frozen=True)

    max_image_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=50_000_000, gt=0)
    max_decoded_pixels: int = Field(
        default=100_000_000,
        gt=0,
        description="decoded pixels held at once by the whole process (images wait for room)",
    )
    max_request_decoded_pixels: int = Field(
        default=50_000_000,
        gt=0,
        description="decoded pixels held at once by one request's window",
    )
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
    heavy_image_pixels: int = Field(
        default=8_000_000,
        gt=0,
        description="images over this many pixels are decoded on idle-priority threads",
    )
    heavy_decode_workers: int | None = Field(
        default=None, gt=0, description="low-priority decode threads; default: half the CPUs"
    )
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


def _redis_url(value: str | None, name: str) -> str | None:
    """A Redis URL setting: unset when blank; redis://, rediss:// or unix:// otherwise."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{name} must be redis://..., rediss://... or unix://...")
    return value


def _normalize_log_level(level: str) -> str:
    """``DEBUG``, ``Info``... in lower case, and ``warn`` (Python's alias) as ``warning``."""
    level = level.strip().lower()
    return "warning" if level == "warn" else level


class ServerSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: LogLevel = Field(default="info", description="any case: DEBUG, info...")
    traces_exporter: str | None = Field(
        default=None,
        description="OTEL_TRACES_EXPORTER: otlp or console turns traces on (clipserve[otel])",
    )
    profile_dir: Path | None = Field(
        default=None, description="where profiler traces go (default: <tmp>/clipserve-profiles)"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="json lines, console text, or auto: json unless a terminal"
    )
    max_batch_items: int = Field(
        default=1000, gt=0, description="inputs per request (evaluations, texts, documents...)"
    )
    max_images_per_request: int = Field(
        default=1000, gt=0, description="distinct images one request may fetch and decode"
    )
    max_prompt_chars: int = Field(default=10_000, gt=0)
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        gt=0,
        description=(
            "request body size; larger bodies get 413. 32 MiB holds a full request of "
            "max_batch_items (1000) captions of max_prompt_chars (10,000) with room to spare, or "
            "one inline image of max_image_bytes (20 MiB is 27 MiB in base64)"
        ),
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="seconds a request body may take to arrive (slow-loris); slower gets 408",
    )
    max_concurrent_requests: int | None = Field(
        default=None,
        gt=0,
        description=(
            "requests handled at once; more are refused with 429 before their body is read "
            "(cheap load shedding); probes are not counted. None: no limit"
        ),
    )
    inference_prefix: str = Field(
        default="/api/v1",
        pattern=r"^(/[A-Za-z0-9._~-]+)+$",
        description=(
            "the prefix of the ML inference service's endpoints (caption, embed/image, "
            "embed/text, warmup, capabilities)"
        ),
    )
    inference_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description=(
            "a second port the same app listens on, for clients that expect the ML inference "
            "service on its own port (8001)"
        ),
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _normalize_level(cls, value: object) -> object:
        return _normalize_log_level(value) if isinstance(value, str) else value


class CaptionSettings(BaseModel):
    """Generative models (captions, visual question answering) and the bounds of a request's
    decoding options."""

    model_config = ConfigDict(frozen=True)

    default_model: str = Field(
        default="blip", description="the caption model a request that names none gets"
    )
    blip_model: str | None = Field(
        default=None,
        description="BLIP_MODEL: the default caption model's weights, a transformers hub id or "
        "directory ('Salesforce/blip-image-captioning-large')",
    )
    max_new_tokens: int = Field(default=30, ge=1, le=512, description="the default length")
    max_new_tokens_limit: int = Field(
        default=128, ge=1, le=1024, description="the most max_new_tokens a request may ask"
    )
    max_num_beams: int = Field(
        default=5, ge=1, le=16, description="the widest beam search a request may ask"
    )
    max_prompt_chars: int = Field(
        default=500, ge=1, le=10_000, description="a conditional prompt's or question's length"
    )
    openai_api_key: SecretStr | None = Field(
        default=None,
        description="OPENAI_API_KEY: the key of openai-vision models whose spec gives none",
    )

    @field_validator("blip_model")
    @classmethod
    def _check_blip_model(cls, value: str | None) -> str | None:
        return value.strip() or None if value is not None else None


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
    client_queue_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="most of a queue one client (API key or address) may fill; its requests' "
        "windows are capped to it",
    )
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


def _text(name: str, raw: str) -> str:
    return raw.strip()


def _milliseconds(name: str, raw: str) -> float:
    """Milliseconds in the environment, seconds in Settings."""
    try:
        return float(raw) * 1e-3
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from exc


def _log_level(name: str, raw: str) -> str:
    level = _normalize_log_level(raw)
    if level not in get_args(LogLevel):
        choices = ", ".join(v.upper() for v in get_args(LogLevel))
        raise ConfigError(f"{name} must be one of {choices} (any case), got {raw!r}")
    return level


@dataclass(frozen=True, slots=True)
class _PlainEnv:
    """A plain environment name of the seeds or the issues, read onto a (nested) Settings field."""

    name: str
    path: tuple[str, ...]
    convert: Callable[[str, str], Any] = _text


# Of two names for one field, the first listed wins (MAX_BATCH_SIZE over BATCH_SIZE).
_PLAIN_ENV: tuple[_PlainEnv, ...] = (
    _PlainEnv("LOG_LEVEL", ("server", "log_level"), _log_level),
    _PlainEnv("LOG_FORMAT", ("server", "log_format")),
    _PlainEnv("OTEL_TRACES_EXPORTER", ("server", "traces_exporter")),
    _PlainEnv("MODEL_NAME", ("default_text_model",)),
    _PlainEnv("CLIP_MODEL", ("clip_model",)),
    _PlainEnv("BLIP_MODEL", ("captions", "blip_model")),
    _PlainEnv("OPENAI_API_KEY", ("captions", "openai_api_key")),
    _PlainEnv("MAX_BATCH_SIZE", ("batching", "max_batch_size")),
    _PlainEnv("BATCH_SIZE", ("batching", "max_batch_size")),
    _PlainEnv("BATCH_TIMEOUT", ("batching", "batch_timeout")),
    _PlainEnv("BATCH_WAIT_TIME_MS", ("batching", "batch_timeout"), _milliseconds),
    _PlainEnv("NUM_BATCHING_WORKERS", ("batching", "num_batching_workers")),
    _PlainEnv("MAX_CONCURRENT_BATCHES", ("batching", "max_concurrent_batches")),
    _PlainEnv("MAX_QUEUE_SIZE", ("batching", "max_queue_size")),
    _PlainEnv("REQUEST_TIMEOUT", ("batching", "request_timeout")),
    _PlainEnv("QUEUE_OVERFLOW_ACTION", ("batching", "queue_overflow_action")),
    _PlainEnv("AUTO_SCALE_WORKERS", ("batching", "auto_scale_workers")),
    _PlainEnv("CPU_UTILIZATION_FACTOR", ("batching", "cpu_utilization_factor")),
    _PlainEnv("DRAIN_TIMEOUT", ("batching", "drain_timeout")),
    _PlainEnv("USE_RAY_SERVE", ("ray", "enabled")),
)
PLAIN_ENV_NAMES = tuple(env.name for env in _PLAIN_ENV)


def _is_set(state: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether ``state`` (what stronger sources gave) sets the field at ``path``."""
    head, *rest = path
    if head not in state:
        return False
    value = state[head]
    # A whole section given as an object (``server=ServerSettings(...)``) sets all its fields.
    return not rest or not isinstance(value, Mapping) or _is_set(value, tuple(rest))


class _PlainEnvSource(PydanticBaseSettingsSource):
    """Reads the plain names of ``_PLAIN_ENV`` (``LOG_LEVEL=DEBUG``, ``MAX_BATCH_SIZE=64``...).

    Flags and ``CLIPSERVE_*`` names are stronger sources: a field they set is skipped here, so an
    overridden plain value is not even parsed."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for env in _PLAIN_ENV:
            raw = os.environ.get(env.name)
            if raw is None or not raw.strip():
                continue
            if _is_set(self.current_state, env.path) or _is_set(values, env.path):
                continue
            *parents, leaf = env.path
            section = values
            for parent in parents:
                section = section.setdefault(parent, {})
            section[leaf] = env.convert(env.name, raw)
        return values


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
    admin_keys: tuple[str, ...] = Field(
        default=(),
        description="hashed keys that may also use the admin endpoints (the profiler); "
        "they are valid API keys too",
    )

    @field_validator("api_keys", "admin_keys")
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
        return bool(self.api_keys or self.admin_keys) or self.api_keys_file is not None


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
    trusted_proxies: int = Field(
        default=0,
        ge=0,
        le=16,
        description=(
            "proxies in front of the service: clients are keyed by the X-Forwarded-For entry that "
            "many places from the right (0: by the peer address; the header is ignored)"
        ),
    )
    trust_forwarded_for: bool = Field(
        default=False, description="deprecated: the same as trusted_proxies=1"
    )

    @model_validator(mode="before")
    @classmethod
    def _one_proxy_when_trusted(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("trust_forwarded_for") in (True, "true", "1"):
            return {**data, "trusted_proxies": 1} if not data.get("trusted_proxies") else data
        return data

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


class CacheSettings(BaseModel):
    """The embedding cache (:mod:`clipserve.engine.cache`): an in-process LRU bounded in bytes,
    and an optional Redis tier shared by replicas. Entries are keyed by the model's weights, the
    preprocessing, the modality and the sha256 of the input's bytes (a URL's fetched body, never
    its address) or of a text's UTF-8."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(
        default=True, description="look embeddings up before computing them (per request: cache)"
    )
    max_bytes: int = Field(
        default=512 * 1024 * 1024,
        ge=0,
        description="bytes the in-process tier may hold (vectors, keys, bookkeeping); 0: none",
    )
    redis_url: str | None = Field(
        default=None, description="redis://host:6379/0, rediss://... or unix://...: a shared tier"
    )
    redis_ttl_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="seconds a Redis entry lives; 0: no expiry"
    )
    redis_timeout_s: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="longest one Redis call may take; a slower or failed call is a miss",
    )
    redis_prefix: str = Field(default="clipserve:emb:", description="prefix of the Redis keys")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        return _redis_url(value, "cache.redis_url")


class CollectionsSettings(BaseModel):
    """Vector collections (:mod:`clipserve.engine.tasks.search`): local ones (FAISS, ScaNN) under
    ``data_dir``, and Milvus ones on ``milvus_uri`` (a server, or a milvus-lite ``.db`` file)."""

    model_config = ConfigDict(frozen=True)

    data_dir: Path = Field(
        default=Path("data/collections"),
        description="local collections live here (opened at start-up when it exists)",
    )
    milvus_uri: str | None = Field(
        default=None, description="http://host:19530, or a path ending in .db for milvus-lite"
    )
    milvus_token: str | None = Field(default=None, description="user:password or an API key")
    save_interval_s: float = Field(
        default=10.0, gt=0, description="how often changed local collections are saved"
    )
    max_collections: int = Field(default=1000, ge=1)


class JobsSettings(BaseModel):
    """Jobs (:mod:`clipserve.engine.jobs`): long scoring and embedding work in chunks, in this
    process, or in Redis (``redis_url``) so they survive a restart and any replica runs them."""

    model_config = ConfigDict(frozen=True)

    redis_url: str | None = Field(
        default=None, description="redis://host:6379/0...: jobs and their queue live there"
    )
    chunk_size: int = Field(default=64, ge=1, le=4096, description="items per unit of work")
    max_items: int = Field(default=100_000, ge=1, description="items per job")
    max_active: int = Field(default=100, ge=1, description="jobs queued or running at once")
    max_running: int = Field(default=2, ge=1, le=64, description="chunks run at once")
    chunk_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="longest a chunk may run (also how soon a crashed one reruns)",
    )
    keep_finished: int = Field(
        default=100, ge=1, description="in-process: finished jobs kept (oldest go first)"
    )
    keep_s: float = Field(default=7 * 24 * 3600, gt=0, description="Redis: finished jobs' lifetime")
    key_prefix: str = Field(default="clipserve:job:", description="prefix of the Redis keys")

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        return _redis_url(value, "jobs.redis_url")


class RaySettings(BaseModel):
    """Ray Serve mode (``clipserve serve --ray``, ``USE_RAY_SERVE=true``): the same app as the
    ingress of one Serve deployment, each replica with its own engine, batcher and models. The
    defaults are the seed's: 1-4 replicas, 10 ongoing requests per replica, 1 CPU, no GPU."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(default=False, description="USE_RAY_SERVE: serve through Ray Serve")
    address: str | None = Field(
        default=None,
        description="the Ray cluster to join ('auto', 'ray://host:10001'); None: start one here",
    )
    deployment_name: str = Field(default="vision-similarity-service", min_length=1)
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(
        default=10.0, gt=0, description="autoscaling target: ongoing requests per replica"
    )
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="requests one replica handles at once (Serve's limit)"
    )
    max_queued_requests: int = Field(
        default=1000,
        ge=1,
        description="requests waiting for a replica; more get 429 with Retry-After from Serve",
    )
    retry_after_s: float = Field(
        default=1.0, ge=0, description="the Retry-After of Serve's queue-full answers"
    )
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs per replica")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica")
    memory_gb: float | None = Field(
        default=None,
        ge=0,
        description=(
            "memory per replica (GB); None: the enabled models' memory_gb summed from the "
            "registry, or 4 GB when no model states it"
        ),
    )
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _replicas_in_order(self) -> RaySettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"ray.min_replicas ({self.min_replicas}) exceeds ray.max_replicas "
                f"({self.max_replicas})"
            )
        return self


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
                raise ConfigError(f"{key} must hold a JSON object, got {json_type(value)}")
            check_fields(value, key)
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
        default="minilm",
        description=(
            "the model behind POST /embed (text only; also MODEL_NAME): a config name, or a hub "
            "id or directory, registered under its last path component (see `text_model`)"
        ),
    )
    clip_model: str | None = Field(
        default=None,
        description=(
            "CLIP_MODEL: the default model's weights, a transformers hub id or directory "
            "('openai/clip-vit-large-patch14'), 'hf-hub:'/'local-dir:' or an open_clip "
            "architecture"
        ),
    )
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    cuda_precision: CudaPrecision = Field(
        default="fp16",
        description="weights on CUDA unless a model's `precision` says: fp16, bf16 or fp32",
    )
    preload: bool = False
    memory_budget_gb: float | None = Field(
        default=None,
        gt=0,
        description=(
            "device memory the loaded models of one device may take together (GB); None: no budget"
        ),
    )
    evict_idle: bool = Field(
        default=False,
        description=(
            "when loading a model would exceed memory_budget_gb, unload the least recently used "
            "idle model (no requests in flight) instead of refusing"
        ),
    )
    model_retry_interval_s: float = Field(
        default=30.0, ge=0, description="a model that failed to load is retried after this long"
    )
    runtime_cache_dir: Path = Field(
        default=Path("data/runtime-cache"),
        description="where `runtime: onnx` keeps its exports (one folder per model tower)",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = Field(
        default="default",
        description="torch.compile's mode for `runtime: compile` ('reduce-overhead': CUDA graphs)",
    )
    eval_batch_size: int = Field(default=32, gt=0, le=1024)
    model_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    server: ServerSettings = Field(default_factory=ServerSettings)
    media: MediaSettings = Field(default_factory=MediaSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    captions: CaptionSettings = Field(default_factory=CaptionSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    collections: CollectionsSettings = Field(default_factory=CollectionsSettings)
    ray: RaySettings = Field(default_factory=RaySettings)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError("device must be auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("cuda_precision", mode="before")
    @classmethod
    def _check_cuda_precision(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "int8":
            raise ValueError(
                "cuda_precision cannot be 'int8': int8 (dynamic quantization) runs on the CPU "
                "only; use fp16, bf16 or fp32 here, and `precision: int8` on the models that "
                "run on the CPU"
            )
        return value

    @field_validator("default_text_model")
    @classmethod
    def _check_text_model(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("default_text_model (MODEL_NAME) must not be empty")
        if not is_config_name(value):
            source_config_name(value)  # raises when no config name can be derived
        return value

    @field_validator("clip_model")
    @classmethod
    def _check_clip_model(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return value.strip()

    @model_validator(mode="after")
    def _text_model_is_not_the_default_model(self) -> Settings:
        if self.text_model_source is not None and self.text_model == self.default_model:
            raise ValueError(
                f"default_text_model (MODEL_NAME) {self.default_text_model!r} would be registered "
                f"as '{self.text_model}', the default model: rename its folder, or register it "
                "in the config file and give its config name"
            )
        return self

    @property
    def text_model_source(self) -> str | None:
        """The hub id or directory of the /embed model when ``default_text_model`` is one (then
        ``load_model_specs`` registers it as ``text_model``); None for a config name."""
        return None if is_config_name(self.default_text_model) else self.default_text_model

    @property
    def text_model(self) -> str:
        """The config name behind POST /embed."""
        source = self.text_model_source
        return self.default_text_model if source is None else source_config_name(source)

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
            _PlainEnvSource(settings_cls),
            _ModelEnvSource(settings_cls),
            file_secret_settings,
        )
