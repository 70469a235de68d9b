"""The `clipserve` command: maps arguments onto Settings and hands over to the app or a job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clipserve.config import Settings
from clipserve.errors import ConfigError
from clipserve.observability.logging import configure_logging

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


def _serve_workers(settings: Settings, workers: int, options: dict[str, Any]) -> None:
    """uvicorn's worker processes, each building the app from these settings (a file named in
    their environment), their metrics in one ``PROMETHEUS_MULTIPROC_DIR`` (emptied first: values
    left by an earlier run would be counted again; a temporary one unless set)."""
    import os
    import tempfile

    import uvicorn

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
        uvicorn.run("clipserve.api.app:worker_app", factory=True, workers=workers, **options)


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
) -> None:
    """Start the HTTP service."""
    import uvicorn

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
        },
        media={"media_root": media_root},
        auth={"api_keys_file": api_keys_file},
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
        if workers > 1:
            _serve_workers(settings, workers, options)
        else:
            uvicorn.run(create_app(settings, freeze_heap=True), **options)
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


@app.command("models")
def list_models(
    config: ConfigOpt = None,
    show_all: Annotated[bool, typer.Option("--all", help="Include disabled models.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the model registry (built-ins + config file + MODEL_CONFIG_* variables)."""
    from clipserve.model_specs import load_model_specs

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
            help="In this process instead: fp32 vs bf16, int8 and preprocess fast, with their "
            "speed and their deviation from fp32 on real photos.",
        ),
    ] = False,
    seconds: Annotated[
        float,
        typer.Option(min=0.0, help="--optimizations: seconds per throughput measurement."),
    ] = 2.0,
) -> None:
    """Concurrent single requests against a real server, batched vs --max-batch-size 1, and the
    raw model (random weights, no download): pairs/s, p50/p99, speed-up and server overhead.
    With --optimizations: the opt-in speed-ups (precision bf16 and int8, preprocess fast) against
    fp32 in this process: img/s and texts/s at batch 1 and 32, load time, weights' memory, and
    the max CLIP score change, min embedding cosines and zero-shot top-1 agreement."""
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


_SCORE_HELP = """Score every (image, caption) row of a CSV or JSONL file.

INPUT is a .csv file with a header row or a .jsonl file with one object per line (- reads
stdin). The image column is url, path, image or image_input; the caption column caption, text
or text_prompt. Other columns are copied to the output. Relative paths resolve against INPUT's
folder.

Local mode (the default) runs the models in this process and may read image files anywhere on
this machine, unless --media-root (or CLIPSERVE_MEDIA__MEDIA_ROOT) limits it to one folder. URLs
are fetched with the service's protections (no private addresses without --allow-private-urls).
With --service-url the rows go to a running service (--config and --device are then unused);
local files are read here and sent inline.

Output columns: clip_score, error, model, text_truncated; with --compare a,b: clip_score_<m>
and error_<m> per model, plus Pearson/Spearman correlations in the summary. Without --output
the first 20 rows are shown as a table; --output - writes CSV to stdout.

Exit codes: 0 the job ran (some rows may have failed: see the error column); 1 no row could be
scored, a model failed to load or the service is unreachable; 2 bad usage or input (missing
column, unknown file type, unknown model, --model with --compare).
"""


def _paragraphs(text: str) -> str:
    """Join hard-wrapped lines so the help formatter can wrap paragraphs to the terminal."""
    return "\n\n".join(" ".join(p.split()) for p in text.strip().split("\n\n"))


