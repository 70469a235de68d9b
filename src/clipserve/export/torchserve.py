"""``clipserve export torchserve NAME --to DIR``: a TorchServe model archive (``.mar``) of one
configured model, built with ``torch-model-archiver``.

The archive holds a small ``handler.py`` that forwards to
:class:`clipserve.export.torchserve_handler.ClipServeHandler` (clipserve itself runs the model:
the same scores as the service), the model's spec and, when its weights are local (a directory
or a checkpoint file), those files, so the archive serves without the original paths. Weights
named by a hub id are fetched by the worker as the service would (or bundle them first with
``clipserve download``).

TorchServe is in limited maintenance upstream; for scaling out, Ray Serve or several clipserve
replicas behind a load balancer are the recommended paths.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from clipserve.errors import ClipServeError
from clipserve.export.torchserve_handler import MANIFEST, WEIGHTS
from clipserve.model_specs import ModelSpec
from clipserve.models.loader import LOCAL_DIR_PREFIX, is_path_like

_HANDLER = '''"""TorchServe entry point of a clipserve model (`clipserve export torchserve`)."""
from clipserve.export.torchserve_handler import ClipServeHandler

_service = ClipServeHandler()


def handle(data, context):
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
'''


class ExportError(ClipServeError):
    """The archive could not be built."""


def _bundle(spec: ModelSpec, staging: Path) -> ModelSpec:
    """Copy local weights into ``staging/weights`` and point the spec at them, relative to the
    archive (torch-model-archiver puts an extra folder's contents at the archive's root, so
    ``staging`` itself is passed)."""
    updates: dict[str, str] = {}
    for field in ("model_name", "pretrained"):
        value = getattr(spec, field)
        if not isinstance(value, str) or not is_path_like(value):
            continue
        source = Path(value.removeprefix(LOCAL_DIR_PREFIX)).expanduser()
        target = staging / WEIGHTS / field
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            target.mkdir(parents=True)
            target = target / source.name
            shutil.copy2(source, target)
        else:
            raise ExportError(f"the model's {field} is a local path that does not exist")
        relative = target.relative_to(staging).as_posix()
        prefix = LOCAL_DIR_PREFIX if value.startswith(LOCAL_DIR_PREFIX) else ""
        updates[field] = prefix + relative
    return spec.model_copy(update=updates)


def export_torchserve(name: str, spec: ModelSpec, to: Path, *, version: str = "1.0") -> Path:
    """Build ``to/<name>.mar`` and return its path. Raises :class:`ExportError`."""
    if spec.task != "embed":
        raise ExportError(f"model '{name}' is a caption model: only embedding models export")
    to.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clipserve-mar-") as scratch:
        staging = Path(scratch) / "archive"  # what the archive holds besides its handler
        staging.mkdir()
        bundled = _bundle(spec, staging)
        manifest = {"name": name, "spec": bundled.model_dump(mode="json")}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        handler = Path(scratch) / "handler.py"
        handler.write_text(_HANDLER)
        extra = [str(staging)]
        command = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", name, "--version", version,
            "--handler", str(handler),
            "--extra-files", ",".join(extra),
            "--export-path", str(to), "--force",
        ]  # fmt: skip
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except FileNotFoundError as exc:
            raise ExportError("torch-model-archiver is not installed") from exc
        if result.returncode != 0:
            output = (result.stderr or result.stdout).strip().splitlines()
            why = output[-1][:300] if output else f"exit code {result.returncode}"
            if "No module named model_archiver" in result.stderr:
                why = "torch-model-archiver is not installed (pip install torch-model-archiver)"
            raise ExportError(f"model '{name}': torch-model-archiver failed: {why}")
    return to / f"{name}.mar"
