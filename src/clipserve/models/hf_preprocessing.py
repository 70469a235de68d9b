"""transformers' CLIP/SigLIP image preprocessing redone with PIL and numpy (no torch operator).

:class:`NumpyImageProcessor` reads a loaded transformers image processor's configuration
(``do_resize``, ``size``, ``resample``, ``do_center_crop``, ``crop_size``, ``do_rescale``,
``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``; images are always made RGB
as ``do_convert_rgb`` does) and reproduces what that processor computes, bit for bit, without
running a torch operator: the engine's CPU preprocessing
threads then start no OpenMP thread teams that fight the encoder thread for the cores (the
open_clip backend does the same with ``_PilThenNumpy``).

transformers 5's ``AutoProcessor`` picks the torchvision ("fast") backend, which resizes the
uint8 image with torch's antialiased uint8 kernel. PIL's resize differs from it by up to two
levels per pixel (fixed-point rounding), enough to move the scores of the tiny test models by
~3e-3 on the 0–100 scale, so :func:`resample_like_torch` ports that kernel exactly (int16
weights, integer accumulation, width pass then height pass). A PIL-backend processor
(``backend="pil"``) is reproduced with PIL's own resize. Configurations outside what is ported
raise :class:`UnsupportedImageProcessorError`; the backend then keeps the transformers processor.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

logger = logging.getLogger(__name__)

Kernel = Literal["torchvision", "pil"]
_Filter = Literal["bilinear", "bicubic"]
_U8 = npt.NDArray[np.uint8]
_F32 = npt.NDArray[np.float32]
_BILINEAR, _BICUBIC = int(Image.Resampling.BILINEAR), int(Image.Resampling.BICUBIC)
_PIL_FILTERS = frozenset(int(mode) for mode in Image.Resampling)
_GATHER_BYTES = 1 << 22
_PIPELINE = (
    "__call__",
    "preprocess",
    "_preprocess",
    "_preprocess_image_like_inputs",
    "_prepare_image_like_inputs",
    "_further_process_kwargs",
    "process_image",
    "convert_to_rgb",
    "resize",
    "center_crop",
    "rescale",
    "normalize",
    "rescale_and_normalize",
)
"""Methods a processor class must inherit unchanged from its backend to be reproducible."""


class UnsupportedImageProcessorError(ValueError):
    """The processor's configuration is not one :class:`NumpyImageProcessor` reproduces."""


@dataclass(frozen=True, slots=True)
class NumpyImageProcessor:
    """One image -> ``(3, H, W)`` float32 pixels, as the processor it was read from computes them.

    Build it with :meth:`from_processor`. Exactly one of ``shortest_edge`` (resize the shorter
    side to it, keep the aspect ratio) and ``resize_to`` (``(height, width)``) is set.
    ``rescale``/``mean``/``std`` are applied in the processor's own float arithmetic: the
    torchvision backend folds the rescale factor into mean and std (``(x - m') / s'``), the PIL
    backend rescales in float64 first. Images are always made RGB first, transparency composited
    onto white as ``do_convert_rgb`` does (the model takes three channels; RGB input, which is
    what the media layer delivers, is untouched either way).
    """

    kernel: Kernel
    resample: int
    shortest_edge: int | None
    resize_to: tuple[int, int] | None
    crop: tuple[int, int] | None
    rescale: float | None
    mean: _F32 | None
    std: _F32 | None

    @classmethod
    def from_processor(cls, processor: Any) -> NumpyImageProcessor:
        """Read a transformers 5 image processor; :class:`UnsupportedImageProcessorError` says why
        it cannot be reproduced (padding, other size rules, a resample filter not ported...)."""
        kernel = _kernel_of(processor)
        if getattr(processor, "do_pad", None):
            raise UnsupportedImageProcessorError("do_pad is set")
        if not getattr(processor, "do_resize", None):
            raise UnsupportedImageProcessorError("do_resize is off (the image size would vary)")
        shortest_edge, resize_to = _size_rule(getattr(processor, "size", None))
        resample = _resample_code(getattr(processor, "resample", None), kernel)
        crop = None
        if getattr(processor, "do_center_crop", None):
            crop = _height_width(getattr(processor, "crop_size", None), "crop_size")
            least = resize_to or (shortest_edge or 0, shortest_edge or 0)
            if crop[0] > least[0] or crop[1] > least[1]:
                raise UnsupportedImageProcessorError(
                    "crop_size exceeds the resized image (it would pad)"
                )
        factor = None
        if getattr(processor, "do_rescale", None):
            factor = getattr(processor, "rescale_factor", None)
            if not isinstance(factor, int | float):
                raise UnsupportedImageProcessorError(f"rescale_factor {factor!r}")
            factor = float(factor)
        mean = std = None
        if getattr(processor, "do_normalize", None):
            mean = _channels(getattr(processor, "image_mean", None), "image_mean")
            std = _channels(getattr(processor, "image_std", None), "image_std")
            if kernel == "torchvision" and factor is not None:
                # TorchvisionBackend._fuse_mean_std_and_rescale_factor, in float32 as torch does
                inverse = np.float32(1.0 / factor)
                mean, std, factor = mean * inverse, std * inverse, None
        return cls(kernel, resample, shortest_edge, resize_to, crop, factor, mean, std)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """``(height, width)`` after the resize step (transformers' shortest-edge rule)."""
        if self.resize_to is not None:
            return self.resize_to
        edge = int(self.shortest_edge or 0)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(edge * long / short)
        return (new_long, edge) if width <= height else (edge, new_long)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = to_rgb(image)
        height, width = self.output_size(rgb.width, rgb.height)
        if self.kernel == "pil":
            pixels: _U8 = np.asarray(rgb.resize((width, height), self.resample), dtype=np.uint8)
        else:
            mode: _Filter = "bicubic" if self.resample == _BICUBIC else "bilinear"
            pixels = resample_like_torch(rgb, height, width, mode)
        if self.crop is not None:
            crop_h, crop_w = self.crop
            top, left = (pixels.shape[0] - crop_h) // 2, (pixels.shape[1] - crop_w) // 2
            pixels = pixels[top : top + crop_h, left : left + crop_w]
        chw = pixels.transpose(2, 0, 1)
        if self.rescale is not None and self.kernel == "pil":
            # transformers.image_transforms.rescale: in float64, then down to float32
            values: _F32 = (np.ascontiguousarray(chw, np.float64) * self.rescale).astype(np.float32)
        else:
            values = np.ascontiguousarray(chw, dtype=np.float32)
            if self.rescale is not None:
                values *= np.float32(self.rescale)
        if self.mean is not None and self.std is not None:
            values -= self.mean[:, None, None]
            values /= self.std[:, None, None]
        return torch.from_numpy(values)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' ``convert_to_rgb`` makes it: transparency composited onto white."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# --- reading the processor ------------------------------------------------------------------------


