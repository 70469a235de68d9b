"""`clipserve serve` (one process or uvicorn workers) and `clipserve hash-key`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from clipserve.cli._common import (
    ConfigOpt,
    DeviceOpt,
    app,
    build_settings,
    console,
)
from clipserve.config import Settings
from clipserve.errors import ConfigError
from clipserve.observability.logging import configure_logging


def _run(app: Any, settings: Settings, options: dict[str, Any], *, workers: int = 1) -> None:
    """uvicorn on ``server.port``, and on ``server.inference_port`` as well when it is set (the
    same app, processes and workers on both sockets)."""
    import uvicorn

    extra = settings.server.inference_port
    if extra is None:
        uvicorn.run(app, workers=workers, factory=isinstance(app, str), **options)
        return
    from uvicorn.supervisors import Multiprocess

    config = uvicorn.Config(app, workers=workers, factory=isinstance(app, str), **options)
    second = uvicorn.Config(app, host=config.host, port=extra)
    sockets = [config.bind_socket(), second.bind_socket()]
    try:
        if workers > 1:
            Multiprocess(config, sockets=sockets).run()
        else:
            uvicorn.Server(config).run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()


def _serve_workers(settings: Settings, workers: int, options: dict[str, Any]) -> None:
    """uvicorn's worker processes, each building the app from these settings (a file named in
    their environment), their metrics in one ``PROMETHEUS_MULTIPROC_DIR`` (emptied first: values
    left by an earlier run would be counted again; a temporary one unless set)."""
    import os
    import tempfile

    from clipserve.api.app import SETTINGS_FILE_ENV

    with tempfile.TemporaryDirectory(prefix="clipserve-") as scratch:
        metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(scratch, "metrics")
        os.makedirs(metrics_dir, exist_ok=True)
        for stale in Path(metrics_dir).glob("*.db"):
            stale.unlink()
        settings_file = Path(scratch) / "settings.json"
        settings_file.write_text(settings.model_dump_json())
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ[SETTINGS_FILE_ENV] = str(settings_file)
        _run("clipserve.api.app:worker_app", settings, options, workers=workers)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    preload: Annotated[
        bool | None, typer.Option("--preload/--lazy", help="Load all enabled models at start-up.")
    ] = None,
    log_level: Annotated[
        str | None,
        typer.Option(help="debug | info | warning | error, any case (else $LOG_LEVEL; info)."),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(help="json | console | auto: json unless stderr is a terminal ($LOG_FORMAT)."),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Worker processes, each with its own models (metrics merged through "
            "$PROMETHEUS_MULTIPROC_DIR).",
        ),
    ] = 1,
    media_root: Annotated[
        Path | None, typer.Option(help="Serve local image paths from under this folder.")
    ] = None,
    max_batch_size: Annotated[
        int | None, typer.Option(help="Items per forward pass (else $MAX_BATCH_SIZE; 32).")
    ] = None,
    batch_timeout: Annotated[
        float | None,
        typer.Option(help="Seconds the oldest queued item waits for a batch to fill (0.01)."),
    ] = None,
    num_batching_workers: Annotated[
        int | None, typer.Option(help="Batch collectors per queue (1).")
    ] = None,
    max_concurrent_batches: Annotated[
        int | None, typer.Option(help="Batches in flight per device (1 on CPU, 2 on CUDA).")
    ] = None,
    max_queue_size: Annotated[
        int | None, typer.Option(help="Items waiting per queue before overflow (1000).")
    ] = None,
    queue_overflow_action: Annotated[
        str | None, typer.Option(help="reject (429 + Retry-After) or wait (until the deadline).")
    ] = None,
    request_timeout: Annotated[
        float | None, typer.Option(help="Seconds before a request is answered 504 (300).")
    ] = None,
    api_keys_file: Annotated[
        Path | None, typer.Option(help="Require API keys: a file of hashes (clipserve hash-key).")
    ] = None,
    max_concurrent_requests: Annotated[
        int | None,
        typer.Option(help="Requests at once; more get 429 before their body is read."),
    ] = None,
    inference_port: Annotated[
        int | None,
        typer.Option(help="Also listen on this port (the ML inference service's, e.g. 8001)."),
    ] = None,
    ray: Annotated[
        bool | None,
        typer.Option(
            "--ray/--no-ray",
            help="Serve through Ray Serve: replicas with autoscaling ($USE_RAY_SERVE; the "
            "ray.* settings).",
        ),
    ] = None,
) -> None:
    """Start the HTTP service (also on `server.inference_port` when set: the ML inference
    service's port, 8001, for clients that expect it there)."""
    from clipserve.api.app import create_app

    settings = build_settings(
        config_path=config,
        device=device,
        preload=preload,
        server={
            "host": host,
            "port": port,
            "log_level": log_level,
            "log_format": log_format,
            "max_concurrent_requests": max_concurrent_requests,
            "inference_port": inference_port,
        },
        media={"media_root": media_root},
        auth={"api_keys_file": api_keys_file},
        ray={"enabled": ray},
        batching={
            "max_batch_size": max_batch_size,
            "batch_timeout": batch_timeout,
            "num_batching_workers": num_batching_workers,
            "max_concurrent_batches": max_concurrent_batches,
            "max_queue_size": max_queue_size,
            "queue_overflow_action": queue_overflow_action,
            "request_timeout": request_timeout,
        },
    )
    log_config = configure_logging(settings.server.log_level, settings.server.log_format)
    options: dict[str, Any] = {
        "host": settings.server.host,
        "port": settings.server.port,
        "log_level": settings.server.log_level,
        "log_config": log_config,
        # Open requests get the drain timeout; the batcher then drains what is left.
        "timeout_graceful_shutdown": max(1, round(settings.batching.drain_timeout)),
    }
    try:
        if settings.ray.enabled:
            if workers > 1 or settings.server.inference_port is not None:
                raise ConfigError(
                    "--ray replaces --workers and --inference-port: Ray Serve runs the replicas "
                    "(ray.min_replicas, ray.max_replicas) behind its own HTTP proxy"
                )
            from clipserve import ray_serve

            ray_serve.run(settings)
        elif workers > 1:
            _serve_workers(settings, workers, options)
        else:
            _run(create_app(settings, freeze_heap=True), settings, options)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc.message}")
        raise typer.Exit(2) from exc


@app.command("hash-key")
def hash_key_command() -> None:
    """Print the hash of an API key, for `auth.api_keys` or the key file. The key is read from
    stdin (typed without echo on a terminal), never from the command line, where it would stay in
    the shell history and the process list."""
    import getpass
    import sys

    from clipserve.api.security import hash_key

    if sys.stdin.isatty():
        secret = getpass.getpass("API key: ").strip()
    else:
        secret = sys.stdin.readline().strip()
    if not secret:
        console.print("[red]error:[/red] the key is empty")
        raise typer.Exit(2)
    typer.echo(hash_key(secret))
