"""`clipserve embed` (bulk embedding into shards or a collection) and `clipserve search`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from clipserve.cli._common import (
    ConfigOpt,
    DeviceOpt,
    _paragraphs,
    app,
    build_settings,
    console,
)
from clipserve.errors import ConfigError

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