@app.command(help=_paragraphs(_SCORE_HELP))
def score(
    input_file: Annotated[
        str, typer.Argument(metavar="INPUT", help="A .csv or .jsonl file, or - for stdin.")
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model config name (default: the default one)."),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(help="Score each row with several models, e.g. fast,accurate."),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(min=1, max=1024, help="Pairs per forward pass (default 32).")
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, help="Rows read, scored and written at a time.")
    ] = 256,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="out.csv or out.jsonl; - for CSV on stdout."),
    ] = None,
    service_url: Annotated[
        str | None,
        typer.Option(help="Score through a running service, e.g. http://127.0.0.1:8000."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds per request to --service-url.")
    ] = 300.0,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    media_root: Annotated[
        Path | None, typer.Option(help="Read local image files only from under this folder.")
    ] = None,
    allow_private_urls: Annotated[
        bool,
        typer.Option("--allow-private-urls", help="Allow image URLs on loopback/private networks."),
    ] = False,
) -> None:
    from clipserve import scoring
    from clipserve.errors import ClipServeError, InvalidInputError, ModelNotFoundError

    settings = build_settings(
        config_path=config,
        device=device,
        eval_batch_size=batch_size,
        media={"media_root": media_root, "allow_private_urls": allow_private_urls or None},
    )
    try:
        models, comparing = scoring.choose_models(model, compare)
        job = scoring.ScoringJob(
            input=input_file,
            output=output,
            models=models,
            compare=comparing,
            batch_size=batch_size,
            chunk_size=chunk_size,
            service_url=service_url,
            timeout_s=timeout,
        )
        summary = scoring.run(job, settings, console=console)
    except (InvalidInputError, ModelNotFoundError, ConfigError) as exc:
        console.print(Text.assemble(("error: ", "red"), exc.message))
        raise typer.Exit(2) from exc
    except ClipServeError as exc:
        console.print(Text.assemble(("error: ", "red"), exc.message))
        raise typer.Exit(1) from exc
    if not summary.any_scored:
        console.print(Text("no row could be scored (see the error column)", style="red"))
        raise typer.Exit(1)


_EMBED_HELP = """Embed a whole collection into clip-retrieval's layout of .npy shards and Parquet
metadata.

SOURCE is a folder of images (NAME.txt next to an image is its caption), a .csv or .jsonl file
(image column url, path, image or image_input; caption column caption, text or text_prompt;
other columns become metadata), or webdataset .tar shards: one file, a folder of them, a glob
or a range like shards/{00000..00009}.tar (KEY.jpg + KEY.txt + KEY.json per sample).

OUTPUT gets img_emb/img_emb_0000.npy, text_emb/text_emb_0000.npy (when captions are embedded)
and metadata/metadata_0000.parquet (key, image_path, url, caption, metadata), one set per
--shard-size rows; row i of a shard's .npy files is row i of its Parquet table. Rows that fail
(an unreadable image) are left out and listed in errors/errors_0000.jsonl.

Rerunning the same command resumes: finished shards are skipped, the rest recomputed.

Exit codes: 0 the job ran (some rows may have failed); 1 no row could be embedded (or the
source is empty), the model failed to load or the service is unreachable; 2 bad usage, source or
output.
"""


