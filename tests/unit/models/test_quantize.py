"""The int8 helpers: which Linear layers are quantized, the warnings kept local, the footprint."""

from __future__ import annotations

import warnings

import torch

from clipserve.models.loader import dtype_name, module_footprint
from clipserve.models.quantize import (
    INT8,
    QUANTIZED_LINEAR,
    compute_dtype,
    is_int8,
    quantize_linear_layers,
    quantized_footprint,
    quantized_layers,
)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(16, 32)
        self.attention = torch.nn.MultiheadAttention(32, 2)
        self.head = torch.nn.Linear(32, 8, bias=False)
        self.projection = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        h = self.attention(h, h, h, need_weights=False)[0]
        return self.projection(self.head(h))


def test_linear_layers_are_quantized_in_place_but_for_those_kept() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    x = torch.randn(5, 3, 16)
    with torch.inference_mode():
        expected = net(x)
    quantized = quantize_linear_layers(net, keep=["projection"])
    assert quantized is net
    assert isinstance(net.first, QUANTIZED_LINEAR)
    assert isinstance(net.head, QUANTIZED_LINEAR)
    assert type(net.projection) is torch.nn.Linear  # kept
    # torch never swaps MultiheadAttention's out_proj (its forward reads the weight directly)
    assert not isinstance(net.attention.out_proj, QUANTIZED_LINEAR)
    assert quantized_layers(net) == 2
    with torch.inference_mode():
        got = net(x)
    assert got.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(got.flatten(1), expected.flatten(1))
    assert float(cosine.min()) > 0.99


def test_torchs_deprecation_warnings_are_silenced_only_inside() -> None:
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_linear_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        inner_filters = list(warnings.filters)
    assert [str(w.message) for w in caught] == []
    assert len(inner_filters) == len(filters) + 1  # our "always", nothing left behind
    assert warnings.filters == filters
    with warnings.catch_warnings(record=True) as unfiltered:
        warnings.simplefilter("always")
        torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(torch.nn.Linear(4, 4)), {torch.nn.Linear}, dtype=torch.qint8
        )
    assert unfiltered, "torch no longer warns: the filters can go"


def test_the_footprint_counts_the_packed_int8_weights() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.LayerNorm(50))
    count, size = module_footprint(net)
    assert (count, size) == (5050 + 100, (5050 + 100) * 4)
    quantize_linear_layers(net)
    assert quantized_footprint(net) == (5050, 5000 + 50 * 4)  # int8 weights, float32 bias
    assert module_footprint(net) == (5050 + 100, 5000 + 50 * 4 + 100 * 4)


def test_the_int8_marker_dtype() -> None:
    assert is_int8(INT8)
    assert not is_int8(torch.float32)
    assert compute_dtype(INT8) == torch.float32
    assert compute_dtype(torch.bfloat16) == torch.bfloat16
    assert dtype_name(INT8) == "int8"
    assert dtype_name(torch.float16) == "float16"
