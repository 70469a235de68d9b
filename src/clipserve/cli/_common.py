"""What every `clipserve` command shares: the Typer app, the console, the common options and the
settings built from flags over the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

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


def _paragraphs(text: str) -> str:
    """Join hard-wrapped lines so the help formatter can wrap paragraphs to the terminal."""
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))
