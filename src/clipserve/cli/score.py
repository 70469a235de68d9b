"""`clipserve score`: CLIP scores of a CSV/JSONL file's rows, locally or through a service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
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
and error_<m> per model, plus Pearson/Spearman correlations in the summary. With --caption
MODEL: generated_caption (what the caption model sees in the image), generated_error and
generated_clip_score (per model when comparing), the generated caption's score against the
image, beside the prompt's. Without --output
the first 20 rows are shown as a table; --output - writes CSV to stdout.

Exit codes: 0 the job ran (some rows may have failed: see the error column); 1 no row could be
scored, a model failed to load or the service is unreachable; 2 bad usage or input (missing
column, unknown file type, unknown model, --model with --compare).
"""


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
    caption: Annotated[
        str | None,
        typer.Option(
            help="Also caption each image with this caption model (e.g. blip) and score the "
            "caption against the image."
        ),
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
            caption_model=caption,
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
