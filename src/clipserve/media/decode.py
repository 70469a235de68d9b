"""Bytes → clean RGB image, with byte and pixel caps checked before any pixel is decoded.

Everything here is synchronous CPU work; :class:`clipserve.media.loader.ImageLoader` runs it in an
executor. Pillow's global ``Image.MAX_IMAGE_PIXELS`` is never changed: our own limit,
``MediaSettings.max_image_pixels``, is checked from the header before decoding. Pillow's
``DecompressionBombWarning`` is silenced locally (our check always follows it) and its
``DecompressionBombError`` (above twice Pillow's limit, ~179 Mpx) becomes
:class:`~clipserve.errors.MediaTooLargeError`; so ``max_image_pixels`` above ~179 Mpx has no effect.

Before the header parse (for the formats whose parse already decodes or allocates a frame) and
right after it, :mod:`clipserve.media.frames` checks the frames each accepted format will really
decode, from the raw bytes. 16-bit, 32-bit and float frames are converted to 8 bits in blocks
(:mod:`clipserve.media.convert`), never copied whole into an 8-byte type.
"""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
from collections.abc import Iterator
from typing import Final

from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from clipserve.config import MediaSettings
from clipserve.errors import InvalidImageError, MediaTooLargeError
from clipserve.media.convert import image_to_uint8
from clipserve.media.frames import check_decoded_blocks, check_embedded_frames

# Raster formats with a real signature and no external helper program. EPS (runs Ghostscript),
# PDF, SVG and signature-less formats (TGA, ...) are refused: random bytes must not "decode".
DECODABLE_FORMATS: Final[tuple[str, ...]] = (
    "JPEG",
    "MPO",
    "PNG",
    "GIF",
    "WEBP",
    "AVIF",
    "BMP",
    "TIFF",
    "PPM",
    "ICO",
    "QOI",
)

# Errors Pillow raises for corrupt, truncated or unsupported data.
_DECODE_ERRORS: Final = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)

# `warnings.catch_warnings` swaps process-wide state; this lock keeps two decode threads from
# interleaving their enter/exit (which would leave a filter installed for good). It guards only the
# header parse (Image.open), never pixel decoding.
_WARNINGS_LOCK: Final = threading.Lock()

_WHITE: Final = (255, 255, 255, 255)


def check_pixel_limit(width: int, height: int, limits: MediaSettings) -> None:
    """Raise :class:`MediaTooLargeError` when ``width * height`` exceeds ``max_image_pixels``."""
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise MediaTooLargeError(
            f"image is too large: {width}x{height} = {pixels} pixels exceeds the limit of "
            f"{limits.max_image_pixels} pixels",
            detail={"width": width, "height": height, "max_image_pixels": limits.max_image_pixels},
        )


def decode_image(data: bytes, limits: MediaSettings) -> Image.Image:
    """Decode untrusted bytes into a fully loaded RGB image (first frame, EXIF orientation applied).

    Raises :class:`MediaTooLargeError` over the byte or pixel limit (checked from the header, before
    decoding) and :class:`InvalidImageError` for anything that is not a complete, supported image.
    """
    with open_image(data, limits) as image:
        return finish_image(image)


@contextlib.contextmanager
def open_image(data: bytes, limits: MediaSettings) -> Iterator[ImageFile.ImageFile]:
    """Parse only the header of untrusted bytes (no pixel is decoded yet) and check the byte and
    pixel limits; :func:`finish_image` decodes it, inside this context."""
    if not data:
        raise InvalidImageError("image could not be decoded: the data is empty")
    if len(data) > limits.max_image_bytes:
        raise MediaTooLargeError(
            f"image is too large: {len(data)} bytes exceeds the limit of "
            f"{limits.max_image_bytes} bytes",
            detail={"num_bytes": len(data), "max_image_bytes": limits.max_image_bytes},
        )
    check_embedded_frames(data, limits)
    with _open(data) as image:
        check_pixel_limit(image.width, image.height, limits)
        yield image


