"""Ray Serve mode: the same FastAPI app as the ingress of one Serve deployment.

``clipserve serve --ray`` (or ``USE_RAY_SERVE=true``) deploys :class:`ClipServeReplica`. Each
replica builds the app from the settings it was bound with (:func:`create_app`, models preloaded,
so loading happens in the replica's start-up, before Serve routes it any request) and runs its own
engine: the registry (hot reload of the config file included: every replica watches it), the
dynamic batcher, the limits. Serve runs the app's lifespan and forwards HTTP to it unchanged, so
our per-item errors, 4xx and our own 429/503 with ``Retry-After`` come through as they are.

What Serve adds, from :class:`~clipserve.config.RaySettings` (the seed's numbers as defaults):
autoscaling between ``min_replicas`` and ``max_replicas`` on ongoing requests per replica
(``target_ongoing_requests``), ``max_ongoing_requests`` per replica, and a bounded queue in
front of them (``max_queued_requests``): a request over it is answered 429 with ``Retry-After``
by Serve itself. Serve's health check calls :meth:`ClipServeReplica.check_health`, which fails
exactly when our ``/ready`` would answer 503. Per-replica resources: ``num_cpus``, ``num_gpus``
and memory (by default the enabled models' ``memory_gb`` from the registry).

Concurrency: the replica owns nothing but the app; its tasks (batcher, registry watcher) are the
engine's, started and stopped by the app's lifespan, which Serve enters at replica start and
leaves at replica stop. Ray is imported only here and only when this mode is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipserve.config import Settings
from clipserve.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

_DEFAULT_MEMORY_GB = 4.0  # the seed's 4294967296 bytes, when no model states its memory
_GB = 1024**3


def _require_ray() -> Any:
    try:
        from ray import serve
    except ImportError as exc:  # pragma: no cover - ray is a dev dependency
        raise ConfigError(
            "Ray Serve mode needs Ray: pip install 'clipserve[ray]' (or run without --ray)"
        ) from exc
    return serve


def replica_memory_gb(settings: Settings) -> float:
    """Memory a replica asks Ray for: ``ray.memory_gb``, else the enabled models' ``memory_gb``
    summed (each replica holds every model it serves), else the seed's 4 GB."""
    if settings.ray.memory_gb is not None:
        return settings.ray.memory_gb
    from clipserve.model_specs import load_model_specs

    stated = [
        spec.memory_gb
        for spec in load_model_specs(settings).values()
        if spec.enabled and spec.memory_gb is not None
    ]
    return sum(stated) if stated else _DEFAULT_MEMORY_GB


def deployment_options(settings: Settings) -> dict[str, Any]:
    """The ``serve.deployment`` options of the settings' Ray section."""
    _require_ray()
    from ray.serve.config import BackpressureConfig

    ray = settings.ray
    actor_options: dict[str, Any] = {"num_cpus": ray.num_cpus, "num_gpus": ray.num_gpus}
    memory_gb = replica_memory_gb(settings)
    if memory_gb > 0:
        actor_options["memory"] = int(memory_gb * _GB)
    return {
        "name": ray.deployment_name,
        "autoscaling_config": {
            "min_replicas": ray.min_replicas,
            "initial_replicas": max(ray.min_replicas, 1),
            "max_replicas": ray.max_replicas,
            "target_ongoing_requests": ray.target_ongoing_requests,
        },
        "max_ongoing_requests": ray.max_ongoing_requests,
        "max_queued_requests": ray.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=429, retry_after_s=ray.retry_after_s),
        "ray_actor_options": actor_options,
        "health_check_period_s": ray.health_check_period_s,
        "health_check_timeout_s": ray.health_check_timeout_s,
    }


class ClipServeReplica:
    """One Serve replica: clipserve's app built from the settings it was bound with."""

    def __init__(self, settings_json: str) -> None:
        # Models load in the replica's start-up (the lifespan), not on its first request.
        settings = Settings.model_validate_json(settings_json)
        self._settings = settings.model_copy(update={"preload": True})
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:  # noqa: N802 - Serve's hook name
        from clipserve.api.app import create_app

        self._app = create_app(self._settings)
        return self._app

    async def check_health(self) -> None:
        """Serve's health check: fails when ``/ready`` would answer 503 (shutting down, default
        model failed to load, queues stuck), so Serve replaces the replica; a default model that
        is loading (a config reload) is not a failure."""
        engine = getattr(self._app.state, "engine", None) if self._app is not None else None
        if engine is None:
            return
        readiness = engine.readiness()
        if readiness.ready or _default_model_loading(engine):
            return
        raise RuntimeError(f"clipserve replica not ready: {readiness.reason}")


def _default_model_loading(engine: Any) -> bool:
    from clipserve.engine.registry import ModelState
    from clipserve.errors import ModelNotFoundError

    try:
        status = engine.registry.status(engine.settings.default_model, include_disabled=False)
    except ModelNotFoundError:
        return False
    return bool(status.state is ModelState.LOADING)


def application(settings: Settings) -> Any:
    """The bound Serve application (``serve.run(application(settings))``)."""
    serve = _require_ray()
    ingress = serve.ingress()(ClipServeReplica)
    return serve.deployment(**deployment_options(settings))(ingress).bind(
        settings.model_dump_json()
    )


def build_app(args: dict[str, Any]) -> Any:
    """Serve's application builder (``import_path: clipserve.ray_serve:build_app`` in a Serve
    config or a KubeRay RayService): settings from the environment, with ``args`` (the config's
    ``args``, nested like the settings: ``{"ray": {"max_replicas": 8}}``) on top."""
    return application(Settings(**args))


def run(settings: Settings) -> None:  # pragma: no cover - blocks; the test deploys application()
    """Join (``ray.address``) or start a Ray cluster, serve on ``server.host:port`` and block
    until interrupted."""
    import signal
    import threading

    import ray

    serve = _require_ray()
    ray.init(address=settings.ray.address, include_dashboard=False)
    serve.start(http_options={"host": settings.server.host, "port": settings.server.port})
    serve.run(application(settings), name="clipserve", route_prefix="/")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
