"""decode_image / prepare_image: limits before decoding, every mode to RGB, corrupt data refused."""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, features

import clipserve.media.convert as convert_module
import clipserve.media.frames as frames_module
from clipserve.config import MediaSettings
from clipserve.errors import InvalidImageError, MediaTooLargeError
from clipserve.media import decode_image, prepare_image, to_rgb

SETTINGS = MediaSettings()


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))


def ihdr(width: int, height: int) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height``; its pixel data is garbage."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + ihdr(width, height)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def pixels(image: Image.Image) -> np.ndarray[Any, Any]:
    assert image.mode == "RGB"
    return np.asarray(image)


# --- real photos ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_real_photos_decode_to_rgb(photos: dict[str, Image.Image], name: str, fmt: str) -> None:
    original = photos[name]
    image = decode_image(encode(original, fmt), SETTINGS)

    assert type(image) is Image.Image  # detached from the source file
    assert image.size == original.size
    diff = np.abs(pixels(image).astype(int) - np.asarray(original).astype(int))
    if fmt == "PNG":
        assert diff.max() == 0
    else:
        assert diff.mean() < 8


def test_decoded_image_outlives_its_source_buffer(photo_bytes: Callable[..., bytes]) -> None:
    image = decode_image(photo_bytes("astronaut", "PNG"), SETTINGS)
    assert len(image.tobytes()) == 512 * 512 * 3
    assert image.copy().getpixel((0, 0)) == image.getpixel((0, 0))


# --- mode conversion ------------------------------------------------------------------------------


def test_rgba_transparent_regions_become_white() -> None:
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    out = pixels(decode_image(encode(rgba, "PNG"), SETTINGS))

    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 255)
    assert tuple(out[0, 2]) == pytest.approx((127, 127, 127), abs=1)


def test_la_transparent_becomes_white() -> None:
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (40, 255))
    out = pixels(decode_image(encode(la, "PNG"), SETTINGS))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (40, 40, 40)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_becomes_white(fmt: str) -> None:
    palette_image = Image.new("P", (2, 1), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    palette_image.putpixel((1, 0), 1)
    out = pixels(decode_image(encode(palette_image, fmt, transparency=0), SETTINGS))
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (255, 0, 0)


def test_palette_without_transparency_uses_the_palette() -> None:
    palette_image = Image.new("P", (1, 1), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    assert tuple(pixels(decode_image(encode(palette_image, "PNG"), SETTINGS))[0, 0]) == (
        10,
        200,
        30,
    )


def test_grayscale_l() -> None:
    out = pixels(decode_image(encode(Image.new("L", (3, 3), 100), "PNG"), SETTINGS))
    assert (out == 100).all()


def test_bilevel_1() -> None:
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    out = pixels(decode_image(encode(bilevel, "PNG"), SETTINGS))
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == (255, 255, 255)


@pytest.mark.parametrize(("fmt", "tolerance"), [("TIFF", 0), ("JPEG", 8)])
def test_cmyk(fmt: str, tolerance: int) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red
    out = pixels(decode_image(encode(cmyk, fmt), SETTINGS))
    assert np.abs(out.astype(int) - (255, 0, 0)).max() <= tolerance


GRADIENT_16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)
EXPECTED_8 = ((GRADIENT_16.astype(np.int64) + 128) // 257).astype(np.uint8)


def test_16_bit_png_keeps_its_gradient() -> None:
    data = encode(Image.fromarray(GRADIENT_16), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    out = pixels(decode_image(data, SETTINGS))
    gray = out[..., 0]
    assert (out == gray[..., None]).all()
    assert (gray == EXPECTED_8).all()
    assert gray.min() == 0
    assert gray.max() == 255
    assert (gray == 255).mean() < 0.01  # not clipped to white
    assert gray[128, 0] == 128


def test_16_bit_big_endian_tiff() -> None:
    big_endian = Image.frombytes("I;16B", (256, 256), GRADIENT_16.astype(">u2").tobytes())
    data = encode(big_endian, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    assert (pixels(decode_image(data, SETTINGS))[..., 0] == EXPECTED_8).all()


def test_32_bit_int_within_16_bit_range_is_scaled() -> None:
    data = encode(Image.fromarray(GRADIENT_16.astype(np.int32)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert (pixels(decode_image(data, SETTINGS))[..., 0] == EXPECTED_8).all()


def test_32_bit_int_with_negative_values_is_stretched() -> None:
    values = np.array([[-1000, 0, 1000]], dtype=np.int32)
    out = pixels(decode_image(encode(Image.fromarray(values), "TIFF"), SETTINGS))
    assert list(out[0, :, 0]) == [0, 128, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.5, 1.0], [0, 128, 255]),  # normalised floats
        ([0.0, 100.0, 255.0], [0, 100, 255]),  # 8-bit range
        ([-1.0, 0.0, 1.0], [0, 128, 255]),  # anything else: min-max
    ],
)
def test_float_images(values: list[float], expected: list[int]) -> None:
    image = Image.fromarray(np.array([values], dtype=np.float32))
    assert image.mode == "F"
    out = pixels(decode_image(encode(image, "TIFF"), SETTINGS))
    assert list(out[0, :, 0]) == expected


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (40, 20), (255, 0, 0))
    source.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image = decode_image(encode(source, "JPEG", exif=exif.tobytes(), quality=95), SETTINGS)

    assert image.size == (20, 40)
    out = pixels(image).astype(int)
    assert np.abs(out[5, 10] - (255, 0, 0)).max() < 30  # left half is now on top
    assert np.abs(out[35, 10] - (0, 0, 255)).max() < 30


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_images_use_the_first_frame(fmt: str) -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 8), color) for color in colors]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50)
    assert getattr(Image.open(io.BytesIO(buffer.getvalue())), "n_frames", 1) == 3

    out = pixels(decode_image(buffer.getvalue(), SETTINGS)).astype(int)
    assert np.abs(out - (255, 0, 0)).max() <= 4