def finish_image(image: ImageFile.ImageFile, *, detach: bool = True) -> Image.Image:
    """Decode an image from :func:`open_image` into an RGB image (EXIF orientation applied).

    With ``detach`` it stays valid after the file is closed (closing invalidates an image that is
    the file's own, so that one is copied); without, it may be the file's own, to be used inside
    :func:`open_image`'s block only (no copy of the pixels)."""
    _load(image)
    rgb = to_rgb(_apply_orientation(image))
    return image.copy() if detach and rgb is image else rgb


JPEG_FORMATS: Final[frozenset[str]] = frozenset({"JPEG", "MPO"})
"""The formats whose decoder can scale down while it decodes (by 1/2, 1/4 or 1/8, in the DCT)."""


def draft_jpeg(image: ImageFile.ImageFile, side: int) -> None:
    """Before :func:`finish_image`: have a JPEG decoded at the smallest DCT scale that still gives
    at least ``side`` pixels on both sides (so a model's shortest-side resize to ``side`` only
    ever shrinks). The header's ``size`` becomes the smaller one. Other formats, and JPEGs under
    twice ``side``, are left as they are."""
    if image.format in JPEG_FORMATS and min(image.size) >= 2 * side:
        image.draft(image.mode, (side, side))


def prepare_image(image: Image.Image, limits: MediaSettings) -> Image.Image:
    """Make a caller-supplied PIL image safe to use: pixel limit, EXIF orientation, RGB.

    The caller's object is not modified; an animated image contributes its current frame.
    """
    check_pixel_limit(image.width, image.height, limits)
    _load(image)
    prepared = to_rgb(_apply_orientation(image))
    # `to_rgb` returns an RGB input unchanged; never hand back the caller's own object.
    return prepared.copy() if prepared is image else prepared


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency is composited onto white (as transformers' ``convert_to_rgb`` does). 16-bit data
    (and 32-bit integer data within 0..65535) is scaled by 1/257 instead of being clipped; other
    integer data is min-max normalised. Float data is scaled from [0, 1], taken as is within
    [0, 255], else min-max normalised.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # Before transparency: Pillow's own I;16 → RGBA conversion clips. A tRNS key is ignored.
        return Image.fromarray(image_to_uint8(image)).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        background.alpha_composite(rgba)
        return background.convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise InvalidImageError(
            f"image could not be decoded: mode {image.mode} cannot be converted to RGB"
        ) from exc


def _open(data: bytes) -> ImageFile.ImageFile:
    """Identify the image and parse its header only (lazy)."""
    Image.init()
    formats = [name for name in DECODABLE_FORMATS if name in Image.OPEN]
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Pillow warns above its own global limit; ours (checked from the header right after
            # this) is the one that counts, so the warning is silenced here, not turned global.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLargeError(
            f"image is too large: the decoder refused it as a possible decompression bomb ({exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            "image could not be decoded: unrecognised or unsupported image format "
            f"(supported: {', '.join(formats)})"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImageError(f"image could not be decoded: {_reason(exc)}") from exc
    try:
        check_decoded_blocks(image, data)
    except BaseException:
        image.close()
        raise
    return image


def _load(image: Image.Image) -> None:
    """Decode every pixel now, so truncated or corrupt data fails here and not in a model."""
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLargeError(
            f"image is too large: the decoder refused it as a possible decompression bomb ({exc})"
        ) from exc
    except (*_DECODE_ERRORS, MemoryError) as exc:
        raise InvalidImageError(f"image could not be decoded: {_reason(exc)}") from exc


def _apply_orientation(image: Image.Image) -> Image.Image:
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (*_DECODE_ERRORS, KeyError, TypeError):
        return image  # unreadable EXIF: keep the pixels as stored rather than refuse the image
    if orientation not in (2, 3, 4, 5, 6, 7, 8):
        return image
    return ImageOps.exif_transpose(image)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, MemoryError):
        return "out of memory while decoding"
    if isinstance(exc, EOFError | struct.error | IndexError) or not text:
        return f"truncated or corrupt data ({type(exc).__name__}{': ' + text if text else ''})"
    return text


# --- frames that can be larger than the header says -----------------------------------------------
