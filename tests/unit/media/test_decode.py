"""decode_image / prepare_image: limits before decoding, every mode to RGB, corrupt data refused."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from clipserve.config import MediaSettings
from clipserve.errors import InvalidImageError, MediaTooLargeError
from clipserve.media import decode_image, prepare_image

SETTINGS = MediaSettings()


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height``; its pixel data is garbage."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
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
