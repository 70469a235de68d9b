"""``precision: int8``: dynamic quantization of a model's ``torch.nn.Linear`` layers (CPU only).

The backends load such a model in float32 and then call :func:`quantize_linear_layers`: each
``Linear`` becomes ``torch.ao.nn.quantized.dynamic.Linear`` (int8 weights with one scale per output
channel; activations quantized on the fly per batch, accumulation in int32, output float32).
Per-channel rather than ``quantize_dynamic``'s default per-tensor weight scales: the same speed,
and on a trained text model (all-MiniLM-L6-v2) the cosine to the float32 embeddings goes from
about 0.95 to about 0.98. Everything else (embeddings, convolutions, layer norms,
``nn.MultiheadAttention``'s fused input projection and its ``out_proj``, which torch does not
swap) stays float32, so inputs stay float32 too. Activations get one scale per batch, so an
input's embedding depends slightly on the batch it shares (cosine >= 0.999 on ViT-B-32).

Throughout the loader and the backends, the weight ``torch.dtype`` :data:`INT8` (``torch.qint8``)
stands for this mode: :func:`compute_dtype` is the dtype of inputs and of the layers left as they
are, and :func:`~clipserve.models.loader.dtype_name` calls it ``'int8'``.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from typing import Any, TypeVar

import torch

INT8 = torch.qint8
"""The weight dtype that means "float32 weights, Linear layers dynamically quantized to int8"."""
QUANTIZED_LINEAR = torch.ao.nn.quantized.dynamic.Linear
"""What a quantized ``torch.nn.Linear`` becomes."""
QUANTIZATION = "int8-dynamic"
"""``BackendInfo.extra['quantization']`` of a quantized model."""

M = TypeVar("M", bound=torch.nn.Module)

# torch 2.14 deprecates eager-mode quantization (torchao replaces it) and warns on every call.
_DEPRECATIONS = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel"),
)


def is_int8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is :data:`INT8` (the quantized mode), not a real weight dtype."""
    return dtype == INT8


def quantization_info(dtype: torch.dtype) -> dict[str, str]:
    """The ``BackendInfo.extra`` entry of a backend loaded in ``dtype``: ``quantization`` for
    :data:`INT8`, nothing otherwise."""
    return {"quantization": QUANTIZATION} if is_int8(dtype) else {}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the model's inputs (and unquantized layers) have: float32 for :data:`INT8`,
    else ``dtype`` itself."""
    return torch.float32 if is_int8(dtype) else dtype


def quantize_linear_layers(model: M, *, keep: Collection[str] = ()) -> M:
    """Replace ``model``'s ``torch.nn.Linear`` layers (exactly that type: subclasses such as
    ``NonDynamicallyQuantizableLinear`` are left alone) by dynamically quantized int8 ones, in
    place; the model must be float32 and on the CPU. ``keep``: qualified names of Linear layers
    to leave float32 (code that checks ``isinstance(layer, nn.Linear)`` before calling it). Returns
    ``model``. torch's deprecation warnings for the API are silenced here only."""
    spec: dict[type[torch.nn.Module] | str, object] = {
        torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig
    }
    spec.update(dict.fromkeys(keep))
    quantize_dynamic: Any = torch.ao.quantization.quantize_dynamic  # untyped in torch
    with warnings.catch_warnings():
        for category, message in _DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=category)
        quantized: M = quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return quantized


def quantized_footprint(module: torch.nn.Module) -> tuple[int, int]:
    """``(weights, bytes)`` of the quantized Linear layers in ``module``: their packed int8 weights
    and float32 biases, which ``module.parameters()`` and ``module.buffers()`` do not list."""
    count = size = 0
    for layer in module.modules():
        if isinstance(layer, QUANTIZED_LINEAR):
            packed: Any = layer  # its accessors are untyped in torch
            weight, bias = packed._weight_bias()
            count += weight.numel()
            size += weight.numel() * weight.element_size()
            if bias is not None:
                count += bias.numel()
                size += bias.numel() * bias.element_size()
    return count, size


def quantized_layers(module: torch.nn.Module) -> int:
    """How many quantized Linear layers ``module`` holds."""
    return sum(isinstance(layer, QUANTIZED_LINEAR) for layer in module.modules())
