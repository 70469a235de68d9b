"""The `clipserve` command: maps arguments onto Settings and hands over to the app or a job."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from clipserve.config import Settings
from clipserve.errors import ConfigError

app = typer.Typer(
    name="clipserve",
    help="CLIP score and embeddings: serve the API, score CSV/JSONL files, benchmark.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Model registry JSON (else $CLIPSERVE_CONFIG)."),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="auto | cpu | cuda | cuda:N (else $CLIPSERVE_DEVICE)."),
]


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """Drop flags that were not given (None), recursively, and sections left empty."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _given(value)
        if value is not None and value != {}:
            out[key] = value
    return out


def build_settings(**flags: Any) -> Settings:
    """Settings from the environment; the flags that were given win (nested ones merged)."""
    try:
        return Settings(**_given(flags))
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    except ValidationError as exc:
        console.print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8000).")] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    preload: Annotated[
        bool | None, typer.Option("--preload/--lazy", help="Load all enabled models at start-up.")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error.")] = None,
    media_root: Annotated[
        Path | None, typer.Option(help="Serve local image paths from under this folder.")
    ] = None,
) -> None:
    """Start the HTTP service."""
    import uvicorn

    from clipserve.api.app import create_app

    settings = build_settings(
        config_path=config,
        device=device,
        preload=preload,
        server={"host": host, "port": port, "log_level": log_level},
        media={"media_root": media_root},
    )
    level = settings.server.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        application = create_app(settings)
        uvicorn.run(
            application,
            host=settings.server.host,
            port=settings.server.port,
            log_level=settings.server.log_level,
            timeout_graceful_shutdown=30,
        )
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc.message}")
        raise typer.Exit(2) from exc


@app.command("models")
def list_models(
    config: ConfigOpt = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include disabled models.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the model registry (built-ins + config file + MODEL_CONFIG_* variables)."""
    from clipserve.config import load_model_specs

    settings = build_settings(config_path=config)
    try:
        specs = load_model_specs(settings)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    shown = {n: s for n, s in specs.items() if show_all or s.enabled}
    if as_json:
        typer.echo(json.dumps({n: s.model_dump() for n, s in shown.items()}, indent=2))
        return
    table = Table(title="clipserve models")
    for column in ("name", "backend", "model_name", "pretrained", "enabled", "description"):
        table.add_column(column)
    for name, spec in shown.items():
        default = " (default)" if name == settings.default_model else ""
        table.add_row(
            name + default,
            spec.backend,
            spec.model_name,
            spec.pretrained or "-",
            "yes" if spec.enabled else "no",
            spec.description,
        )
    Console().print(table)


def main() -> None:
    app()
