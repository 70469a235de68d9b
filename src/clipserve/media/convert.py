"""16-bit, 32-bit integer and float frames to 8 bits, one block at a time.

A frame is read in blocks of about ``_BLOCK_PIXELS`` samples: one pass finds its range, a second
writes each block's 8-bit values into a preallocated array, so a frame is never copied whole into
an 8-byte type (a 4000 x 4000 ``I`` frame peaks at ~20 MB, not ~550 MB). The mapping is the one
:func:`clipserve.media.decode.to_rgb` documents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image


def image_to_uint8(image: Image.Image) -> npt.NDArray[np.uint8]:
    """:func:`_to_uint8` of a single-band I/I;16*/F image, read one block at a time (a crop), so
    the whole frame is never copied out of Pillow (``np.asarray(image)`` costs two frame copies)."""
    width, height = image.size

    def region(top: int, bottom: int, left: int, right: int) -> npt.NDArray[Any]:
        return np.asarray(image.crop((left, top, right, bottom)))

    return _blocks_to_uint8(region, height, width)


def _to_uint8(pixels: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """Map 16-bit, 32-bit integer or float samples (any shape) to uint8; see :func:`to_rgb`."""
    if pixels.size == 0:
        return np.zeros(pixels.shape, dtype=np.uint8)
    grid = pixels.reshape(pixels.shape[0] if pixels.ndim > 1 else 1, -1)

    def region(top: int, bottom: int, left: int, right: int) -> npt.NDArray[Any]:
        return grid[top:bottom, left:right]

    return _blocks_to_uint8(region, grid.shape[0], grid.shape[1]).reshape(pixels.shape)


def _blocks_to_uint8(
    region: Callable[[int, int, int, int], npt.NDArray[Any]], height: int, width: int
) -> npt.NDArray[np.uint8]:
    """Convert a ``height`` x ``width`` frame that ``region(top, bottom, left, right)`` hands out
    block by block: one pass for the range, one to write the uint8 output.

    Peak extra memory is a few copies of one block (at most ``_BLOCK_PIXELS`` samples, in
    float64 or int64: the same arithmetic as a whole-frame float64 conversion, so the results are
    identical), never a copy of the frame in an 8-byte type.
    """
    out = np.zeros((height, width), dtype=np.uint8)
    if height == 0 or width == 0:
        return out
    boxes = _block_boxes(height, width)
    dtype = region(0, 1, 0, 1).dtype
    if dtype.kind in "ui":
        low, high = (0, 0) if dtype.itemsize == 2 else _block_range(region, boxes, _as_int64)
        if dtype.itemsize == 2 or (low >= 0 and high <= 0xFFFF):
            # 16-bit data: 0..65535 → 0..255, rounded (65535 / 257 == 255).
            for box in boxes:
                values = np.clip(_as_int64(region(*box)), 0, 0xFFFF)
                values += 128
                values //= 257
                _write(out, box, values)
            return out
        _stretch(out, region, boxes, _as_float64, float(low), float(high))
        return out
    # Float data; NaN and ±inf count as 0, in the range too.
    flow, fhigh = _block_range(region, boxes, _finite_float64)
    if flow >= 0.0 and fhigh <= 1.0:
        _scale(out, region, boxes, _finite_float64, 0.0, 255.0)
    elif flow >= 0.0 and fhigh <= 255.0:
        _scale(out, region, boxes, _finite_float64, 0.0, 1.0)
    else:
        _stretch(out, region, boxes, _finite_float64, flow, fhigh)
    return out


_Block = tuple[int, int, int, int]  # top, bottom, left, right
_Widen = Callable[[npt.NDArray[Any]], npt.NDArray[Any]]

# Samples per block when converting 16-bit, 32-bit and float frames (2 MiB in float64).
_BLOCK_PIXELS: Final = 1 << 18


def _block_boxes(height: int, width: int) -> list[_Block]:
    """Row bands of about ``_BLOCK_PIXELS`` samples; a row wider than that is cut into pieces."""
    cols = min(width, _BLOCK_PIXELS)
    rows = max(1, _BLOCK_PIXELS // cols)
    return [
        (top, min(top + rows, height), left, min(left + cols, width))
        for top in range(0, height, rows)
        for left in range(0, width, cols)
    ]


def _as_int64(block: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
    return block.astype(np.int64)


def _as_float64(block: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return block.astype(np.float64)


def _finite_float64(block: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    values = block.astype(np.float64)
    return np.nan_to_num(values, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _block_range(
    region: Callable[[int, int, int, int], npt.NDArray[Any]], boxes: list[_Block], widen: _Widen
) -> tuple[Any, Any]:
    """(min, max) over all blocks, as Python numbers."""
    lows, highs = [], []
    for box in boxes:
        values = widen(region(*box))
        lows.append(values.min().item())
        highs.append(values.max().item())
    return min(lows), max(highs)


def _stretch(
    out: npt.NDArray[np.uint8],
    region: Callable[[int, int, int, int], npt.NDArray[Any]],
    boxes: list[_Block],
    widen: _Widen,
    low: float,
    high: float,
) -> None:
    """Min-max normalise to 0..255 (all zeros when the frame is constant)."""
    if high > low:
        _scale(out, region, boxes, widen, low, 255.0 / (high - low))


def _scale(
    out: npt.NDArray[np.uint8],
    region: Callable[[int, int, int, int], npt.NDArray[Any]],
    boxes: list[_Block],
    widen: _Widen,
    offset: float,
    factor: float,
) -> None:
    """``out = rint((values - offset) * factor)``, block by block, in float64."""
    for box in boxes:
        values = widen(region(*box))
        values -= offset
        values *= factor
        np.rint(values, out=values)
        _write(out, box, values)


def _write(out: npt.NDArray[np.uint8], box: _Block, values: npt.NDArray[Any]) -> None:
    top, bottom, left, right = box
    np.copyto(out[top:bottom, left:right], values, casting="unsafe")
