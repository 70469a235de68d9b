"""`clipserve models`, `clipserve download`, `clipserve export`, `clipserve bench` and
`clipserve profile`."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clipserve.cli._common import (
    ConfigOpt,
    DeviceOpt,
    app,
    build_settings,
    console,
)
from clipserve.errors import ConfigError

if TYPE_CHECKING:
    from clipserve.config import Settings
    from clipserve.model_specs import ModelSpec


@app.command("models")
def list_models(
    config: ConfigOpt = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include disabled models.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    families: Annotated[
        bool,
        typer.Option(
            "--families", help="The model families that can be served, and a registry entry each."
        ),
    ] = False,
) -> None:
    """List the model registry (built-ins + config file + MODEL_CONFIG_* variables), or with
    --families what can be served and how to point the registry at it."""
    if families:
        _print_families(as_json)
        return

    settings = build_settings(config_path=config)
    specs = _registry(settings)
    shown = {n: s for n, s in specs.items() if show_all or s.enabled}
    if as_json:
        typer.echo(json.dumps({n: s.model_dump() for n, s in shown.items()}, indent=2))
        return
    table = Table(title="clipserve models")
    for column in ("name", "backend", "model_name", "pretrained", "enabled", "description"):
        table.add_column(column)
    roles = (("default", settings.default_model), ("/embed", settings.text_model))
    for name, spec in shown.items():
        role = ", ".join(role for role, model in roles if model == name)
        table.add_row(
            f"{name} ({role})" if role else name,
            spec.backend,
            spec.model_name,
            spec.pretrained or "-",
            "yes" if spec.enabled else "no",
            spec.description,
        )
    Console().print(table)


def _registry(settings: Settings, names: Sequence[str] = ()) -> dict[str, ModelSpec]:
    """The model registry; a bad config or a name not in it exits 2, saying which."""
    from clipserve.model_specs import load_model_specs

    try:
        specs = load_model_specs(settings)
    except ConfigError as exc:
        console.print(f"[red]config error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    for name in names:
        if name not in specs:
            console.print(f"[red]error:[/red] unknown model '{name}'; known: {', '.join(specs)}")
            raise typer.Exit(2)
    return specs


@app.command()
def download(
    names: Annotated[list[str], typer.Argument(metavar="NAME...", help="Model config names.")],
    to: Annotated[Path, typer.Option("--to", help="The folder to download into.")],
    config: ConfigOpt = None,
    endpoint: Annotated[
        str | None, typer.Option(help="The Hugging Face Hub endpoint (default: HF_ENDPOINT).")
    ] = None,
    revision: Annotated[str | None, typer.Option(help="A branch, tag or commit.")] = None,
) -> None:
    """Download models' weights, tokenizers and processors into --to DIR, and write DIR/models.json
    pointing at them, for hosts without network (serve them with --config DIR/models.json).

    Exit codes: 0 done; 1 a download failed (the models before it are on disk); 2 an unknown
    model or a bad config."""
    from clipserve.download import DownloadError, download_models

    specs = _registry(build_settings(config_path=config), names)
    try:
        done = download_models(specs, names, to, endpoint=endpoint, revision=revision)
    except DownloadError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    for item in done:
        if item.skipped is not None:
            console.print(f"{item.name}: skipped ({item.skipped})")
        else:
            size = item.size_bytes / 2**20
            console.print(f"{item.name}: {item.files} files, {size:.1f} MiB")
    console.print(f"wrote {to / 'models.json'}: serve with --config {to / 'models.json'}")


export_app = typer.Typer(help="Export a configured model to another serving system.")
app.add_typer(export_app, name="export")


@export_app.command("torchserve")
def export_torchserve_command(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A model config name.")],
    to: Annotated[Path, typer.Option("--to", help="The folder the .mar goes into.")],
    config: ConfigOpt = None,
    version: Annotated[str, typer.Option(help="The archive's model version.")] = "1.0",
) -> None:
    """Build NAME.mar for TorchServe with torch-model-archiver: its handler runs the model with
    clipserve (the service's scores); local weights are bundled in the archive. TorchServe is in
    limited maintenance upstream: prefer scaling clipserve itself where you can.

    Exit codes: 0 built; 1 the archive could not be built; 2 an unknown model or a bad config."""
    from clipserve.export.torchserve import ExportError, export_torchserve

    specs = _registry(build_settings(config_path=config), [name])
    try:
        archive = export_torchserve(name, specs[name], to, version=version)
    except ExportError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from exc
    console.print(f"wrote {archive}: torchserve --model-store {to} --models {name}={archive.name}")


def _print_families(as_json: bool) -> None:
    from clipserve.model_families import FAMILIES

    if as_json:
        rows = [
            {field.name: getattr(f, field.name) for field in dataclasses.fields(f)}
            | {"example": dict(f.example)}
            for f in FAMILIES
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="model families")
    for column in ("family", "backend", "registry entry", "context", "image input", "parity"):
        table.add_column(column)
    for family in FAMILIES:
        table.add_row(
            family.name,
            family.backend,
            json.dumps(dict(family.example)),
            family.context,
            family.image_input,
            family.parity,
        )
    Console().print(table)


@app.command()
def bench(
    models: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated: tiny, vit-b-32 (default: both; with --optimizations: vit-b-32)."
        ),
    ] = None,
    pairs: Annotated[int, typer.Option(min=2, help="Distinct image-text pairs (requests).")] = 64,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 32,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="The batched server's max batch size.")
    ] = 32,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = "auto",
    optimizations: Annotated[
        bool,
        typer.Option(
            "--optimizations",
            help="In this process instead: fp32 vs bf16, int8, preprocess fast and the compile "
            "and onnx runtimes, with their speed and their deviation from fp32 on real photos.",
        ),
    ] = False,
    seconds: Annotated[
        float,
        typer.Option(min=0.0, help="--optimizations: seconds per throughput measurement."),
    ] = 2.0,
) -> None:
    """Concurrent single requests against a real server, batched vs --max-batch-size 1, and the
    raw model (random weights, no download): pairs/s, p50/p99, speed-up and server overhead.
    With --optimizations: the opt-in speed-ups (precision bf16 and int8, preprocess fast, runtime
    compile and onnx) against fp32 in this process: img/s and texts/s at batch 1 and 32, load
    time, weights' memory, and the max CLIP score change, min embedding cosines and zero-shot
    top-1 agreement."""
    default = "vit-b-32" if optimizations else "tiny,vit-b-32"
    names = [m.strip() for m in (models or default).split(",") if m.strip()]
    unknown = sorted(set(names) - {"tiny", "vit-b-32"})
    if unknown or not names:
        console.print(f"[red]unknown bench models:[/red] {', '.join(unknown) or '(none given)'}")
        raise typer.Exit(2)
    if optimizations:
        from clipserve import bench_optimizations

        rows = bench_optimizations.run_optimizations(names, device=device, seconds=seconds)
        for line in bench_optimizations.format_optimizations(rows):
            typer.echo(line)
        return
    from clipserve import bench as bench_module

    results = bench_module.run(
        names, pairs=pairs, concurrency=concurrency, max_batch_size=max_batch_size, device=device
    )
    for line in bench_module.format_results(results):
        typer.echo(line)


@app.command()
def profile(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model config name.")] = None,
    modality: Annotated[str, typer.Option(help="image or text.")] = "image",
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Inputs per pass.")] = 8,
    passes: Annotated[int, typer.Option(min=1, max=100, help="Profiled forward passes.")] = 10,
    output: Annotated[
        Path | None, typer.Option(help="Folder of the Chrome trace (else server.profile_dir).")
    ] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
) -> None:
    """torch.profiler over forward passes of a model: the top operators by self time, peak
    memory, and a Chrome trace (as POST /v1/system/profile does on a running server)."""
    import asyncio

    from clipserve.engine.engine import Engine
    from clipserve.engine.profiler import format_report
    from clipserve.errors import ClipServeError

    if modality not in ("image", "text"):
        console.print(f"[red]error:[/red] --modality is image or text, not {modality}")
        raise typer.Exit(2)
    settings = build_settings(
        config_path=config,
        device=device,
        server={"profile_dir": output},
        batching={"max_batch_size": batch_size},  # in-process: the size asked for is the limit
    )

    async def run() -> list[str]:
        async with Engine(settings) as engine:
            report = await engine.profile(
                model,
                "image" if modality == "image" else "text",
                batch_size=batch_size,
                passes=passes,
            )
        return format_report(report)

    try:
        lines = asyncio.run(run())
    except ClipServeError as exc:
        console.print(Text.assemble(("error: ", "red"), exc.message))
        raise typer.Exit(1) from exc
    for line in lines:
        typer.echo(line)
