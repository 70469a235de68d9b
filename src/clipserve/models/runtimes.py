"""``runtime: compile | onnx``: a loaded backend's towers run by ``torch.compile`` or ONNX Runtime.

:func:`apply_runtime` takes a :class:`~clipserve.models.base.TowerBackend` that has just loaded
(eager) and, tower by tower (image, text):

* ``compile`` - ``torch.compile(tower, dynamic=True)`` (inductor; ``compile_mode``
  ``reduce-overhead`` adds CUDA graphs on a GPU). Shapes are bucketed by dynamo itself: the batch
  (and a text's token count) is a symbolic size, specialised only at 1, so the warm-up compiles
  every bucket there is (batch 1; several items; short and long texts) at load, and requests then
  run through ``torch._dynamo.run``, which never compiles: a shape outside what was warmed runs
  eagerly rather than making a request wait for the compiler.
* ``onnx`` - the tower exported once (``torch.onnx.export``, dynamo exporter, batch and token
  count dynamic) to ``<cache_dir>/onnx/<key>/``, ``key`` a digest of the module's class, its
  weights, the input shapes, dtype and the torch/onnx versions, so a reload (or another replica
  sharing the folder) skips the export; the folder is written whole under a temporary name and
  renamed, so a crash mid-export leaves nothing that looks done. An ONNX Runtime session runs it
  with the device thread's intra-op thread count (CPU; CUDA when onnxruntime-gpu provides it).

Either way the new forward is checked against the eager one on the warm-up inputs (cosine of
every row >= :data:`MIN_COSINE`) before it replaces it. A runtime that cannot be had (package
missing, export or compile failure, a check that fails, a tower the runtime cannot take) leaves
that tower eager and says why: ``info.extra`` gets ``runtime`` (what actually runs: ``compile``,
``onnx``, or ``eager`` when no tower could be taken), ``runtime_towers``, ``runtime_load_s`` and
``runtime_fallback`` (the reason, logged as a warning too), so capabilities and model info never
claim a runtime that is not running.

Threads: everything here runs in the loading thread, before the backend is handed to the engine;
the forwards it installs are called from the device thread only (ONNX Runtime releases the GIL).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch.nn.functional import cosine_similarity

from clipserve.model_specs import Runtime
from clipserve.models.base import Tower, TowerBackend, TowerForward, TowerName

logger = logging.getLogger(__name__)

CompileMode = Literal["default", "reduce-overhead", "max-autotune"]

MIN_COSINE = 0.999
"""The least cosine between a runtime's output and eager's on the warm-up inputs: a sanity check
that catches a broken graph, not the last-bit drift (which the bench measures)."""
ONNX_FILE = "model.onnx"


class RuntimeUnavailableError(Exception):
    """This runtime cannot run this tower; the message says why (the tower stays eager)."""


def apply_runtime(
    backend: Any,
    runtime: Runtime,
    *,
    cache_dir: Path,
    compile_mode: CompileMode = "default",
) -> None:
    """Run ``backend``'s towers under ``runtime`` (in place; ``eager`` does nothing). Never
    raises for a runtime that cannot be had: the towers stay eager and ``info.extra`` says why
    (see the module's docstring)."""
    if runtime == "eager":
        return
    started = time.perf_counter()
    if not isinstance(backend, TowerBackend):
        _report(
            backend, runtime, [], [f"{type(backend).__name__} has no towers to {runtime}"], started
        )
        return
    taken: list[TowerName] = []
    reasons: list[str] = []
    with torch.inference_mode():  # the examples are then what requests send: inference tensors
        towers = backend.towers()
    for name, tower in towers.items():
        try:
            if runtime == "compile":
                forward = _compiled(tower, compile_mode)
            else:
                forward = _onnx(tower, cache_dir)
            _check(tower, forward)
        except RuntimeUnavailableError as exc:
            reasons.append(f"{name}: {exc}")
            continue
        except Exception as exc:  # an exporter's or compiler's own failure: stay eager
            logger.debug("runtime %s of the %s tower failed", runtime, name, exc_info=True)
            reasons.append(f"{name}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        backend.use_tower(name, forward)
        taken.append(name)
    _report(backend, runtime, taken, reasons, started)


def _report(
    backend: Any, runtime: Runtime, taken: Sequence[str], reasons: Sequence[str], started: float
) -> None:
    fields = {
        "runtime": runtime if taken else "eager",
        "runtime_towers": ",".join(taken),
        "runtime_load_s": f"{time.perf_counter() - started:.2f}",
    }
    if reasons:
        fields["runtime_fallback"] = "; ".join(reasons)
        logger.warning("runtime %s: kept eager for %s", runtime, fields["runtime_fallback"])
    note = getattr(backend, "note_runtime", None)
    if note is not None:
        note(fields)


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return text[0][:300] if text else ""


def _check(tower: Tower, forward: TowerForward) -> None:
    """``forward`` gives eager's features on every warm-up input (cosine >= MIN_COSINE)."""
    with torch.inference_mode():
        for inputs in tower.examples:
            expected = tower.module(*inputs).float()
            got = forward(*inputs).float().to(expected.device)
            if got.shape != expected.shape:
                raise RuntimeUnavailableError(
                    f"output shape {tuple(got.shape)}, eager's {tuple(expected.shape)}"
                )
            worst = float(cosine_similarity(got, expected, dim=-1).min())
            if not worst >= MIN_COSINE:
                raise RuntimeUnavailableError(f"output differs from eager's (cosine {worst:.6f})")


# --- compile ------------------------------------------------------------------------------------


def _compiled(tower: Tower, mode: CompileMode) -> TowerForward:
    """The tower compiled and warmed on every example; calls after that never compile."""
    compiled = torch.compile(tower.module, dynamic=True, mode=mode)
    with torch.inference_mode():
        for inputs in tower.examples:
            for name, t in zip(tower.input_names, inputs, strict=True):
                if t.shape[0] >= 2:  # 0 and 1 are always specialised
                    torch._dynamo.maybe_mark_dynamic(t, 0)
                if name in tower.length_inputs:
                    torch._dynamo.maybe_mark_dynamic(t, 1)
            compiled(*inputs)
    run_only: TowerForward = torch._dynamo.run(tower.module)
    return run_only


# --- onnx ---------------------------------------------------------------------------------------


def _onnx(tower: Tower, cache_dir: Path) -> TowerForward:
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeUnavailableError(
            "onnxruntime is not installed (pip install 'clipserve[onnx]')"
        ) from exc
    device = _device_of(tower)
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise RuntimeUnavailableError(
                "this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu)"
            )
        providers.insert(0, "CUDAExecutionProvider")
    elif device.type != "cpu":
        raise RuntimeUnavailableError(f"ONNX Runtime does not run on {device.type}")
    path = _exported(tower, cache_dir)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)
    return _SessionForward(session, tower.input_names, device)


class _SessionForward:
    """An ONNX Runtime session as a tower forward: torch tensors in, a torch tensor out."""

    def __init__(self, session: Any, names: Sequence[str], device: torch.device) -> None:
        self._session = session
        self._names = tuple(names)
        self._device = device

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: t.detach().cpu().numpy() for name, t in zip(self._names, inputs, strict=True)}
        (features,) = self._session.run(None, feed)
        return torch.from_numpy(features).to(self._device)


def _device_of(tower: Tower) -> torch.device:
    first = next(iter(tower.module.parameters()), None)
    return torch.device("cpu") if first is None else first.device


def _export_inputs(tower: Tower) -> tuple[torch.Tensor, ...]:
    """The example the exporter traces: several items (a batch of 1 would be specialised) whose
    batch differs from its token count (equal sizes would be taken for one dimension)."""
    for inputs in tower.examples:
        batch = inputs[0].shape[0]
        lengths = {
            inputs[i].shape[1] for i, n in enumerate(tower.input_names) if n in tower.length_inputs
        }
        if batch >= 2 and batch not in lengths and all(length >= 2 for length in lengths):
            return inputs
    raise RuntimeUnavailableError("no warm-up input can serve as the export's example")


def cache_key(tower: Tower, inputs: Sequence[torch.Tensor]) -> str:
    """The digest naming a tower's export: module class, weights, inputs (dtype, fixed dims),
    dynamic inputs, and the torch and onnx versions."""
    import onnx

    digest = hashlib.blake2b(digest_size=16)
    module = tower.module
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    digest.update(f"torch {torch.__version__} onnx {onnx.__version__}".encode())
    for name, t in zip(tower.input_names, inputs, strict=True):
        fixed = tuple(t.shape[1:]) if name not in tower.length_inputs else tuple(t.shape[2:])
        digest.update(f"{name} {t.dtype} {fixed} {name in tower.length_inputs}".encode())
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(str((value.dtype, tuple(value.shape))).encode())
        digest.update(
            value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def _exported(tower: Tower, cache_dir: Path) -> Path:
    """The tower's ONNX file: from the cache, else exported into it (whole or not at all)."""
    inputs = _export_inputs(tower)
    folder = cache_dir / "onnx" / cache_key(tower, inputs)
    path = folder / ONNX_FILE
    if path.is_file():
        logger.info("ONNX export found in the cache: %s", folder)
        return path
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        started = time.perf_counter()
        _export(tower, inputs, staging / ONNX_FILE)
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished the same export first: use its copy
            if not path.is_file():
                raise
        logger.info("exported ONNX in %.1f s: %s", time.perf_counter() - started, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def _export(tower: Tower, inputs: tuple[torch.Tensor, ...], path: Path) -> None:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 16)
    length = Dim("length", min=2, max=tower.max_length) if tower.length_inputs else None
    shapes = tuple(
        {0: batch, 1: length} if name in tower.length_inputs else {0: batch}
        for name in tower.input_names
    )
    export: Callable[..., Any] = torch.onnx.export
    with torch.inference_mode(False), torch.no_grad():
        program = export(
            tower.module,
            tuple(t.clone() for t in inputs),
            input_names=list(tower.input_names),
            output_names=["features"],
            dynamic_shapes=shapes,
            dynamo=True,
            verbose=False,
        )
    program.save(str(path))