# --- limits ---------------------------------------------------------------------------------------


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # 8000x8000 is below Pillow's own warning threshold; the pixel data is garbage, so reaching the
    # decoder would give InvalidImageError instead.
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(png_header_only(8000, 8000), SETTINGS)
    assert str(caught.value) == (
        "image is too large: 8000x8000 = 64000000 pixels exceeds the limit of 50000000 pixels"
    )


def test_pillow_decompression_bomb_error_becomes_media_too_large() -> None:
    huge_limit = MediaSettings(max_image_pixels=10**12)
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(png_header_only(100_000, 100_000), huge_limit)
    assert str(caught.value).startswith(
        "image is too large: the decoder refused it as a possible decompression bomb ("
    )


def test_pillow_warning_does_not_escape_and_our_limit_decides() -> None:
    max_before = Image.MAX_IMAGE_PIXELS
    header = png_header_only(10_000, 10_000)  # above Pillow's warning threshold (~89 Mpx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MediaTooLargeError, match=r"10000x10000 = 100000000 pixels"):
            decode_image(header, SETTINGS)
        # With a limit that allows it, the header passes and the garbage data fails to decode.
        with pytest.raises(InvalidImageError, match=r"^image could not be decoded: "):
            decode_image(header, MediaSettings(max_image_pixels=150_000_000))
    assert max_before == Image.MAX_IMAGE_PIXELS


def test_real_photo_over_a_low_pixel_limit(photo_bytes: Callable[..., bytes]) -> None:
    limits = MediaSettings(max_image_pixels=512 * 512 - 1)
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(photo_bytes("astronaut"), limits)
    assert str(caught.value) == (
        "image is too large: 512x512 = 262144 pixels exceeds the limit of 262143 pixels"
    )
    assert decode_image(photo_bytes("astronaut"), MediaSettings(max_image_pixels=512 * 512))


def test_byte_limit(photo_bytes: Callable[..., bytes]) -> None:
    data = photo_bytes("chelsea", "PNG")
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(data, MediaSettings(max_image_bytes=len(data) - 1))
    assert str(caught.value) == (
        f"image is too large: {len(data)} bytes exceeds the limit of {len(data) - 1} bytes"
    )
    assert decode_image(data, MediaSettings(max_image_bytes=len(data))).size == (451, 300)


