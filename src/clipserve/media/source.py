"""What an image input is, how to describe it safely, and reading the local kinds (data URI, path).

An ``ImageInput`` is an http(s) URL, a ``data:`` URI or a file path (strings), raw bytes, or a PIL
image. Any other ``scheme:`` string (``file:``, ``ftp:``, ``gopher:`` ...) is refused; a file whose
name looks like a scheme (``a:b.png``) must be written as ``./a:b.png``.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from enum import StrEnum
from typing import Final, TypeAlias
from urllib.parse import unquote_to_bytes, urlsplit, urlunsplit

from PIL import Image

from clipserve.config import MediaSettings
from clipserve.errors import (
    InvalidImageError,
    MediaAccessDeniedError,
    MediaFetchError,
    MediaTooLargeError,
    UnsupportedMediaTypeError,
)

ImageInput: TypeAlias = str | bytes | Image.Image

_SCHEME_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
_MAX_DESCRIPTION: Final = 200
_DATA_URI_PREVIEW: Final = 5
# Media types that are not raster images even though some are image/*.
_NOT_RASTER: Final = frozenset({"image/svg+xml"})
# Types that may hold any bytes: allowed, the decoder decides.
_OPAQUE_TYPES: Final = frozenset({"application/octet-stream", "binary/octet-stream"})
_URLSAFE: Final = str.maketrans("-_", "+/")


class SourceKind(StrEnum):
    URL = "url"
    DATA_URI = "data_uri"
    PATH = "path"
    BYTES = "bytes"
    PIL = "pil"


def classify(value: ImageInput) -> SourceKind:
    """Say which kind of input ``value`` is; refuse strings with an unsupported scheme."""
    if isinstance(value, Image.Image):
        return SourceKind.PIL
    if isinstance(value, bytes | bytearray | memoryview):
        return SourceKind.BYTES
    if not isinstance(value, str):
        raise InvalidImageError(
            f"unsupported image input type {type(value).__name__}: expected a URL, a data URI, "
            "a file path, bytes or a PIL image"
        )
    text = value.strip()
    if not text:
        raise InvalidImageError(
            "image input is empty: expected an http(s) URL, a data URI or a file path"
        )
    match = _SCHEME_RE.match(text)
    if match is None:
        return SourceKind.PATH
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        return SourceKind.URL
    if scheme == "data":
        return SourceKind.DATA_URI
    raise UnsupportedMediaTypeError(
        f"unsupported image URL scheme '{_printable(scheme[:20])}': use an http(s) URL, "
        "a data URI or a file path"
    )


def describe(value: ImageInput) -> str:
    """A short description safe for logs and error messages (never the whole payload)."""
    if isinstance(value, Image.Image):
        return f"<PIL image {value.width}x{value.height} {value.mode}>"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<bytes: {len(value)}>"
    if not isinstance(value, str):
        return f"<{type(value).__name__}>"
    text = value.strip()
    if text[:5].lower() == "data:":
        header, comma, payload = text.partition(",")
        if len(header) > 64:
            header = header[:64] + "…"
        preview = _printable(payload[:_DATA_URI_PREVIEW])
        return f"{_printable(header)}{comma}{preview}…({len(text)} chars)"
    return _printable(_cap(_redact(text)))


def parse_data_uri(uri: str, *, max_bytes: int) -> tuple[str, bytes]:
    """Split an RFC 2397 ``data:`` URI into (media type, payload bytes).

    Base64 (standard or URL-safe; whitespace and missing padding tolerated) and percent-encoded
    forms are accepted. The size is bounded from the encoded length before anything is decoded.
    """
    text = uri.strip()
    if text[:5].lower() != "data:":
        raise InvalidImageError("invalid data URI: it must start with 'data:'")
    header, comma, payload = text[5:].partition(",")
    if not comma:
        raise InvalidImageError("invalid data URI: missing ',' before the data")
    params = [part.strip() for part in header.split(";")]
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    mime = params[0].lower() or "text/plain"
    if mime in _NOT_RASTER or not (mime.startswith("image/") or mime in _OPAQUE_TYPES):
        raise UnsupportedMediaTypeError(
            f"data URI media type '{_printable(mime[:80])}' is not a supported image type "
            "(expected image/*)"
        )
    if not payload.strip():
        raise InvalidImageError("invalid data URI: the data is empty")
    # base64 grows data by 4/3 (plus line breaks); percent-encoding by at most 3x.
    ceiling = 4 * -(-max_bytes // 3) if is_base64 else 3 * max_bytes
    ceiling += ceiling // 38 + 4
    if len(payload) > ceiling:
        estimate = len(payload) * 3 // 4 if is_base64 else len(payload) // 3
        raise MediaTooLargeError(
            f"image is too large: the data URI holds at least {estimate} bytes, over the limit "
            f"of {max_bytes} bytes",
            detail={"max_image_bytes": max_bytes},
        )
    data = _decode_base64(payload) if is_base64 else unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise MediaTooLargeError(
            f"image is too large: {len(data)} bytes exceeds the limit of {max_bytes} bytes",
            detail={"num_bytes": len(data), "max_image_bytes": max_bytes},
        )
    return mime, data


def read_local_image(path: str, settings: MediaSettings) -> bytes:
    """Read an image file that lies under ``settings.media_root`` (symlinks resolved). Blocking."""
    shown = _printable(_cap(path))
    if settings.media_root is None:
        raise MediaAccessDeniedError(
            "local image paths are disabled; set media.media_root to read images from a folder"
        )
    try:
        root = settings.media_root.resolve()
        real = (root / path).resolve()  # an absolute `path` replaces `root` here
    except (OSError, ValueError, RuntimeError) as exc:
        raise MediaFetchError(f"invalid image path: {shown}") from exc  # no server paths shown
    if not real.is_relative_to(root):
        raise MediaAccessDeniedError(f"image path is outside the media root: {shown}")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except FileNotFoundError as exc:
        raise MediaFetchError(f"image file not found: {shown}") from exc
    except PermissionError as exc:
        raise MediaAccessDeniedError(f"image file is not readable: {shown}") from exc
    except OSError as exc:
        raise MediaFetchError(f"image file could not be read: {shown} ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaFetchError(f"image path is not a regular file: {shown}")
        if info.st_size > settings.max_image_bytes:
            raise MediaTooLargeError(
                f"image is too large: {shown} has {info.st_size} bytes, over the limit of "
                f"{settings.max_image_bytes} bytes",
                detail={"num_bytes": info.st_size, "max_image_bytes": settings.max_image_bytes},
            )
    except BaseException:
        os.close(fd)
        raise
    try:
        with os.fdopen(fd, "rb") as file:  # owns (and closes) fd from here on
            data = file.read(settings.max_image_bytes + 1)
    except OSError as exc:
        raise MediaFetchError(f"image file could not be read: {shown} ({exc.strerror})") from exc
    if len(data) > settings.max_image_bytes:  # the file grew after fstat
        raise MediaTooLargeError(
            f"image is too large: {shown} has more than {settings.max_image_bytes} bytes"
        )
    return data


def _decode_base64(payload: str) -> bytes:
    compact = "".join(unquote_to_bytes(payload).decode("ascii", "replace").split())
    compact = compact.rstrip("=")
    compact += "=" * (-len(compact) % 4)
    urlsafe = "-" in compact or "_" in compact
    try:
        if urlsafe:
            return base64.b64decode(compact.translate(_URLSAFE), validate=True)
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"invalid data URI: the base64 data is malformed ({exc})") from exc


def _redact(url: str) -> str:
    """``url`` without its secrets: the user info, every query value (signed URLs carry their
    credentials there: ``X-Amz-Signature``, ``sig``, ``token``...; the keys stay) and the
    fragment (``#access_token=...``)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed '[': cut the same parts out by hand
        return _redact_unsplit(url)
    if "@" not in parts.netloc and not parts.query and not parts.fragment:
        return url  # as given (urlsplit would drop control characters the log must show)
    if "@" in parts.netloc:
        parts = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])
    if parts.query:
        fields = (f.partition("=") for f in parts.query.split("&"))
        parts = parts._replace(query="&".join(k + ("=***" if eq else "") for k, eq, _ in fields))
    if parts.fragment:
        parts = parts._replace(fragment="***")
    return urlunsplit(parts)


def _redact_unsplit(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    rest, secret = rest[:cut], rest[cut:]
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return scheme + sep + authority + slash + path + (secret[:1] + "***" if secret else "")


def _cap(text: str) -> str:
    if len(text) <= _MAX_DESCRIPTION:
        return text
    return f"{text[:_MAX_DESCRIPTION]}…({len(text)} chars)"


def _printable(text: str) -> str:
    """Escape control characters so a description cannot forge log lines."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