@app.command(help=_paragraphs(_EMBED_HELP))
def embed(
    source: Annotated[
        str, typer.Argument(metavar="SOURCE", help="Image folder, .csv/.jsonl or .tar shards.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model config name.")] = None,
    shard_size: Annotated[int, typer.Option(min=1, help="Rows per output shard.")] = 4096,
    batch_size: Annotated[
        int | None,
        typer.Option(min=1, max=4096, help="Per forward pass (with --service-url: request)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float16.")] = "float32",
    images: Annotated[
        bool | None, typer.Option("--images/--no-images", help="Embed images (default: if any).")
    ] = None,
    texts: Annotated[
        bool | None,
        typer.Option("--texts/--no-texts", help="Embed captions (default: if the source has)."),
    ] = None,
    show_progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    service_url: Annotated[
        str | None, typer.Option(help="Embed through a running service, e.g. http://host:8000.")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(help="API key for --service-url; - reads it from stdin.")
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds per service request.")] = 300.0,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    media_root: Annotated[
        Path | None, typer.Option(help="Read local image files only from under this folder.")
    ] = None,
    allow_private_urls: Annotated[
        bool,
        typer.Option("--allow-private-urls", help="Allow image URLs on loopback/private networks."),
    ] = False,
    collection: Annotated[
        str | None,
        typer.Option(help="Also add the vectors to this collection (made with the same model)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Local collections folder (else collections.data_dir).")
    ] = None,
) -> None:
    import sys

    from clipserve import bulk
    from clipserve.errors import ClipServeError, InvalidInputError, ModelNotFoundError

    if dtype not in ("float32", "float16"):
        console.print(f"[red]error:[/red] --dtype must be float32 or float16, not {dtype}")
        raise typer.Exit(2)
    if api_key == "-":
        api_key = sys.stdin.readline().strip()
    settings = build_settings(
        config_path=config,
        device=device,
        batching={"max_batch_size": None if service_url else batch_size},
        media={"media_root": media_root, "allow_private_urls": allow_private_urls or None},
        collections={"data_dir": data_dir},
    )
    job = bulk.BulkJob(
        source=source,
        output=output,
        model=model,
        shard_size=shard_size,
        batch_size=batch_size,
        dtype="float16" if dtype == "float16" else "float32",
        images=images,
        texts=texts,
        service_url=service_url,
        api_key=api_key,
        timeout_s=timeout,
        progress=show_progress,
        collection=collection,
    )
    try:
        summary = bulk.run(job, settings, console=console)
    except KeyboardInterrupt:
        console.print("interrupted: finished shards are kept; rerun the command to resume")
        raise typer.Exit(130) from None
    except (InvalidInputError, ModelNotFoundError, ConfigError) as exc:
        console.print(Text.assemble(("error: ", "red"), exc.message))
        raise typer.Exit(2) from exc
    except ClipServeError as exc:
        console.print(Text.assemble(("error: ", "red"), exc.message))
        raise typer.Exit(1) from exc
    if not summary.embedded and (summary.items or not summary.shards_skipped):
        raise typer.Exit(1)  # every row failed, or there were none


@app.command()
def search(
    collection: Annotated[str, typer.Argument(help="Collection name.")],
    text: Annotated[str | None, typer.Option("--text", "-t", help="A text query.")] = None,
    image: Annotated[
        str | None, typer.Option("--image", "-i", help="An image query: file, URL or data URI.")
    ] = None,
    text_weight: Annotated[
        float, typer.Option(min=0, max=1, help="With both: weight of the text side.")
    ] = 0.5,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="How many hits.")] = 10,
    filter_json: Annotated[
        str | None, typer.Option("--filter", help='Metadata filter as JSON: {"key": "value"}.')
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per hit.")] = False,
    service_url: Annotated[
        str | None, typer.Option(help="Search through a running service, e.g. http://host:8000.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(help="API key for --service-url.")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Local collections folder (else collections.data_dir).")
    ] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
) -> None:
    """Search a collection by text, image or both, as POST /v1/collections/NAME/search does."""
    from clipserve.collections_client import search_local, search_remote
    from clipserve.errors import ClipServeError

    query: dict[str, Any] = {"text": text, "image": image, "text_weight": text_weight}
    query["top_k"] = top_k
    try:
        query["filter"] = json.loads(filter_json) if filter_json else None
    except ValueError:
        console.print("[red]error:[/red] --filter is not JSON")
        raise typer.Exit(2) from None
    try:
        if service_url:
            hits = search_remote(service_url, collection, query, api_key=api_key)
        else:
            settings = build_settings(
                config_path=config, device=device, collections={"data_dir": data_dir}
            )
            hits = search_local(settings, collection, query)
    except ClipServeError as exc:
        console.print(Text.assemble(("error: ", "red"), exc.message))
        raise typer.Exit(1) from exc
    if as_json:
        for hit in hits:
            typer.echo(json.dumps(hit))
        return
    table = Table("rank", "id", "score", "metadata")
    for rank, hit in enumerate(hits, start=1):
        table.add_row(str(rank), hit["id"], f"{hit['score']:.4f}", json.dumps(hit["metadata"]))
    Console().print(table)


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


def main() -> None:
    app()