# --- bad data -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_fails_at_decode_time(photo_bytes: Callable[..., bytes], fmt: str) -> None:
    data = photo_bytes("coffee", fmt)
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data[: len(data) // 2], SETTINGS)
    assert str(caught.value).startswith("image could not be decoded: image file is truncated")


UNSUPPORTED = (
    "image could not be decoded: unrecognised or unsupported image format "
    "(supported: JPEG, PNG, GIF, WEBP, AVIF, BMP, TIFF, PPM, ICO, QOI)"
)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(0).bytes(4096), id="random"),
        pytest.param(b"just some text\nin a file\n" * 20, id="text"),
        pytest.param(b"<svg xmlns='http://www.w3.org/2000/svg'/>", id="svg"),
        pytest.param(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", id="eps"),
        pytest.param(b"\x89PNG\r\n\x1a\n", id="png-signature-only"),
    ],
)
def test_non_images_are_refused(data: bytes) -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(data, SETTINGS)
    assert str(caught.value) == UNSUPPORTED


def test_empty_bytes() -> None:
    with pytest.raises(InvalidImageError) as caught:
        decode_image(b"", SETTINGS)
    assert str(caught.value) == "image could not be decoded: the data is empty"


# --- prepare_image (PIL inputs) -------------------------------------------------------------------


def test_prepare_image_converts_without_touching_the_input() -> None:
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 0))
    out = prepare_image(rgba, SETTINGS)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert rgba.mode == "RGBA"

    rgb = Image.new("RGB", (2, 2), (1, 2, 3))
    copy = prepare_image(rgb, SETTINGS)
    assert copy is not rgb
    assert copy.tobytes() == rgb.tobytes()


def test_prepare_image_pixel_limit_and_orientation() -> None:
    with pytest.raises(MediaTooLargeError, match=r"^image is too large: 100x100 = 10000 pixels"):
        prepare_image(Image.new("RGB", (100, 100)), MediaSettings(max_image_pixels=9999))

    exif = Image.Exif()
    exif[0x0112] = 8
    opened = Image.open(io.BytesIO(encode(Image.new("L", (30, 10)), "JPEG", exif=exif.tobytes())))
    out = prepare_image(opened, SETTINGS)
    assert (out.size, out.mode) == ((10, 30), "RGB")


