"""classify, describe, parse_data_uri and read_local_image."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
from PIL import Image

from clipserve.config import MediaSettings
from clipserve.errors import (
    InvalidImageError,
    MediaAccessDeniedError,
    MediaFetchError,
    MediaTooLargeError,
    UnsupportedMediaTypeError,
)
from clipserve.media import SourceKind, classify, describe, parse_data_uri, read_local_image

PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)

# --- classify -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("http://img.example/a.png", SourceKind.URL),
        ("HTTPS://IMG.EXAMPLE/A.PNG", SourceKind.URL),
        ("  https://img.example/a.png\n", SourceKind.URL),
        ("data:image/png;base64,AAAA", SourceKind.DATA_URI),
        ("DATA:image/png;base64,AAAA", SourceKind.DATA_URI),
        ("images/cat.png", SourceKind.PATH),
        ("/srv/images/cat.png", SourceKind.PATH),
        ("./a:b.png", SourceKind.PATH),
        ("c:/windows/cat.png", SourceKind.PATH),  # one letter: a drive, not a scheme
        (b"\x89PNG", SourceKind.BYTES),
        (bytearray(b"\x89PNG"), SourceKind.BYTES),
        (Image.new("RGB", (1, 1)), SourceKind.PIL),
    ],
)
def test_classify(value: str | bytes | Image.Image, kind: SourceKind) -> None:
    assert classify(value) is kind


@pytest.mark.parametrize(
    ("value", "scheme"),
    [
        ("ftp://img.example/a.png", "ftp"),
        ("file:///etc/passwd", "file"),
        ("FILE:/etc/passwd", "file"),
        ("gopher://127.0.0.1:6379/_INFO", "gopher"),
        ("javascript:alert(1)", "javascript"),
        ("s3://bucket/key.png", "s3"),
    ],
)
def test_classify_refuses_other_schemes(value: str, scheme: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        classify(value)
    assert str(caught.value) == (
        f"unsupported image URL scheme '{scheme}': use an http(s) URL, a data URI or a file path"
    )


@pytest.mark.parametrize("value", ["", "   \n"])
def test_classify_refuses_empty_strings(value: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        classify(value)
    assert str(caught.value) == (
        "image input is empty: expected an http(s) URL, a data URI or a file path"
    )


def test_classify_refuses_other_types() -> None:
    with pytest.raises(InvalidImageError, match=r"^unsupported image input type int: "):
        classify(42)  # type: ignore[arg-type]


# --- describe -------------------------------------------------------------------------------------


def test_describe() -> None:
    assert describe("https://img.example/a.png?x=1") == "https://img.example/a.png?x=***"
    assert describe(Image.new("RGBA", (512, 256))) == "<PIL image 512x256 RGBA>"
    assert describe(b"\x00" * 1234) == "<bytes: 1234>"
    assert describe("images/cat.png") == "images/cat.png"


def test_describe_abbreviates_data_uris() -> None:
    uri = "data:image/png;base64," + "iVBORw0KGgo" * 10_000
    assert describe(uri) == f"data:image/png;base64,iVBOR…({len(uri)} chars)"
    long_header = "data:image/png;" + "x" * 500 + ";base64,AAAA"
    assert describe(long_header).startswith("data:image/png;xxx")
    assert len(describe(long_header)) < 120


def test_describe_caps_urls_and_hides_credentials() -> None:
    long_url = "https://img.example/" + "a" * 1000
    assert describe(long_url) == f"{long_url[:200]}…({len(long_url)} chars)"
    assert describe("https://user:secret@img.example/a.png") == "https://***@img.example/a.png"
    signed = "https://bucket.s3.example/a.png?X-Amz-Credential=AKIA/x&X-Amz-Signature=f00d&flag"
    assert describe(signed) == (
        "https://bucket.s3.example/a.png?X-Amz-Credential=***&X-Amz-Signature=***&flag"
    )


def test_describe_hides_fragments_and_secrets_of_urls_it_cannot_split() -> None:
    assert describe("https://img.example/a.png#access_token=SECRET") == (
        "https://img.example/a.png#***"
    )
    # An unclosed '[' makes urlsplit raise: the same parts are cut out by hand.
    assert describe("http://[::1/a.png?token=SECRET") == "http://[::1/a.png?***"
    assert describe("http://user:SECRET@[::1/a.png") == "http://***@[::1/a.png"
    assert describe("http://[::1/a.png#SECRET") == "http://[::1/a.png#***"


def test_describe_escapes_control_characters() -> None:
    assert describe("http://img.example/a\r\nX-Injected: 1") == (
        "http://img.example/a\\r\\nX-Injected: 1"
    )


# --- parse_data_uri -------------------------------------------------------------------------------


def test_parse_base64_png() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG_1PX).decode()
    assert parse_data_uri(uri, max_bytes=1000) == ("image/png", PNG_1PX)


def test_parse_base64_jpeg(photo_bytes: Callable[..., bytes]) -> None:
    jpeg = photo_bytes("chelsea")
    uri = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    assert parse_data_uri(uri, max_bytes=len(jpeg)) == ("image/jpeg", jpeg)


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png," + quote_from_bytes(PNG_1PX),  # percent-encoded, no base64
        "data:Image/PNG;name=dot.png;base64," + base64.b64encode(PNG_1PX).decode(),
        "data:image/png;base64," + base64.encodebytes(PNG_1PX).decode(),  # line breaks
        "data:image/png;base64," + base64.b64encode(PNG_1PX).decode().rstrip("="),  # no padding
        "data:image/png;base64," + base64.urlsafe_b64encode(PNG_1PX).decode(),
        "data:image/png;base64," + base64.b64encode(PNG_1PX).decode().replace("=", "%3D"),
        "data:application/octet-stream;base64," + base64.b64encode(PNG_1PX).decode(),
    ],
)
def test_parse_other_encodings(uri: str) -> None:
    assert parse_data_uri(uri, max_bytes=1000)[1] == PNG_1PX


@pytest.mark.parametrize(
    ("uri", "mime"),
    [
        ("data:text/plain;base64,aGVsbG8=", "text/plain"),
        ("data:;base64,aGVsbG8=", "text/plain"),  # RFC 2397 default
        ("data:,hello", "text/plain"),
        ("data:text/html,<script>alert(1)</script>", "text/html"),
        ("data:image/svg+xml;base64,PHN2Zy8+", "image/svg+xml"),
        ("data:application/pdf;base64,JVBERi0=", "application/pdf"),
    ],
)
def test_parse_refuses_non_image_types(uri: str, mime: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError) as caught:
        parse_data_uri(uri, max_bytes=1000)
    assert str(caught.value) == (
        f"data URI media type '{mime}' is not a supported image type (expected image/*)"
    )


@pytest.mark.parametrize("payload", ["not base64!!", "AAAAA", "AA=A"])
def test_parse_refuses_broken_base64(payload: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        parse_data_uri("data:image/png;base64," + payload, max_bytes=1000)
    assert str(caught.value).startswith("invalid data URI: the base64 data is malformed (")


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png;base64", "invalid data URI: missing ',' before the data"),
        ("data:image/png;base64,", "invalid data URI: the data is empty"),
        ("image/png;base64,AAAA", "invalid data URI: it must start with 'data:'"),
    ],
)
def test_parse_refuses_malformed_uris(uri: str, message: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        parse_data_uri(uri, max_bytes=1000)
    assert str(caught.value) == message


def test_parse_refuses_oversized_payload_before_decoding() -> None:
    # Invalid base64 throughout: decoding it would raise InvalidImageError, so getting
    # MediaTooLargeError shows the size was judged from the encoded length alone.
    uri = "data:image/png;base64," + "!" * 10_000_000
    with pytest.raises(MediaTooLargeError) as caught:
        parse_data_uri(uri, max_bytes=1_000_000)
    assert str(caught.value) == (
        "image is too large: the data URI holds at least 7500000 bytes, over the limit of "
        "1000000 bytes"
    )


def test_parse_exact_size_limit() -> None:
    payload = b"\x01" * 101
    uri = "data:image/png;base64," + base64.b64encode(payload).decode()
    with pytest.raises(MediaTooLargeError) as caught:
        parse_data_uri(uri, max_bytes=100)
    assert str(caught.value) == "image is too large: 101 bytes exceeds the limit of 100 bytes"
    assert parse_data_uri(uri, max_bytes=101)[1] == payload


# --- read_local_image -----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    media = tmp_path / "media"
    (media / "sub").mkdir(parents=True)
    (media / "cat.png").write_bytes(PNG_1PX)
    (media / "sub" / "dog.png").write_bytes(PNG_1PX * 2)
    (tmp_path / "secret.png").write_bytes(b"secret")
    return media


def rooted(root: Path, **overrides: object) -> MediaSettings:
    return MediaSettings(media_root=root, **overrides)


def test_reads_files_inside_the_root(root: Path) -> None:
    settings = rooted(root)
    assert read_local_image(str(root / "cat.png"), settings) == PNG_1PX
    assert read_local_image("cat.png", settings) == PNG_1PX  # relative to the root
    assert read_local_image("sub/dog.png", settings) == PNG_1PX * 2
    assert read_local_image("sub/../cat.png", settings) == PNG_1PX


def test_symlink_inside_the_root_is_followed(root: Path) -> None:
    (root / "link.png").symlink_to(root / "sub" / "dog.png")
    assert read_local_image("link.png", rooted(root)) == PNG_1PX * 2


@pytest.mark.parametrize("path", ["../secret.png", "sub/../../secret.png", "{tmp}/secret.png"])
def test_paths_outside_the_root_are_refused(root: Path, path: str) -> None:
    path = path.format(tmp=root.parent)
    with pytest.raises(MediaAccessDeniedError) as caught:
        read_local_image(path, rooted(root))
    assert str(caught.value) == f"image path is outside the media root: {path}"


def test_symlink_escaping_the_root_is_refused(root: Path) -> None:
    (root / "escape.png").symlink_to(root.parent / "secret.png")
    (root / "escape-dir").symlink_to(root.parent)
    for path in ("escape.png", "escape-dir/secret.png"):
        with pytest.raises(MediaAccessDeniedError) as caught:
            read_local_image(path, rooted(root))
        assert str(caught.value) == f"image path is outside the media root: {path}"


def test_paths_are_disabled_without_a_root(root: Path) -> None:
    with pytest.raises(MediaAccessDeniedError) as caught:
        read_local_image(str(root / "cat.png"), MediaSettings())
    assert str(caught.value) == (
        "local image paths are disabled; set media.media_root to read images from a folder"
    )


def test_missing_file(root: Path) -> None:
    with pytest.raises(MediaFetchError) as caught:
        read_local_image("missing.png", rooted(root))
    assert str(caught.value) == "image file not found: missing.png"
    assert type(caught.value) is MediaFetchError


def test_directories_and_fifos_are_not_read(root: Path) -> None:
    os.mkfifo(root / "pipe.png")  # opening it for reading must not block
    for path in ("sub", "pipe.png"):
        with pytest.raises(MediaFetchError) as caught:
            read_local_image(path, rooted(root))
        assert str(caught.value) == f"image path is not a regular file: {path}"


def test_file_size_is_checked_before_reading(root: Path) -> None:
    with pytest.raises(MediaTooLargeError) as caught:
        read_local_image("sub/dog.png", rooted(root, max_image_bytes=len(PNG_1PX)))
    assert str(caught.value) == (
        f"image is too large: sub/dog.png has {2 * len(PNG_1PX)} bytes, over the limit of "
        f"{len(PNG_1PX)} bytes"
    )
