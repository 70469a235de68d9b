"""``clipserve download``: fetch configured models' files into a folder for air-gapped hosts.

For each model it downloads what its loader would fetch from the Hugging Face Hub, into
``<to>/<name>``, and rewrites its spec to point there; ``<to>/models.json`` then holds every
downloaded spec (``{"models": {...}}``), ready for ``--config`` on a host without network:

* ``hf`` and ``sentence-transformers`` (and ``task: caption``) models: the whole repository of
  ``model_name`` (weights, config, tokenizer, processor) becomes ``model_name: <folder>``;
* open_clip ``hf-hub:org/repo``: the repository becomes ``local-dir:<folder>``;
* open_clip architecture + ``pretrained`` tag: the tag's checkpoint file (from open_clip's
  pretrained table) becomes ``pretrained: <file>``.

Models that need nothing (remote ``openai-vision`` ones, local paths, ``package:`` weights,
random weights) are left as they are, with the reason. Downloads go through ``huggingface_hub``
(its endpoint is a parameter, so tests use a stand-in server); a repository that is missing or
cannot be reached is a :class:`DownloadError` naming the model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipserve.errors import ClipServeError
from clipserve.model_specs import ModelSpec
from clipserve.models.loader import HF_HUB_PREFIX, PACKAGE_PREFIX, is_path_like

_CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""What open_clip looks for in a pretrained tag's hub repository, in its order."""


class DownloadError(ClipServeError):
    """A model's files could not be downloaded."""


@dataclass(frozen=True, slots=True)
class Downloaded:
    name: str
    spec: ModelSpec
    """The spec pointing at the downloaded files (unchanged when nothing was downloaded)."""
    files: int = 0
    size_bytes: int = 0
    skipped: str | None = None
    """Why nothing was downloaded."""


def _folder_size(folder: Path) -> tuple[int, int]:
    files = [f for f in folder.rglob("*") if f.is_file() and ".cache" not in f.parts]
    return len(files), sum(f.stat().st_size for f in files)


def _skip_reason(spec: ModelSpec) -> str | None:
    if spec.backend == "openai-vision":
        return "a remote model: nothing to download"
    if is_path_like(spec.model_name):
        return "model_name is a local path already"
    if spec.pretrained is not None and spec.pretrained.startswith(PACKAGE_PREFIX):
        return "its weights ship in a Python package"
    if spec.backend == "open_clip" and not spec.model_name.startswith(HF_HUB_PREFIX):
        if spec.pretrained is None:
            return "random weights (pretrained is null): nothing to download"
        if is_path_like(spec.pretrained):
            return "pretrained is a local path already"
    return None


class Downloader:
    def __init__(
        self, to: Path, *, endpoint: str | None = None, revision: str | None = None
    ) -> None:
        self.to = to
        self.endpoint = endpoint
        self.revision = revision

    def model(self, name: str, spec: ModelSpec) -> Downloaded:
        reason = _skip_reason(spec)
        if reason is not None:
            return Downloaded(name, spec, skipped=reason)
        folder = self.to / name
        if spec.backend != "open_clip":
            self._snapshot(name, spec.model_name, folder)
            return self._done(name, spec.model_copy(update={"model_name": str(folder)}), folder)
        if spec.model_name.startswith(HF_HUB_PREFIX):
            self._snapshot(name, spec.model_name.removeprefix(HF_HUB_PREFIX), folder)
            updated = spec.model_copy(update={"model_name": f"local-dir:{folder}"})
            return self._done(name, updated, folder)
        assert spec.pretrained is not None  # _skip_reason
        checkpoint = self._open_clip_checkpoint(name, spec.model_name, spec.pretrained, folder)
        return self._done(name, spec.model_copy(update={"pretrained": str(checkpoint)}), folder)

    def _done(self, name: str, spec: ModelSpec, folder: Path) -> Downloaded:
        files, size = _folder_size(folder)
        return Downloaded(name, spec, files, size)

    def _snapshot(self, name: str, repo_id: str, folder: Path) -> None:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(
                repo_id, revision=self.revision, local_dir=folder, endpoint=self.endpoint
            )
        except Exception as exc:
            raise self._failed(name, repo_id, exc) from exc

    def _open_clip_checkpoint(self, name: str, architecture: str, tag: str, folder: Path) -> Path:
        import open_clip
        from huggingface_hub import hf_hub_download

        config = open_clip.get_pretrained_cfg(architecture, tag)
        hub = str(config.get("hf_hub") or "")
        if not hub:
            raise DownloadError(
                f"model '{name}': open_clip's pretrained '{tag}' for {architecture} is not on "
                "the Hugging Face Hub (unknown tag, or a plain URL); download its checkpoint "
                "yourself and set `pretrained` to the file"
            )
        parts = hub.strip("/").split("/")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        candidates = (filename,) if filename else _CHECKPOINT_NAMES
        last: Exception | None = None
        for candidate in candidates:
            try:
                path = hf_hub_download(
                    repo_id,
                    candidate,
                    revision=self.revision,
                    local_dir=folder,
                    endpoint=self.endpoint,
                )
            except Exception as exc:  # the next name, or the error below
                last = exc
                continue
            return Path(path)
        assert last is not None
        raise self._failed(name, repo_id, last) from last

    def _failed(self, name: str, repo_id: str, exc: BaseException) -> DownloadError:
        kind = type(exc).__name__
        if kind == "OfflineModeIsEnabled" or "offline" in str(exc).lower():
            why = "HF_HUB_OFFLINE is set: unset it on a host that can reach the hub"
        elif kind in ("RepositoryNotFoundError", "GatedRepoError"):
            why = "the repository does not exist, or needs a token (HF_TOKEN)"
        elif kind in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
            why = "the file is not in the repository"
        else:
            why = f"{kind}: {str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}"
        return DownloadError(f"model '{name}': could not download '{repo_id}' ({why})")


def download_models(
    specs: Mapping[str, ModelSpec],
    names: Sequence[str],
    to: Path,
    *,
    endpoint: str | None = None,
    revision: str | None = None,
) -> list[Downloaded]:
    """Download ``names`` (config names in ``specs``) into ``to`` and write ``to/models.json``
    with their specs (downloaded ones pointing at their files). Raises :class:`DownloadError`
    (a model failed; the ones before it are on disk) and ``KeyError`` for an unknown name."""
    for name in names:
        if name not in specs:
            raise KeyError(name)
    to.mkdir(parents=True, exist_ok=True)
    downloader = Downloader(to, endpoint=endpoint, revision=revision)
    done = [downloader.model(name, specs[name]) for name in dict.fromkeys(names)]
    models: dict[str, Any] = {d.name: d.spec.model_dump(mode="json") for d in done}
    (to / "models.json").write_text(json.dumps({"models": models}, indent=2) + "\n")
    return done