def _kernel_of(processor: Any) -> Kernel:
    try:
        from transformers.image_processing_backends import PilBackend, TorchvisionBackend
    except ImportError as exc:  # transformers < 5 has other processor classes
        raise UnsupportedImageProcessorError("not a transformers 5 image processor") from exc
    base: type
    if isinstance(processor, TorchvisionBackend):
        kernel: Kernel = "torchvision"
        base = TorchvisionBackend
    elif isinstance(processor, PilBackend):
        kernel, base = "pil", PilBackend
    else:
        raise UnsupportedImageProcessorError(f"{type(processor).__name__} has no known backend")
    cls = type(processor)
    changed = [
        name for name in _PIPELINE if getattr(cls, name, None) is not getattr(base, name, None)
    ]
    if changed:
        raise UnsupportedImageProcessorError(
            f"{type(processor).__name__} overrides {', '.join(changed)} of {base.__name__}"
        )
    return kernel


def _field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return None if value is None else int(value)


def _size_rule(size: Any) -> tuple[int | None, tuple[int, int] | None]:
    """transformers' resize order: shortest_edge (+longest_edge), max_height/width, height/width."""
    if size is None:
        raise UnsupportedImageProcessorError("size is not set")
    shortest = _field(size, "shortest_edge")
    if shortest and not _field(size, "longest_edge"):
        return shortest, None
    if shortest or (_field(size, "max_height") and _field(size, "max_width")):
        raise UnsupportedImageProcessorError(
            f"size {dict(size)} (only shortest_edge or height/width)"
        )
    return None, _height_width(size, "size")


def _height_width(size: Any, name: str) -> tuple[int, int]:
    height, width = (
        (None, None) if size is None else (_field(size, "height"), _field(size, "width"))
    )
    if not height or not width:
        raise UnsupportedImageProcessorError(f"{name} has no height and width")
    return height, width


def _resample_code(resample: Any, kernel: Kernel) -> int:
    if resample is None:
        return _BILINEAR  # both backends' default
    try:
        code = int(resample)
    except (TypeError, ValueError) as exc:  # e.g. a torchvision InterpolationMode
        raise UnsupportedImageProcessorError(f"resample {resample!r}") from exc
    if kernel == "pil":
        if code not in _PIL_FILTERS:
            raise UnsupportedImageProcessorError(f"resample {code} is no PIL filter")
        return code
    if code == _BICUBIC or (code == _BILINEAR and native_uint8_bilinear()):
        return code
    raise UnsupportedImageProcessorError(f"resample {code} (ported: bilinear, bicubic)")