def test_prepare_image_of_a_truncated_lazy_image(photo_bytes: Callable[..., bytes]) -> None:
    data = photo_bytes("astronaut")
    lazy = Image.open(io.BytesIO(data[: len(data) // 3]))
    with pytest.raises(InvalidImageError, match=r"^image could not be decoded: "):
        prepare_image(lazy, SETTINGS)


# --- 16-bit, 32-bit and float frames, block by block --------------------------------------------


def reference_to_uint8(pixels: npt.NDArray[Any]) -> npt.NDArray[np.uint8]:
    """The whole-frame algorithm this module used before (int64/float64 copies of the frame)."""

    def stretch(values: npt.NDArray[np.float64], low: float, high: float) -> npt.NDArray[np.uint8]:
        if high <= low:
            return np.zeros(values.shape, dtype=np.uint8)
        return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)

    if pixels.dtype.kind in "ui":
        ints = pixels.astype(np.int64)
        low, high = (int(ints.min()), int(ints.max())) if ints.size else (0, 0)
        if pixels.dtype.itemsize == 2 or (low >= 0 and high <= 0xFFFF):
            return ((np.clip(ints, 0, 0xFFFF) + 128) // 257).astype(np.uint8)
        return stretch(ints.astype(np.float64), float(low), float(high))
    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    flow, fhigh = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if flow >= 0.0 and fhigh <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if flow >= 0.0 and fhigh <= 255.0:
        return np.rint(values).astype(np.uint8)
    return stretch(values, flow, fhigh)


def with_non_finite(values: npt.NDArray[Any], rng: np.random.Generator) -> npt.NDArray[Any]:
    values = values.copy()
    flat = values.reshape(-1)
    for special in (np.nan, np.inf, -np.inf):
        flat[rng.integers(0, flat.size, 40)] = special
    return values


RNG = np.random.default_rng(1234)
SHAPE = (37, 53)
RANDOM_FRAMES = {
    "uint16": RNG.integers(0, 0x10000, SHAPE).astype(np.uint16),
    "uint16-big-endian": RNG.integers(0, 0x10000, SHAPE).astype(">u2"),
    "int16-negative": RNG.integers(-0x8000, 0x8000, SHAPE).astype(np.int16),
    "int32-16-bit-range": RNG.integers(0, 0x10000, SHAPE).astype(np.int32),
    "int32-small-range": RNG.integers(3, 300, SHAPE).astype(np.int32),
    "int32-full-range": RNG.integers(-(2**31), 2**31, SHAPE).astype(np.int32),
    "int32-negative": RNG.integers(-1000, 1000, SHAPE).astype(np.int32),
    "int32-above-16-bit": RNG.integers(70_000, 80_000, SHAPE).astype(np.int32),
    "uint32-wide": RNG.integers(0, 2**32, SHAPE).astype(np.uint32),
    "float32-unit": RNG.random(SHAPE).astype(np.float32),
    "float32-8-bit": (RNG.random(SHAPE) * 255).astype(np.float32),
    "float32-wide": (RNG.standard_normal(SHAPE) * 1e4).astype(np.float32),
    "float32-huge": np.clip(RNG.standard_normal(SHAPE) * 1e38, -3e38, 3e38).astype(np.float32),
    "float32-big-endian": (RNG.standard_normal(SHAPE) * 50).astype(">f4"),
    "float32-unit-non-finite": with_non_finite(RNG.random(SHAPE).astype(np.float32), RNG),
    "float32-wide-non-finite": with_non_finite(
        (RNG.standard_normal(SHAPE) * 9).astype(np.float32), RNG
    ),
    "float64": RNG.standard_normal(SHAPE) * 7,
}


@pytest.fixture(params=[None, 7, 53, 100], ids=["default-blocks", "7", "53", "100"])
def block_pixels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks: many bands, rows cut into pieces, range spread over blocks."""
    if request.param is not None:
        monkeypatch.setattr(convert_module, "_BLOCK_PIXELS", request.param)


@pytest.mark.usefixtures("block_pixels")
@pytest.mark.parametrize("name", list(RANDOM_FRAMES))
def test_conversion_equals_the_whole_frame_reference(name: str) -> None:
    frame = RANDOM_FRAMES[name]
    out = convert_module._to_uint8(frame)
    assert out.dtype == np.uint8
    assert out.shape == frame.shape
    # float64 arithmetic per block: identical to the reference, not merely within one level
    np.testing.assert_array_equal(out, reference_to_uint8(frame))


@pytest.mark.usefixtures("block_pixels")
@pytest.mark.parametrize(
    "image",
    [
        pytest.param(Image.fromarray(RANDOM_FRAMES["uint16"]), id="I;16"),
        pytest.param(
            Image.frombytes("I;16B", SHAPE[::-1], RANDOM_FRAMES["uint16-big-endian"].tobytes()),
            id="I;16B",
        ),
        pytest.param(Image.fromarray(RANDOM_FRAMES["int32-16-bit-range"]), id="I-16-bit-range"),
        pytest.param(Image.fromarray(RANDOM_FRAMES["int32-full-range"]), id="I-full-range"),
        pytest.param(Image.fromarray(RANDOM_FRAMES["float32-wide"]), id="F"),
        pytest.param(Image.fromarray(RANDOM_FRAMES["float32-unit-non-finite"]), id="F-non-finite"),
    ],
)
def test_to_rgb_of_16_bit_32_bit_and_float_modes_equals_the_reference(image: Image.Image) -> None:
    out = to_rgb(image)
    assert (out.mode, out.size) == ("RGB", image.size)
    rgb = np.asarray(out)
    assert (rgb == rgb[..., :1]).all()
    np.testing.assert_array_equal(rgb[..., 0], reference_to_uint8(np.asarray(image)))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([np.nan, 0.5, np.inf, -np.inf, 1.0], [0, 128, 0, 0, 255]),  # non-finite → 0, in [0, 1]
        ([np.nan, 2.0, 100.0, np.inf], [0, 2, 100, 0]),  # non-finite → 0, in [0, 255]
        ([np.nan, -10.0, 10.0], [128, 0, 255]),  # non-finite → 0 → the middle of the stretch
        ([2.0, 300.0, -np.inf], [2, 255, 0]),  # the 0 counts in the range too
        ([np.nan, np.nan, np.nan], [0, 0, 0]),  # all NaN
        ([np.inf, -np.inf, np.inf], [0, 0, 0]),
    ],
)
def test_non_finite_floats_count_as_zero(values: list[float], expected: list[int]) -> None:
    frame = np.array([values], dtype=np.float32)
    assert convert_module._to_uint8(frame).tolist() == [expected]
    assert np.asarray(to_rgb(Image.fromarray(frame)))[0, :, 0].tolist() == expected


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (np.full((3, 4), 1000, dtype=np.int32), 4),  # 16-bit range: (1000 + 128) // 257
        (np.full((3, 4), 70_000, dtype=np.int32), 0),  # constant outside it: nothing to stretch
        (np.full((3, 4), -5, dtype=np.int32), 0),
        (np.full((3, 4), 65535, dtype=np.uint16), 255),
        (np.full((3, 4), 0.5, dtype=np.float32), 128),
        (np.full((3, 4), 200.4, dtype=np.float32), 200),
        (np.full((3, 4), -3.0, dtype=np.float32), 0),
        (np.full((3, 4), 1e30, dtype=np.float32), 0),
    ],
)
def test_constant_frames(frame: npt.NDArray[Any], expected: int) -> None:
    out = convert_module._to_uint8(frame)
    assert (out == expected).all()
    assert (out == reference_to_uint8(frame)).all()


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0, 0), (0,)])
@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_empty_frames(shape: tuple[int, ...], dtype: type[np.generic]) -> None:
    out = convert_module._to_uint8(np.zeros(shape, dtype=dtype))
    assert (out.shape, out.dtype) == (shape, np.uint8)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_large_frames_are_converted_without_whole_frame_copies(mode: str) -> None:
    rng = np.random.default_rng(0)
    if mode == "I":
        frame = rng.integers(-(2**31), 2**31, (4000, 4000), dtype=np.int32)  # stretched
    else:
        frame = (rng.standard_normal((4000, 4000)) * 1e3).astype(np.float32)
    image = Image.fromarray(frame)
    del frame
    assert image.mode == mode
    tracemalloc.start()
    try:
        out = to_rgb(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.size == (4000, 4000)
    # The 16 MB uint8 output plus a few blocks; a single int64/float64 copy of the frame is 128 MB
    # (and np.asarray(image) alone makes two 64 MB copies).
    assert peak < 16 * 2**20 + 32 * 2**20, f"peak traced memory {peak / 2**20:.1f} MiB"


# --- frames the header does not tell the size of --------------------------------------------------


def ico(*frames: tuple[tuple[int, int], bytes]) -> bytes:
    """An ICO whose directory claims each frame's size for the given embedded data."""
    offset = 6 + 16 * len(frames)
    directory, blobs = b"", b""
    for (width, height), blob in frames:
        directory += struct.pack(
            "<BBBBHHII", width % 256, height % 256, 0, 0, 1, 32, len(blob), offset + len(blobs)
        )
        blobs += blob
    return struct.pack("<HHH", 0, 1, len(frames)) + directory + blobs


def dib(width: int, height: int, header_size: int = 40) -> bytes:
    """A bitmap header as an ICO embeds it (``height`` counts the AND mask too), no pixels."""
    if header_size == 12:
        return struct.pack("<IHHHH", 12, width, height, 1, 32)
    return struct.pack("<IiiHHIIiiII", header_size, width, height, 1, 32, 0, 0, 0, 0, 0, 0).ljust(
        header_size, b"\0"
    )


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("side", [20_000, 8_000])  # above and below Pillow's own bomb limit
def test_ico_frame_larger_than_its_directory_entry_is_refused_before_decoding(side: int) -> None:
    data = ico(((16, 16), PNG_SIGNATURE + ihdr(side, side) + png_chunk(b"IEND", b"")))
    started = time.perf_counter()
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(data, SETTINGS)
    assert time.perf_counter() - started < 1.0
    assert str(caught.value) == (
        f"image is too large: embedded ICO frame 0 of {side}x{side} = {side * side} pixels "
        "exceeds the limit of 50000000 pixels"
    )


def test_ico_png_frame_with_a_later_larger_ihdr_is_refused() -> None:
    # Pillow keeps the last IHDR it meets before the image data.
    png = PNG_SIGNATURE + ihdr(16, 16) + png_chunk(b"tEXt", b"a\0b") + ihdr(8000, 8000)
    with pytest.raises(MediaTooLargeError, match=r"embedded ICO frame 0 of 8000x8000 "):
        decode_image(ico(((16, 16), png + png_chunk(b"IEND", b""))), SETTINGS)


@pytest.mark.parametrize(
    ("header", "frame"),
    [
        pytest.param(dib(30_000, 60_000), "30000x30000", id="bitmapinfoheader"),
        pytest.param(dib(30_000, -60_000), "30000x30000", id="top-down"),
        pytest.param(dib(30_000, 60_000, header_size=124), "30000x30000", id="v5-header"),
        pytest.param(dib(65535, 65535, header_size=12), "65535x32767", id="core-header"),
        pytest.param(dib(-16, 32), "4294967280x16", id="negative-width-is-unsigned"),
    ],
)
def test_ico_bitmap_frame_larger_than_its_directory_entry_is_refused(
    header: bytes, frame: str
) -> None:
    with pytest.raises(
        MediaTooLargeError, match=rf"^image is too large: embedded ICO frame 0 of {frame} "
    ):
        decode_image(ico(((16, 16), header + b"\0" * 64)), SETTINGS)


def test_every_ico_frame_is_checked_not_only_the_one_decoded() -> None:
    small = encode(Image.new("RGBA", (16, 16), (255, 0, 0, 255)), "PNG")
    huge = PNG_SIGNATURE + ihdr(9000, 9000) + png_chunk(b"IEND", b"")
    with pytest.raises(MediaTooLargeError, match=r"embedded ICO frame 1 of 9000x9000 "):
        decode_image(ico(((16, 16), small), ((8, 8), huge)), SETTINGS)


def test_ico_entry_outside_the_data_is_refused() -> None:
    data = bytearray(ico(((16, 16), dib(16, 32) + b"\0" * 64)))
    struct.pack_into("<I", data, 6 + 12, len(data) - 10)  # the entry's offset, near the end
    with pytest.raises(InvalidImageError) as caught:
        decode_image(bytes(data), SETTINGS)
    assert str(caught.value) == (
        f"image could not be decoded: ICO entry 0 (104 bytes at offset {len(data) - 10}) lies "
        f"outside the data ({len(data)} bytes)"
    )


def test_truncated_ico_directory_is_refused() -> None:
    data = ico(((16, 16), dib(16, 32)))[:20]
    with pytest.raises(InvalidImageError, match=r"the ICO directory of 1 entries is truncated"):
        decode_image(data, SETTINGS)


@pytest.mark.parametrize("bitmap_format", ["png", "bmp"])
def test_ico_saved_by_pillow_still_decodes(bitmap_format: str) -> None:
    data = encode(
        Image.new("RGB", (32, 32), (10, 200, 30)),
        "ICO",
        sizes=[(16, 16), (24, 24), (32, 32)],
        bitmap_format=bitmap_format,
    )
    image = decode_image(data, SETTINGS)
    assert image.size == (32, 32)
    assert np.abs(pixels(image).astype(int) - (10, 200, 30)).max() <= 1
    assert decode_image(encode(Image.new("RGB", (32, 32)), "ICO"), SETTINGS).size == (32, 32)


def riff_webp(chunk: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


@pytest.mark.parametrize(
    ("data", "canvas"),
    [
        pytest.param(
            riff_webp(
                b"VP8X" + struct.pack("<I", 10) + b"\0" * 4 + (9999).to_bytes(3, "little") * 2
            ),
            "10000x10000",
            id="VP8X",
        ),
        pytest.param(
            riff_webp(
                b"VP8 "
                + struct.pack("<I", 10)
                + b"\0\0\0\x9d\x01\x2a"
                + struct.pack("<HH", 16383, 16383)
            ),
            "16383x16383",
            id="VP8",
        ),
        pytest.param(
            riff_webp(
                b"VP8L" + struct.pack("<I", 5) + b"\x2f" + struct.pack("<I", 16383 | 16383 << 14)
            ),
            "16384x16384",
            id="VP8L",
        ),
    ],
)
def test_webp_canvas_is_checked_before_libwebp_allocates_it(data: bytes, canvas: str) -> None:
    with pytest.raises(MediaTooLargeError, match=rf"^image is too large: WebP canvas of {canvas} "):
        decode_image(data, SETTINGS)


TIFF_LONG_TAGS = {273, 279, 324, 325}


def tiff(tags: dict[int, list[int]], payload: bytes) -> bytes:
    """A little-endian TIFF: ``payload`` at offset 8, then one IFD of ``tags``."""
    ifd_offset = 8 + len(payload) + len(payload) % 2
    extra_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries, extra = b"", b""
    for tag in sorted(tags):
        values = tags[tag]
        kind, fmt = (4, "<I") if tag in TIFF_LONG_TAGS or max(values) > 0xFFFF else (3, "<H")
        raw = b"".join(struct.pack(fmt, value) for value in values)
        if len(raw) > 4:
            raw, extra = struct.pack("<I", extra_offset + len(extra)), extra + raw
        entries += struct.pack("<HHI", tag, kind, len(values)) + raw.ljust(4, b"\0")
    return (
        b"II*\0"
        + struct.pack("<I", ifd_offset)
        + payload.ljust(ifd_offset - 8, b"\0")
        + struct.pack("<H", len(tags))
        + entries
        + b"\0\0\0\0"
        + extra
    )


def tiled_tiff(side: int, tile: int, compression: int = 8) -> bytes:
    """A gray ``side`` x ``side`` image in one ``tile`` x ``tile`` tile (deflate: libtiff reads
    it)."""
    body = bytes(tile * tile)
    body = zlib.compress(body) if compression == 8 else body
    return tiff(
        {256: [side], 257: [side], 258: [8], 259: [compression], 262: [1], 277: [1]}
        | {322: [tile], 323: [tile], 324: [8], 325: [len(body)]},
        body,
    )


def ycbcr_tiff(side: int, rows_per_strip: int, photometric: int = 6) -> bytes:
    """An RGB image stored as YCbCr in one deflate strip: libtiff reads it as RGBA in bands."""
    body = zlib.compress(bytes(side * side * 3))
    return tiff(
        {256: [side], 257: [side], 258: [8, 8, 8], 259: [8], 262: [photometric], 277: [3]}
        | {273: [8], 278: [rows_per_strip], 279: [len(body)], 530: [1, 1]},
        body,
    )


def test_tiff_tile_much_larger_than_the_image_is_refused() -> None:
    # Unchecked, libtiff allocates and inflates the whole 16 Mpx tile for a 16x16 image.
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(tiled_tiff(16, 4096), SETTINGS)
    assert str(caught.value) == (
        "image is too large: its TIFF tile of 4096x4096 = 16777216 pixels is larger than a 16x16 "
        "image allows (4194304 pixels)"
    )


def test_ycbcr_tiff_band_much_larger_than_the_image_is_refused() -> None:
    with pytest.raises(MediaTooLargeError, match=r"its TIFF strip of 16x1048576 = 16777216 "):
        decode_image(ycbcr_tiff(16, 1 << 20), SETTINGS)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(tiled_tiff(16, 16), id="tile-of-the-image"),
        pytest.param(tiled_tiff(100, 256), id="tile-larger-than-a-small-image"),
        pytest.param(tiled_tiff(16, 4096, compression=1), id="uncompressed-tile"),
        pytest.param(ycbcr_tiff(16, 16), id="ycbcr"),
        pytest.param(ycbcr_tiff(16, 1000), id="ycbcr-rows-per-strip-above-the-height"),
        pytest.param(ycbcr_tiff(16, 1 << 20, photometric=2), id="rgb-rows-per-strip-huge"),
    ],
)
def test_tiff_tiles_and_strips_of_ordinary_size_decode(data: bytes) -> None:
    image = decode_image(data, SETTINGS)
    assert image.mode == "RGB"


@pytest.mark.parametrize("compression", ["tiff_adobe_deflate", "tiff_lzw", "jpeg"])
def test_compressed_tiffs_saved_by_pillow_decode(compression: str) -> None:
    source = Image.new("RGB", (40, 30), (200, 30, 10))
    image = decode_image(encode(source, "TIFF", compression=compression), SETTINGS)
    assert image.size == (40, 30)
    assert np.abs(pixels(image).astype(int) - (200, 30, 10)).max() <= 4


requires_avif = pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")


def avif_claiming(data: bytes, width: int, height: int) -> bytes:
    """``data`` with every ``ispe`` (and track header) claiming ``width`` x ``height``."""
    patched = bytearray(data)
    at = patched.find(b"ispe")
    while at >= 0:
        struct.pack_into(">II", patched, at + 8, width, height)
        at = patched.find(b"ispe", at + 1)
    at = patched.find(b"tkhd")
    if at >= 0:
        version = patched[at + 4]
        struct.pack_into(
            ">II", patched, at + 8 + (32 if version else 20) + 52, width << 16, height << 16
        )
    return bytes(patched)


@requires_avif
@pytest.mark.parametrize("animated", [False, True])
def test_avif_whose_av1_frame_is_much_larger_than_its_container_claims(animated: bool) -> None:
    # libavif decodes the 2100x2100 AV1 frame, then scales it to the claimed 16x16.
    frames = [Image.new("RGB", (2100, 2100), color) for color in ((10, 200, 30), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "AVIF", save_all=animated, append_images=frames[1:], quality=10)
    data = avif_claiming(buffer.getvalue(), 16, 16)
    assert Image.open(io.BytesIO(data)).size == (16, 16)
    with pytest.raises(MediaTooLargeError) as caught:
        decode_image(data, SETTINGS)
    assert str(caught.value) == (
        "image is too large: its AV1 frame of 2100x2100 = 4410000 pixels is larger than a 16x16 "
        "image allows (4194304 pixels)"
    )


@requires_avif
@pytest.mark.parametrize(("mode", "animated"), [("RGB", False), ("RGBA", False), ("RGB", True)])
def test_avif_saved_by_pillow_decodes(mode: str, animated: bool) -> None:
    frames = [Image.new(mode, (64, 48), color) for color in ("#0ac81e", "#0000ff")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "AVIF", save_all=animated, append_images=frames[1:], duration=50)
    image = decode_image(buffer.getvalue(), SETTINGS)
    assert image.size == (64, 48)
    assert np.abs(pixels(image).astype(int) - (10, 200, 30)).max() <= 8


@requires_avif
def test_animated_avif_track_and_primary_item_agree() -> None:
    frames = [Image.new("RGB", (40, 30), color) for color in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "AVIF", save_all=True, append_images=frames[1:], duration=50)
    data = buffer.getvalue()
    boxes = {box.kind: box for box in frames_module._boxes(data, 0, len(data))}
    first_samples = frames_module._av01_first_samples(data, boxes[b"moov"])
    assert first_samples
    assert set(first_samples) <= set(frames_module._av01_items(data, boxes[b"meta"]))
    assert list(frames_module._avif_frame_sizes(data)) == [(40, 30)]
