"""NumpyImageProcessor against transformers' own image processors, and torch's uint8 resize."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from clipserve.models.hf_preprocessing import (
    NumpyImageProcessor,
    UnsupportedImageProcessorError,
    native_uint8_bilinear,
    resample_like_torch,
    to_rgb,
)


@pytest.fixture(scope="module")
def images(photos: dict[str, Image.Image]) -> dict[str, Image.Image]:
    """The four photos (square and not), one smaller than the 64 px crop, a tall one and two
    that are not RGB."""
    rgba = photos["chelsea"].convert("RGBA")
    rgba.putalpha(96)
    return {
        **photos,
        "small": photos["coffee"].crop((200, 100, 248, 120)),
        "tall": photos["rocket"].crop((100, 0, 300, 427)),
        "rgba": rgba,
        "gray": photos["coffee"].convert("L"),
    }


def _processor(folder: Path, backend: str | None = None, **overrides: Any) -> Any:
    from transformers import AutoImageProcessor, AutoProcessor

    if backend is None:  # what HfClipBackend.load gets: AutoProcessor's default
        processor = AutoProcessor.from_pretrained(str(folder)).image_processor
    else:
        processor = AutoImageProcessor.from_pretrained(str(folder), backend=backend)
    for key, value in overrides.items():
        setattr(processor, key, value)
    return processor


def _reference(processor: Any, image: Image.Image) -> torch.Tensor:
    pixels: torch.Tensor = processor(images=image, return_tensors="pt")["pixel_values"][0]
    return pixels


def test_auto_processor_is_the_torchvision_backend(tiny_dirs: dict[str, Path]) -> None:
    for which in ("hf_clip", "hf_siglip"):
        processor = _processor(tiny_dirs[which])
        assert processor.backend == "torchvision"
        assert NumpyImageProcessor.from_processor(processor).kernel == "torchvision"


@pytest.mark.parametrize("which", ["hf_clip", "hf_siglip"])
@pytest.mark.parametrize("backend", [None, "pil"])
@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_equals_the_transformers_processor(
    which: str,
    backend: str | None,
    resample: int,
    tiny_dirs: dict[str, Path],
    images: dict[str, Image.Image],
) -> None:
    """Bit for bit: CLIP-style (shortest edge, centre crop) and SigLIP-style (fixed size) configs,
    on both backends, bicubic and bilinear (real SigLIP checkpoints use bilinear)."""
    processor = _processor(tiny_dirs[which], backend, resample=resample)
    if backend is None and resample == Image.Resampling.BILINEAR and not native_uint8_bilinear():
        # Without AVX2, torchvision resizes uint8 bilinear through float32: not ported, refused
        # (the backend then falls back to the transformers processor, with a warning).
        with pytest.raises(UnsupportedImageProcessorError, match="resample"):
            NumpyImageProcessor.from_processor(processor)
        return
    ours = NumpyImageProcessor.from_processor(processor)
    for name, image in images.items():
        expected = _reference(processor, image)
        got = ours(image)
        assert got.dtype == torch.float32
        assert got.shape == expected.shape == (3, 64, 64), name
        assert torch.equal(got, expected), f"{name}: {(got - expected).abs().max()}"


@pytest.mark.parametrize(
    "overrides",
    [
        {"do_rescale": False},
        {"do_normalize": False},
        {"do_rescale": False, "do_normalize": False},
        {"do_center_crop": False, "size": {"height": 48, "width": 80}},
        {"size": {"shortest_edge": 72}, "crop_size": {"height": 64, "width": 56}},
    ],
)
@pytest.mark.parametrize("backend", [None, "pil"])
def test_follows_the_configuration(
    overrides: dict[str, Any],
    backend: str | None,
    tiny_dirs: dict[str, Path],
    images: dict[str, Image.Image],
) -> None:
    from transformers.image_utils import SizeDict

    fields = {k: SizeDict(**v) if isinstance(v, dict) else v for k, v in overrides.items()}
    processor = _processor(tiny_dirs["hf_clip"], backend, **fields)
    ours = NumpyImageProcessor.from_processor(processor)
    for name, image in images.items():
        expected = _reference(processor, image)
        assert torch.equal(ours(image).to(expected.dtype), expected), name


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"do_pad": True}, "do_pad"),
        ({"do_resize": False}, "do_resize"),
        ({"size": {"shortest_edge": 64, "longest_edge": 96}}, "size"),
        ({"size": {"max_height": 64, "max_width": 64}}, "size"),
        ({"resample": Image.Resampling.NEAREST}, "resample"),
        ({"resample": Image.Resampling.LANCZOS}, "resample"),
        ({"crop_size": {"height": 80, "width": 80}}, "crop_size"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ],
)
def test_refuses_what_it_cannot_reproduce(
    overrides: dict[str, Any], reason: str, tiny_dirs: dict[str, Path]
) -> None:
    from transformers.image_utils import SizeDict

    fields = {k: SizeDict(**v) if isinstance(v, dict) else v for k, v in overrides.items()}
    processor = _processor(tiny_dirs["hf_clip"], **fields)
    with pytest.raises(UnsupportedImageProcessorError, match=reason):
        NumpyImageProcessor.from_processor(processor)


def test_refuses_processors_that_change_the_pipeline(tiny_dirs: dict[str, Path]) -> None:
    from transformers import CLIPImageProcessor

    class Custom(CLIPImageProcessor):  # type: ignore[misc]
        def resize(self, *args: Any, **kwargs: Any) -> Any:
            return super().resize(*args, **kwargs)

    processor = Custom(**_processor(tiny_dirs["hf_clip"]).to_dict())
    with pytest.raises(UnsupportedImageProcessorError, match="overrides resize"):
        NumpyImageProcessor.from_processor(processor)
    with pytest.raises(UnsupportedImageProcessorError, match="no known backend"):
        NumpyImageProcessor.from_processor(object())


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resample_equals_torchvision_uint8_resize(
    mode: str, photos: dict[str, Image.Image]
) -> None:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2.functional import resize

    if mode == "bilinear" and not native_uint8_bilinear():
        pytest.skip("this CPU's torchvision resizes uint8 bilinear through float32 (not ported)")
    interpolation = InterpolationMode.BICUBIC if mode == "bicubic" else InterpolationMode.BILINEAR
    pixels = np.array(photos["rocket"])  # 427 x 640
    for height, width in [(64, 96), (224, 335), (640, 900), (427, 100), (50, 640), (1, 3)]:
        expected = resize(
            torch.from_numpy(pixels).permute(2, 0, 1),
            [height, width],
            interpolation=interpolation,
            antialias=True,
        )
        got = resample_like_torch(Image.fromarray(pixels), height, width, mode)  # type: ignore[arg-type]
        assert got.shape == (height, width, 3)
        assert np.array_equal(got, expected.permute(1, 2, 0).numpy()), (height, width)


def test_to_rgb_composites_transparency_on_white() -> None:
    clear = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    gray = Image.new("L", (2, 2), 7)
    assert to_rgb(gray).mode == "RGB"
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb
