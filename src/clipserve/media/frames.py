"""Frames the decoder will really decode or allocate, checked from the raw bytes first.

Only the first frame is decoded. What is checked, per accepted format:

* JPEG, MPO, PNG/APNG, BMP, PPM, QOI: the size the header parse finds is the size decoded (MPO's
  first frame is the JPEG whose header was parsed; APNG frames lie inside the IHDR canvas, which
  Pillow checks), checked by :func:`clipserve.media.decode.check_pixel_limit` right after the
  header parse.
* GIF: the first frame's descriptor may lie outside the logical screen; Pillow grows ``size`` to
  cover it during the header parse, so the check sees it. (That parse already allocates a
  1 byte/pixel disposal fill of the first frame, bounded only by Pillow's bomb limit.)
* ICO: Pillow decodes the largest entry during the header parse, and an entry's embedded PNG or DIB
  may be larger than the directory says: :func:`check_embedded_frames` first reads every entry's
  embedded header from the raw bytes (every IHDR before the image data; the DIB header, whose
  height also counts the AND mask) and refuses a directory that points outside the data.
* WEBP: libwebp allocates the canvas during the header parse: its size (VP8, VP8L or VP8X header)
  is checked from the raw bytes first; libwebp keeps every frame inside the canvas.
* TIFF: only the first IFD is decoded and Pillow checks libtiff's size against it, but libtiff
  decodes whole tiles (and YCbCr images read as RGBA in whole bands of tile or strip height), which
  may exceed the image by at most ``_BLOCK_SLACK_PIXELS``.
* AVIF: libavif decodes the AV1 frame at the size of its sequence header (up to 16384 x 16384)
  and only then scales it to the size the container (``ispe``) claims: the sequence headers of
  every ``av01`` item and of every AV1 track's first sample may exceed the image by at most
  ``_BLOCK_SLACK_PIXELS``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, NamedTuple

from PIL import ImageFile, TiffImagePlugin

from clipserve.config import MediaSettings
from clipserve.errors import InvalidImageError, MediaTooLargeError


def check_embedded_frames(data: bytes, limits: MediaSettings) -> None:
    """Check, from the raw bytes and before Pillow parses the header, the frames Pillow decodes or
    allocates while parsing it: every frame embedded in an ICO, a WebP canvas.

    Raises :class:`MediaTooLargeError` above ``max_image_pixels`` and :class:`InvalidImageError`
    for an ICO directory that points outside the data; other data passes untouched.
    """
    if data.startswith(_ICO_MAGIC):
        _check_ico(data, limits)
    elif data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        canvas = _webp_canvas(data)
        if canvas is not None:
            _check_frame("WebP canvas", *canvas, limits)


_ICO_MAGIC: Final = b"\0\0\1\0"
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
# PNG chunks walked, over all the frames of one ICO, before it is refused as malformed.
_MAX_ICO_PNG_CHUNKS: Final = 4096
# DIB header sizes Pillow reads with 32-bit width/height (12, BITMAPCOREHEADER, has 16-bit ones).
_DIB_INFO_HEADERS: Final = (40, 52, 56, 64, 108, 124)
# How many pixels a TIFF tile/strip or an AV1 frame may hold beyond its image's own.
_BLOCK_SLACK_PIXELS: Final = 1 << 22
# AV1 OBUs walked, over all the AV1 data of one AVIF, before it is refused as malformed.
_MAX_AV1_OBUS: Final = 1 << 20


class _MalformedError(ValueError):
    """A container structure that our header walk cannot follow."""


def _check_frame(what: str, width: int, height: int, limits: MediaSettings) -> None:
    pixels = width * height
    if pixels > limits.max_image_pixels:
        raise MediaTooLargeError(
            f"image is too large: {what} of {width}x{height} = {pixels} pixels exceeds the limit "
            f"of {limits.max_image_pixels} pixels",
            detail={
                "frame": what,
                "width": width,
                "height": height,
                "max_image_pixels": limits.max_image_pixels,
            },
        )


def _check_block(what: str, block: tuple[int, int], image: tuple[int, int]) -> None:
    """A tile or frame the decoder works in may exceed its image by ``_BLOCK_SLACK_PIXELS``."""
    (width, height), (image_width, image_height) = block, image
    pixels = width * height
    allowed = max(image_width * image_height, _BLOCK_SLACK_PIXELS)
    if pixels > allowed:
        raise MediaTooLargeError(
            f"image is too large: its {what} of {width}x{height} = {pixels} pixels is larger than "
            f"a {image_width}x{image_height} image allows ({allowed} pixels)",
            detail={
                "frame": what,
                "width": width,
                "height": height,
                "image_width": image_width,
                "image_height": image_height,
                "max_block_pixels": allowed,
            },
        )


def _check_ico(data: bytes, limits: MediaSettings) -> None:
    """Every directory entry's embedded frame, read as Pillow's IcoImagePlugin reads it: PNG if it
    starts with the PNG signature, else a DIB. Pillow decodes the largest entry while it parses the
    header and only then compares its real size with the directory's."""
    count = int.from_bytes(data[4:6], "little")
    if len(data) < 6 + 16 * count:
        raise InvalidImageError(
            f"image could not be decoded: the ICO directory of {count} entries is truncated"
        )
    chunks_left = _MAX_ICO_PNG_CHUNKS
    checked: set[int] = set()
    for index in range(count):
        size, offset = struct.unpack_from("<II", data, 6 + 16 * index + 8)
        if offset + size > len(data):
            raise InvalidImageError(
                f"image could not be decoded: ICO entry {index} ({size} bytes at offset {offset}) "
                f"lies outside the data ({len(data)} bytes)"
            )
        if offset in checked:
            continue
        checked.add(offset)
        what = f"embedded ICO frame {index}"
        if data.startswith(_PNG_MAGIC, offset):
            chunks_left = _check_ico_png(data, offset, what, limits, chunks_left)
        else:
            dib = _dib_size(data, offset, index)
            if dib is not None:
                _check_frame(what, *dib, limits)


def _check_ico_png(
    data: bytes, offset: int, what: str, limits: MediaSettings, chunks_left: int
) -> int:
    """Every IHDR before the image data (Pillow takes the last one it meets); returns how many
    chunks may still be walked."""
    pos = offset + len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        if chunks_left <= 0:
            raise InvalidImageError(
                "image could not be decoded: too many PNG chunks in the frames of an ICO"
            )
        chunks_left -= 1
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IHDR" and pos + 16 <= len(data):
            width, height = struct.unpack_from(">II", data, pos + 8)
            _check_frame(what, width, height, limits)
        if kind in (b"IDAT", b"fdAT", b"IEND"):
            break
        pos += 12 + length
    return chunks_left


def _dib_size(data: bytes, offset: int, index: int) -> tuple[int, int] | None:
    """Size of the bitmap Pillow decodes from an ICO's DIB, read as BmpImagePlugin reads it (width
    unsigned, height negative when top-down); the header's height counts the AND mask too, so
    Pillow decodes half of it. None for a header Pillow cannot read (it refuses that frame)."""
    header = data[offset : offset + 12]
    header_size = int.from_bytes(header[:4], "little")
    if header_size == 12 and len(header) >= 8:
        width, height = struct.unpack_from("<HH", header, 4)
    elif header_size in _DIB_INFO_HEADERS and len(header) == 12:
        width, height = struct.unpack_from("<II", header, 4)
        if header[11] == 0xFF:  # a negative height: a top-down bitmap
            height = 2**32 - height
    elif len(header) < 12:
        raise InvalidImageError(
            f"image could not be decoded: ICO entry {index} is truncated (offset {offset})"
        )
    else:
        return None
    return width, height // 2


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    """The canvas size libwebp allocates for, from the first chunk (as Pillow's WebP plugin reads
    it); None when the first chunk is none libwebp accepts."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def check_decoded_blocks(image: ImageFile.ImageFile, data: bytes) -> None:
    """After the header parse: the tiles and frames a decoder works in that may be larger than
    ``image.size`` (TIFF tiles, AV1 frames in AVIF)."""
    if isinstance(image, TiffImagePlugin.TiffImageFile):
        _check_tiff_blocks(image)
    elif image.format == "AVIF":
        _check_avif_frames(data, image.size)


def _check_tiff_blocks(image: TiffImagePlugin.TiffImageFile) -> None:
    """libtiff decodes whole tiles (TIFFTileSize is not clipped to the image) and, for YCbCr read as
    RGBA, whole bands of image width x tile length or RowsPerStrip (not clipped either); strips
    otherwise are clipped to the image by libtiff. (Pillow's own decoder, for uncompressed data,
    decodes only the parts of tiles inside the image.)"""
    if not getattr(image, "use_load_libtiff", True):
        return
    tags = image.tag_v2
    size = image.size
    rgba = _tiff_int(tags, _PHOTOMETRIC, 0) == 6 and not (
        _tiff_int(tags, _COMPRESSION, 1) == 7 and _tiff_int(tags, _PLANAR_CONFIGURATION, 1) == 1
    )
    if _TILE_WIDTH in tags or _TILE_LENGTH in tags:
        tile_length = _tiff_int(tags, _TILE_LENGTH, size[1])
        _check_block("TIFF tile", (_tiff_int(tags, _TILE_WIDTH, size[0]), tile_length), size)
        if rgba:
            _check_block("TIFF row band", (size[0], tile_length), size)
    elif rgba:
        rows = _tiff_int(tags, _ROWS_PER_STRIP, size[1])
        _check_block("TIFF strip", (size[0], size[1] if rows >= 2**32 - 1 else rows), size)


_COMPRESSION: Final = 259
_PHOTOMETRIC: Final = 262
_ROWS_PER_STRIP: Final = 278
_PLANAR_CONFIGURATION: Final = 284
_TILE_WIDTH: Final = 322
_TILE_LENGTH: Final = 323


def _tiff_int(tags: TiffImagePlugin.ImageFileDirectory_v2, tag: int, default: int) -> int:
    value = tags.get(tag, default)
    if isinstance(value, tuple) and value:
        value = value[0]  # libtiff, too, reads the first of several values
    if not isinstance(value, int):
        raise InvalidImageError(
            f"image could not be decoded: invalid TIFF tag {tag} ({type(value).__name__})"
        )
    return value


def _check_avif_frames(data: bytes, size: tuple[int, int]) -> None:
    """Every AV1 sequence header (its maximum frame size is what dav1d allocates for) of every
    ``av01`` item and of every AV1 track's first sample; libavif scales the decoded frame to the
    size the container claims only after decoding it."""
    try:
        frames = list(_avif_frame_sizes(data))
    except (ValueError, IndexError, struct.error) as exc:
        raise InvalidImageError(f"image could not be decoded: malformed AVIF ({exc})") from exc
    if not frames:
        raise InvalidImageError("image could not be decoded: no AV1 sequence header in the AVIF")
    for frame in frames:
        _check_block("AV1 frame", frame, size)


class _Box(NamedTuple):
    kind: bytes
    start: int  # payload
    end: int


class _Reader:
    """Big-endian unsigned fields of one box payload."""

    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def uint(self, size: int) -> int:
        if self.pos + size > self.end:
            raise _MalformedError("truncated box")
        value = int.from_bytes(self.data[self.pos : self.pos + size], "big")
        self.pos += size
        return value


def _boxes(data: bytes, start: int, end: int) -> Iterator[_Box]:
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            size, header = _Reader(data, pos + 8, end).uint(8), 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise _MalformedError(f"box {kind!r} overruns its parent")
        yield _Box(kind, pos + header, pos + size)
        pos += size


def _child(data: bytes, box: _Box, *path: bytes) -> _Box | None:
    for kind in path:
        found = next(
            (child for child in _boxes(data, box.start, box.end) if child.kind == kind), None
        )
        if found is None:
            return None
        box = found
    return box


def _avif_frame_sizes(data: bytes) -> Iterator[tuple[int, int]]:
    samples: set[tuple[tuple[int, int], ...]] = set()
    for box in _boxes(data, 0, len(data)):
        if box.kind == b"meta":
            samples.update(_av01_items(data, box))
        elif box.kind == b"moov":
            samples.update(_av01_first_samples(data, box))
    if sum(end - start for extents in samples for start, end in extents) > 2 * len(data):
        raise _MalformedError("AV1 data overlaps itself")
    obus_left = _MAX_AV1_OBUS
    for extents in samples:
        sample = b"".join(data[start:end] for start, end in extents)
        pos = 0
        while pos < len(sample):
            obus_left -= 1
            if obus_left < 0:
                raise _MalformedError("too many AV1 OBUs")
            header = sample[pos]
            pos += 2 if header & 0x04 else 1  # extension byte
            if header & 0x02:  # size field
                length, pos = _leb128(sample, pos)
            else:
                length = len(sample) - pos
            if pos + length > len(sample):
                raise _MalformedError("truncated AV1 OBU")
            if (header >> 3) & 0x0F == 1:  # OBU_SEQUENCE_HEADER
                yield _av1_max_frame_size(sample, pos, pos + length)
            pos += length


def _av01_items(data: bytes, meta: _Box) -> list[tuple[tuple[int, int], ...]]:
    """Data extents (absolute, in file order) of every ``av01`` item of a ``meta`` box."""
    inner = _Box(meta.kind, meta.start + 4, meta.end)  # a full box
    iinf, iloc, idat = (_child(data, inner, kind) for kind in (b"iinf", b"iloc", b"idat"))
    if iinf is None or iloc is None:
        return []
    av01: set[int] = set()
    version = data[iinf.start]
    for infe in _boxes(data, iinf.start + (6 if version == 0 else 8), iinf.end):
        if infe.kind != b"infe":
            continue
        reader = _Reader(data, infe.start, infe.end)
        infe_version = reader.uint(1)
        if infe_version < 2:
            continue  # no item type (libavif refuses these, too)
        reader.uint(3)
        item = reader.uint(2 if infe_version == 2 else 4)
        reader.uint(2)  # protection index
        if reader.uint(4) == int.from_bytes(b"av01", "big"):
            av01.add(item)
    reader = _Reader(data, iloc.start, iloc.end)
    version = reader.uint(1)
    reader.uint(3)
    sizes = reader.uint(1)
    offset_size, length_size = sizes >> 4, sizes & 0x0F
    sizes = reader.uint(1)
    base_size, index_size = sizes >> 4, (sizes & 0x0F) if version in (1, 2) else 0
    id_size = 2 if version < 2 else 4
    found: list[tuple[tuple[int, int], ...]] = []
    for _ in range(reader.uint(id_size)):
        item = reader.uint(id_size)
        method = reader.uint(2) & 0x0F if version in (1, 2) else 0
        reader.uint(2)  # data reference index
        base = reader.uint(base_size)
        extents = []
        for _ in range(reader.uint(2)):
            reader.uint(index_size)
            offset, length = base + reader.uint(offset_size), reader.uint(length_size)
            extents.append((offset, length))
        if item not in av01:
            continue
        if method == 0:
            origin, limit = 0, len(data)
        elif method == 1 and idat is not None:
            origin, limit = idat.start, idat.end
        else:
            raise _MalformedError(f"unsupported data location of AV1 item {item}")
        absolute = []
        for offset, length in extents:
            start, end = origin + offset, (limit if length == 0 else origin + offset + length)
            if end > limit or start > end:
                raise _MalformedError(f"AV1 item {item} lies outside the data")
            absolute.append((start, end))
        found.append(tuple(absolute))
    return found


def _av01_first_samples(data: bytes, moov: _Box) -> list[tuple[tuple[int, int], ...]]:
    """Data extent of the first sample (the one frame 0 decodes) of every AV1 track."""
    found: list[tuple[tuple[int, int], ...]] = []
    for trak in _boxes(data, moov.start, moov.end):
        stbl = _child(data, trak, b"mdia", b"minf", b"stbl") if trak.kind == b"trak" else None
        stsd = None if stbl is None else _child(data, stbl, b"stsd")
        if stbl is None or stsd is None:
            continue
        if all(entry.kind != b"av01" for entry in _boxes(data, stsd.start + 8, stsd.end)):
            continue
        stsz = _child(data, stbl, b"stsz")
        chunks = _child(data, stbl, b"stco") or _child(data, stbl, b"co64")
        if stsz is None or chunks is None:
            raise _MalformedError("AV1 track without a sample table")
        reader = _Reader(data, stsz.start + 4, stsz.end)
        size, count = reader.uint(4), reader.uint(4)
        if count == 0:
            continue
        size = size or reader.uint(4)
        reader = _Reader(data, chunks.start + 4, chunks.end)
        if reader.uint(4) == 0:
            raise _MalformedError("AV1 track without chunks")
        offset = reader.uint(8 if chunks.kind == b"co64" else 4)
        if offset + size > len(data):
            raise _MalformedError("AV1 sample lies outside the data")
        found.append(((offset, offset + size),))
    return found


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for index in range(8):
        byte = data[pos + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, pos + index + 1
    raise _MalformedError("invalid AV1 OBU size")


class _Bits:
    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start * 8, end * 8

    def read(self, count: int) -> int:
        if self.pos + count > self.end:
            raise _MalformedError("truncated AV1 sequence header")
        value = 0
        for _ in range(count):
            value = (value << 1) | ((self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def uvlc(self) -> int:
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros >= 32:
                raise _MalformedError("invalid AV1 uvlc")
        return self.read(zeros) + (1 << zeros) - 1


def _av1_max_frame_size(data: bytes, start: int, end: int) -> tuple[int, int]:
    """max_frame_width/height of an AV1 sequence header OBU payload (AV1 spec 5.5.1)."""
    bits = _Bits(data, start, end)
    bits.read(3)  # seq_profile
    bits.read(1)  # still_picture
    if bits.read(1):  # reduced_still_picture_header
        bits.read(5)  # seq_level_idx[0]
    else:
        decoder_model_info = False
        buffer_delay_length = 0
        if bits.read(1):  # timing_info_present_flag
            bits.read(32)  # num_units_in_display_tick
            bits.read(32)  # time_scale
            if bits.read(1):  # equal_picture_interval
                bits.uvlc()  # num_ticks_per_picture_minus_1
            decoder_model_info = bool(bits.read(1))
            if decoder_model_info:
                buffer_delay_length = bits.read(5) + 1
                bits.read(32)  # num_units_in_decoding_tick
                bits.read(10)  # buffer_removal_time_length_minus_1, frame_presentation_...
        initial_display_delay = bits.read(1)
        for _ in range(bits.read(5) + 1):  # operating points
            bits.read(12)  # operating_point_idc
            if bits.read(5) > 7:  # seq_level_idx
                bits.read(1)  # seq_tier
            if decoder_model_info and bits.read(1):
                bits.read(2 * buffer_delay_length + 1)
            if initial_display_delay and bits.read(1):
                bits.read(4)
    width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
    return bits.read(width_bits) + 1, bits.read(height_bits) + 1
