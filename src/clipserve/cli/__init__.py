"""The `clipserve` command: maps arguments onto Settings and hands over to the app or a job.

One module per group of commands, each registering on the one Typer ``app``."""

from __future__ import annotations

from clipserve.openmp import apply_defaults

apply_defaults()  # before torch loads libgomp (below)

from clipserve.cli import embed, score, serve, system  # noqa: E402
from clipserve.cli._common import app, build_settings  # noqa: E402

__all__ = ["app", "build_settings", "main"]
_COMMANDS = (embed, score, serve, system)  # imported for their @app.command registrations


def main() -> None:
    app()