def native_uint8_bilinear() -> bool:
    """Whether torchvision resizes uint8 bilinear natively here (else it goes through float32)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def _channels(values: float | Sequence[float] | None, name: str) -> _F32:
    if values is None:
        raise UnsupportedImageProcessorError(f"{name} is not set")
    array = np.asarray(values, dtype=np.float32).reshape(-1)
    if array.size == 1:
        array = np.repeat(array, 3)
    if array.size != 3:
        raise UnsupportedImageProcessorError(f"{name} has {array.size} values, not 3")
    return array


# --- torch's uint8 antialiased resize, in numpy ---------------------------------------------------


def _cubic(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Keys' cubic, a = -0.5, in the evaluation order of torch's ``HelperInterpCubic``."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _triangle(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


_FILTERS: dict[_Filter, tuple[Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]], int]]
_FILTERS = {"bicubic": (_cubic, 4), "bilinear": (_triangle, 2)}


@functools.lru_cache(maxsize=64)  # a few sizes recur; bounded, as client images pick the key
def _taps(
    in_size: int, out_size: int, mode: _Filter
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int32], int]:
    """Per output index: source indices ``(out, k)``, int16-valued weights ``(out, k)`` and their
    precision in bits (``_compute_index_ranges_int16_weights`` in torch's UpSampleKernel.cpp:
    PIL's support and centring, weights in float64, normalised, then scaled to int16)."""
    filter_fn, interp_size = _FILTERS[mode]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    width = math.ceil(support) * 2 + 1
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C casts truncate
    count = np.clip(
        np.minimum((center + support + 0.5).astype(np.int64), in_size) - first, 0, width
    )
    tap = np.arange(width)
    valid = tap[None, :] < count[:, None]
    raw = filter_fn(((tap[None, :] + first[:, None]) - center[:, None] + 0.5) * inverse)
    weights = np.where(valid, raw, 0.0)
    total = np.zeros(out_size)
    for column in weights.T:  # sequential, as torch sums
        total = total + column
    normal = total != 0.0
    weights = np.where(normal[:, None], weights / np.where(normal, total, 1.0)[:, None], weights)
    largest = float(np.max(np.where(normal[:, None] & valid, weights, 0.0), initial=0.0))
    precision = 0
    while precision < 22 and int(0.5 + largest * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * float(1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    index = np.minimum(first[:, None] + tap[None, :], in_size - 1).astype(np.intp)
    index.setflags(write=False)
    fixed.setflags(write=False)
    return index, fixed, precision


def _resample_rows(pixels: _U8, out_size: int, mode: _Filter) -> _U8:
    """Resample axis 0 of a ``(N, M, C)`` uint8 array: integer dot products plus half an LSB,
    shifted down and clamped to uint8, as torch's uint8 kernel computes them (int32 sums).

    The taps are gathered for a few output rows at a time (about 4 MB) and reduced with einsum,
    which never calls BLAS and so starts no thread pool."""
    index, weights, precision = _taps(pixels.shape[0], out_size, mode)
    flat = pixels.reshape(pixels.shape[0], -1)
    acc = np.empty((out_size, flat.shape[1]), dtype=np.int32)
    step = max(1, _GATHER_BYTES // (index.shape[1] * flat.shape[1]))
    for start in range(0, out_size, step):
        rows = slice(start, start + step)
        np.einsum("ok,okm->om", weights[rows], flat[index[rows]], dtype=np.int32, out=acc[rows])
    acc += 1 << (precision - 1)
    np.right_shift(acc, precision, out=acc)
    return np.clip(acc, 0, 255).astype(np.uint8).reshape(out_size, *pixels.shape[1:])


def resample_like_torch(image: Image.Image, height: int, width: int, mode: _Filter) -> _U8:
    """An RGB image -> ``(height, width, 3)`` uint8, equal to torchvision's
    ``resize(antialias=True)`` of the same uint8 image on the CPU: the width pass first (rounded
    to uint8), then the height pass; an axis whose size does not change is not resampled. (PIL
    transposes the image for the width pass: much cheaper than a strided numpy copy.)"""
    if width != image.width:
        columns = np.asarray(image.transpose(Image.Transpose.TRANSPOSE), dtype=np.uint8)
        resized = _resample_rows(columns, width, mode)
        image = Image.fromarray(resized).transpose(Image.Transpose.TRANSPOSE)
    pixels: _U8 = np.asarray(image, dtype=np.uint8)
    if height != pixels.shape[0]:
        pixels = _resample_rows(pixels, height, mode)
    return pixels


def image_pipeline(
    image_processor: Any, name: str
) -> tuple[Callable[[Image.Image], torch.Tensor], str]:
    """The PIL + numpy copy of ``image_processor`` and ``'numpy'``, or, when its configuration is
    not one the copy reproduces, the processor itself and ``'transformers'``."""
    try:
        return NumpyImageProcessor.from_processor(image_processor), "numpy"
    except UnsupportedImageProcessorError as exc:
        logger.warning(
            "hf model %s: preprocessing images with transformers' %s (its configuration is not "
            "reproduced in numpy: %s); its torch ops compete with the encoder for the cores",
            name,
            type(image_processor).__name__,
            exc,
        )

    def transformers_pipeline(image: Image.Image) -> torch.Tensor:
        pixels: torch.Tensor = image_processor(images=to_rgb(image), return_tensors="pt")[
            "pixel_values"
        ]
        return pixels[0].float()

    return transformers_pipeline, "transformers"
