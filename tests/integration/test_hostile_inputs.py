"""Hostile input against every endpoint: each case asserts its status and error text, then that
the service still answers a good request. SSRF forms, bombs, forged and corrupt files, malformed
JSON and multipart, wrong content types, huge and empty inputs, unicode edge cases."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import os
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipserve.api.app import create_app
from clipserve.config import Settings
from clipserve.testing import FakeLoader

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"
EMB = "/v1/embeddings"
RANK = "/v1/rank"
CLASSIFY = "/v1/classify"
UPLOAD = "/v1/embeddings/images"
REFUSED = "image URL refused"
REGISTRY = {
    "fast": {"model_name": "fake-fast"},
    "accurate": {"model_name": "fake-accurate"},
    "minilm": {"model_name": "fake-text", "backend": "sentence-transformers"},
    "broken": {"model_name": "fake-broken"},
    "hidden": {"model_name": "fake-hidden", "enabled": False},
}


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size and has no pixels: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _media(photo: Image.Image) -> dict[str, bytes]:
    small = photo.resize((96, 96))
    frames = [small.rotate(a) for a in (0, 30, 60)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    png = _encode(small, "PNG")
    jpeg = _encode(small, "JPEG")
    return {
        "png": png,
        "jpeg": jpeg,
        "gif_animated": gif.getvalue(),
        "webp": _encode(small, "WEBP"),
        "bmp": _encode(small, "BMP"),
        "tiff": _encode(small, "TIFF"),
        "png_rgba": _encode(small.convert("RGBA"), "PNG"),
        "png_la": _encode(small.convert("LA"), "PNG"),
        "png_palette": _encode(small.convert("P"), "PNG"),
        "png_16bit": _encode(small.convert("I;16"), "PNG"),
        "png_1bit": _encode(small.convert("1"), "PNG"),
        "jpeg_cmyk": _encode(small.convert("CMYK"), "JPEG"),
        "jpeg_gray": _encode(small.convert("L"), "JPEG"),
        "png_1x1": _encode(Image.new("RGB", (1, 1), "red"), "PNG"),
        "png_tall": _encode(Image.new("RGB", (1, 4000), "blue"), "PNG"),
        "jpeg_exif_rotated": _encode(small, "JPEG", exif=_orientation_exif(6)),
        "bomb_png": _png_header_only(100_000, 100_000),
        "bomb_png_100mp": _png_header_only(10_000, 10_000),  # under Pillow's own limit: ours acts
        "bomb_png_wide": _png_header_only(2**31 - 1, 1),
        "bomb_gif": gif.getvalue()[:6] + struct.pack("<HH", 65535, 65535) + gif.getvalue()[10:],
        "truncated_png": png[: len(png) // 2],
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
        "header_only_jpeg": jpeg[:20],
        "random": os.urandom(4096),
        "text": b"just some text, certainly not an image\n" * 10,
        "html": b"<html><body><img src=x onerror=alert(1)></body></html>",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        "pdf": b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF",
        "zip": b"PK\x03\x04" + b"\x00" * 100,
        "empty": b"",
        "nul": b"\x00" * 1024,
        "png_magic_only": b"\x89PNG\r\n\x1a\n",
        "png_bad_crc": png[:29] + b"\x00\x00\x00\x00" + png[33:],
        "jpeg_then_garbage": jpeg + os.urandom(512),
    }


def _orientation_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@dataclass(frozen=True)
class Case:
    id: str
    method: str
    path: str
    status: int
    message: str = ""
    """A fragment of the error message (for 2xx: empty)."""
    json: Any = None
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: Any = None
    data: Any = None
    media: str | None = None
    """The name of a media file whose data URI replaces "{media}" in the JSON body."""
    per_item: bool = False
    """200, with the message as the one failing item's error (batch results, rank results,
    classify data)."""
    max_response_bytes: int = 20_000
    """An answer never grows with what was sent: errors quote input short, list few problems."""
    forbidden: str | None = None
    """Text the answer must not hold (a secret of the input)."""


def _c(id_: str, method: str, path: str, status: int, message: str = "", **kw: Any) -> Case:
    return Case(id_, method, path, status, message, **kw)


# --- SSRF: every spelling of a private address, any endpoint that takes URLs ----------------------

SSRF_URLS = [
    ("loopback", "http://127.0.0.1/a.png", "127.0.0.1, a loopback"),
    ("loopback-other", "http://127.9.8.7/a.png", "a loopback"),
    ("loopback-short", "http://127.1/a.png", "a loopback"),
    ("loopback-decimal", "http://2130706433/a.png", "a loopback"),
    ("loopback-hex", "http://0x7f000001/a.png", "a loopback"),
    ("loopback-octal", "http://0177.0.0.1/a.png", "a loopback"),
    ("loopback-hex-dotted", "http://0x7f.0.0.1/a.png", "a loopback"),
    ("loopback-v6", "http://[::1]/a.png", "a loopback"),
    ("loopback-v4-mapped", "http://[::ffff:127.0.0.1]/a.png", "a loopback"),
    ("loopback-v4-mapped-hex", "http://[::ffff:7f00:1]/a.png", "a loopback"),
    ("loopback-nat64", "http://[64:ff9b::7f00:1]/a.png", "a loopback"),
    ("loopback-6to4", "http://[2002:7f00:1::]/a.png", "a loopback"),
    ("localhost", "http://localhost/a.png", REFUSED),
    ("localhost-mixed-case", "http://LocalHost/a.png", REFUSED),
    ("loopback-creds", "http://user:pw@127.0.0.1/a.png", "a loopback"),
    ("loopback-port-22", "http://127.0.0.1:22/a.png", "a loopback"),
    ("loopback-https", "https://127.0.0.1/a.png", "a loopback"),
    ("unspecified", "http://0.0.0.0/a.png", "an unspecified"),
    ("unspecified-zero", "http://0/a.png", "an unspecified"),
    ("unspecified-v6", "http://[::]/a.png", "an unspecified"),
    ("metadata", "http://169.254.169.254/latest/meta-data/", "a link-local"),
    ("metadata-decimal", "http://2852039166/latest/", "a link-local"),
    ("metadata-v4-mapped", "http://[::ffff:a9fe:a9fe]/latest/", "a link-local"),
    ("link-local-v6", "http://[fe80::1]/a.png", "a link-local"),
    ("private-10", "http://10.0.0.1/a.png", "a private"),
    ("private-10-short", "http://10.1/a.png", "a private"),
    ("private-10-octal", "http://012.0.0.1/a.png", "a private"),
    ("private-10-hex", "http://0x0a.0.0.1/a.png", "a private"),
    ("private-172", "http://172.16.0.1/a.png", "a private"),
    ("private-172-top", "http://172.31.255.255/a.png", "a private"),
    ("private-192", "http://192.168.1.1/a.png", "a private"),
    ("private-192-decimal", "http://3232235777/a.png", "a private"),
    ("private-192-hex", "http://0xc0a80101/a.png", "a private"),
    ("unique-local-v6", "http://[fc00::1]/a.png", "a private"),
    ("unique-local-v6-fd", "http://[fd12:3456::1]/a.png", "a private"),
    ("multicast", "http://224.0.0.1/a.png", "a multicast"),
    ("multicast-v6", "http://[ff02::1]/a.png", "a multicast"),
    ("broadcast", "http://255.255.255.255/a.png", REFUSED),
    ("cgnat", "http://100.64.0.1/a.png", "a non-public"),
    ("benchmark-net", "http://198.18.0.1/a.png", REFUSED),
    ("reserved", "http://240.0.0.1/a.png", REFUSED),
]
SCHEMES = [
    ("file", "file:///etc/passwd", 415, "unsupported image URL scheme 'file'"),
    ("ftp", "ftp://example.com/a.png", 415, "unsupported image URL scheme 'ftp'"),
    ("gopher", "gopher://127.0.0.1:70/_x", 415, "unsupported image URL scheme 'gopher'"),
    ("dict", "dict://127.0.0.1:11211/stats", 415, "unsupported image URL scheme 'dict'"),
    ("ldap", "ldap://127.0.0.1/x", 415, "unsupported image URL scheme 'ldap'"),
    ("javascript", "javascript:alert(1)", 415, "unsupported image URL scheme 'javascript'"),
    ("jar", "jar:http://x/a.jar!/a.png", 415, "unsupported image URL scheme 'jar'"),
    ("smb", "smb://127.0.0.1/share/a.png", 415, "unsupported image URL scheme 'smb'"),
]

CASES: list[Case] = []
for name, url, message in SSRF_URLS:
    CASES.append(
        _c(
            f"ssrf-single-{name}",
            "POST",
            SINGLE,
            400,
            message,
            json={"image_input": url, "text_prompt": "x"},
        )
    )
    CASES.append(
        _c(
            f"ssrf-embeddings-{name}",
            "POST",
            EMB,
            400,
            message,
            json={"model": "fast", "input": [url], "modality": "image"},
        )
    )
for name, url in (("loopback", "http://127.0.0.1/a.png"), ("metadata", "http://169.254.169.254/")):
    CASES += [
        _c(
            f"ssrf-batch-{name}",
            "POST",
            BATCH,
            200,
            "image URL refused",
            per_item=True,
            json={"evaluations": [{"image_input": url, "text_prompt": "x"}]},
        ),
        _c(
            f"ssrf-rank-{name}",
            "POST",
            RANK,
            200,
            "image URL refused",
            per_item=True,
            json={
                "query": "q",
                "documents": [url, {"text": "a text"}],
                "documents_modality": "image",
            },
        ),
        _c(
            f"ssrf-rank-query-{name}",
            "POST",
            RANK,
            400,
            "query: image URL refused",
            json={"query": {"image": url}, "documents": ["a text"]},
        ),
        _c(
            f"ssrf-classify-{name}",
            "POST",
            CLASSIFY,
            200,
            "image URL refused",
            per_item=True,
            json={"input": url, "labels": ["a", "b"]},
        ),
        _c(
            f"ssrf-image-url-part-{name}",
            "POST",
            EMB,
            400,
            "image URL refused",
            json={"input": [{"type": "image_url", "image_url": {"url": url}}]},
        ),
    ]
for name, url, status, message in SCHEMES:
    CASES.append(
        _c(
            f"scheme-single-{name}",
            "POST",
            SINGLE,
            status,
            message,
            json={"image_input": url, "text_prompt": "x"},
        )
    )
    CASES.append(
        _c(
            f"scheme-embeddings-{name}",
            "POST",
            EMB,
            status,
            message,
            json={"input": [url], "modality": "image"},
        )
    )
CASES += [
    _c(
        "url-no-host",
        "POST",
        SINGLE,
        400,
        "it has no host",
        json={"image_input": "http:///a.png", "text_prompt": "x"},
    ),
    _c(
        "url-bad-port",
        "POST",
        SINGLE,
        400,
        "invalid image URL",
        json={"image_input": "http://example.com:99999/a.png", "text_prompt": "x"},
    ),
    _c(
        "url-space-host",
        "POST",
        SINGLE,
        400,
        "has characters a host name cannot have",
        json={"image_input": "http://exa mple.com/a.png", "text_prompt": "x"},
    ),
    _c(
        "url-percent-host",
        "POST",
        SINGLE,
        400,
        "has characters a host name cannot have",
        json={"image_input": "http://exa%2fmple.com/a.png", "text_prompt": "x"},
    ),
    _c(
        "url-dollar-host",
        "POST",
        SINGLE,
        400,
        "has characters a host name cannot have",
        json={"image_input": "http://a$b.example/a.png", "text_prompt": "x"},
    ),
    _c(
        "url-blank",
        "POST",
        SINGLE,
        422,
        "image_input is empty",
        json={"image_input": "   ", "text_prompt": "x"},
    ),
    _c(
        "url-blank-batch",
        "POST",
        BATCH,
        200,
        "image_input is empty",
        per_item=True,
        json={"evaluations": [{"image_input": "   ", "text_prompt": "x"}]},
    ),
    _c(
        "url-blank-classify",
        "POST",
        CLASSIFY,
        200,
        "image input is empty",
        per_item=True,
        json={"input": [" "], "labels": ["a"]},
    ),
]

# --- compressed request bodies: refused before anything is inflated ----------------------------

for encoding in ("gzip", "deflate", "br", "gzip, gzip", "x-bogus"):
    CASES.append(
        _c(
            f"compressed-body-{encoding.replace(', ', '-')}",
            "POST",
            EMB,
            415,
            f"Content-Encoding '{encoding}' are not accepted",
            content=gzip.compress(json.dumps({"input": "x" * 10_000}).encode()),
            headers={"content-type": "application/json", "content-encoding": encoding},
        )
    )

# --- amplification: sizes are checked on what will be built; errors stay small ----------------

LONG = "x" * 100_000
CASES += [
    _c(
        "amplify-classify-template",
        "POST",
        CLASSIFY,
        422,
        "labels[0]: its prompt would be 9999900 characters long",
        json={"input": "{media}", "labels": ["y" * 99_999], "template": "{}" * 100},
        media="png",
    ),
    _c(
        "amplify-classify-one-long-label",
        "POST",
        CLASSIFY,
        422,
        "labels[1]: its prompt would be",
        json={"input": "{media}", "labels": ["cat", LONG]},
        media="png",
    ),
    _c(
        "amplify-batch-5000-empty-items",
        "POST",
        BATCH,
        422,
        "(and 9999 more problems; the detail lists the first 20)",
        json={"evaluations": [{}] * 5000},
    ),
    _c(
        "amplify-unknown-model-long-name",
        "POST",
        EMB,
        404,
        "… (100000 characters)' is unknown",
        json={"model": LONG, "input": "x"},
    ),
    _c(
        "amplify-unknown-model-long-name-batch",
        "POST",
        BATCH,
        200,
        "… (100000 characters)' is unknown",
        per_item=True,
        json={"evaluations": [{"image_input": "x", "text_prompt": "y", "model_config_name": LONG}]},
    ),
    _c(
        "amplify-long-field-name",
        "POST",
        EMB,
        422,
        "request validation failed",
        content=json.dumps(
            {"input": "x", "encoding_format": "float", "dimensions": "x" * 150_000}
        ).encode(),
        headers={"content-type": "application/json"},
    ),
    _c(
        "amplify-long-prompt-echo",
        "POST",
        BATCH,
        200,
        "text is 100000 characters long; the limit is 10000",
        per_item=True,
        json={"evaluations": [{"image_input": "{media}", "text_prompt": LONG}]},
        media="png",
    ),
]

# --- host names a resolver would choke on: refused before any lookup, never a 500 ------------

for name, host, message in (
    ("empty-label", "a..example", "an empty label"),
    ("long-label", "a" * 64 + ".example", "longer than 63 characters"),
    ("digits-5000", "1" * 5000, "has characters a host name cannot have"),
    ("zero-padded-octal", "0" * 300 + "177.0.0.1", "is 127.0.0.1, a loopback"),  # inet_aton's
):
    CASES.append(
        _c(
            f"host-{name}",
            "POST",
            SINGLE,
            400,
            message,
            json={"image_input": f"http://{host}/a.png", "text_prompt": "x"},
            max_response_bytes=5_000,
        )
    )

# --- signed URLs: query values are never echoed (nor logged) ------------------------------------

SIGNED = "http://127.0.0.1/a.png?X-Amz-Signature=SECRETSIG&token=SECRETTOKEN&sig=SECRET"
CASES.append(
    _c(
        "signed-url-is-redacted",
        "POST",
        BATCH,
        200,
        "image URL refused: host '127.0.0.1' is 127.0.0.1",
        per_item=True,
        json={"evaluations": [{"image_input": SIGNED, "text_prompt": "x"}]},
        forbidden="SECRET",
    )
)

# --- local paths ----------------------------------------------------------------------------------

PATHS = [
    ("traversal", "../../../../etc/passwd", 400, "outside the media root"),
    ("absolute", "/etc/passwd", 400, "outside the media root"),
    ("proc", "/proc/self/environ", 400, "outside the media root"),
    ("dev-zero", "/dev/zero", 400, "outside the media root"),
    ("symlink-escape", "escape.png", 400, "outside the media root"),
    ("missing", "missing.png", 400, "image file not found"),
    ("directory", "subdir", 400, "not a regular file"),
    ("fifo", "pipe.png", 400, "not a regular file"),
    ("text-named-jpg", "notes.jpg", 400, "image could not be decoded"),
    ("empty-file", "empty.png", 400, "the data is empty"),
    ("nul-in-path", "a\x00b.png", 400, "invalid image path"),
    ("windows-unc", "\\\\127.0.0.1\\share\\a.png", 400, "image file not found"),
    ("scheme-relative", "//127.0.0.1/a.png", 400, "outside the media root"),
    ("encoded-traversal", "..%2f..%2fetc%2fpasswd", 400, "image file not found"),
]
for name, path, status, message in PATHS:
    CASES.append(
        _c(
            f"path-{name}",
            "POST",
            SINGLE,
            status,
            message,
            json={"image_input": path, "text_prompt": "x"},
        )
    )

# --- media: data URIs of forged, corrupt, bomb and odd-but-fine images ----------------------------

MEDIA = [
    ("png", 200, ""),
    ("jpeg", 200, ""),
    ("gif_animated", 200, ""),  # the first frame
    ("webp", 200, ""),
    ("bmp", 200, ""),
    ("tiff", 200, ""),
    ("png_rgba", 200, ""),
    ("png_la", 200, ""),
    ("png_palette", 200, ""),
    ("png_16bit", 200, ""),
    ("png_1bit", 200, ""),
    ("jpeg_cmyk", 200, ""),
    ("jpeg_gray", 200, ""),
    ("png_1x1", 200, ""),
    ("png_tall", 200, ""),
    ("jpeg_exif_rotated", 200, ""),
    ("jpeg_then_garbage", 200, ""),
    ("bomb_png", 413, "image is too large"),
    ("bomb_png_wide", 413, "image is too large"),
    ("bomb_gif", 413, "image is too large"),
    ("bomb_png_100mp", 413, "10000x10000 = 100000000 pixels exceeds the limit of 50000000"),
    ("truncated_png", 400, "image could not be decoded"),
    ("truncated_jpeg", 400, "image could not be decoded"),
    ("header_only_jpeg", 400, "image could not be decoded"),
    ("random", 400, "image could not be decoded"),
    ("text", 400, "image could not be decoded"),
    ("html", 400, "image could not be decoded"),
    ("svg", 400, "image could not be decoded"),
    ("pdf", 400, "image could not be decoded"),
    ("zip", 400, "image could not be decoded"),
    ("nul", 400, "image could not be decoded"),
    ("png_magic_only", 400, "image could not be decoded"),
    ("png_bad_crc", 400, "image could not be decoded"),
    ("empty", 400, "invalid data URI: the data is empty"),
]
for name, status, message in MEDIA:
    for endpoint, body in (
        ("single", {"image_input": "{media}", "text_prompt": "a photo"}),
        ("embeddings", {"input": ["{media}"], "modality": "image"}),
        ("classify", {"input": "{media}", "labels": ["a photo", "a drawing"]}),
    ):
        path = {"single": SINGLE, "embeddings": EMB, "classify": CLASSIFY}[endpoint]
        per_item = endpoint == "classify" and status >= 400  # an image fails alone there
        CASES.append(
            _c(
                f"media-{endpoint}-{name}",
                "POST",
                path,
                200 if per_item else status,
                message,
                json=body,
                media=name,
                per_item=per_item,
            )
        )

DATA_URIS = [
    ("text-plain-mime", "data:text/plain;base64,aGVsbG8=", 415, "data URI media type 'text/plain'"),
    ("svg-mime", "data:image/svg+xml;base64,PHN2Zy8+", 415, "data URI media type 'image/svg+xml'"),
    (
        "json-mime",
        "data:application/json;base64,e30=",
        415,
        "data URI media type 'application/json'",
    ),
    (
        "html-mime",
        "data:text/html,<script>alert(1)</script>",
        415,
        "data URI media type 'text/html'",
    ),
    ("no-comma", "data:image/png;base64", 400, "missing ','"),
    ("bad-base64", "data:image/png;base64,!!!notbase64!!!", 400, "base64 data is malformed"),
    ("empty-data", "data:image/png;base64,", 400, "the data is empty"),
    ("percent-encoded-junk", "data:image/png,%00%01%02", 400, "image could not be decoded"),
]
for name, uri, status, message in DATA_URIS:
    CASES.append(
        _c(
            f"datauri-single-{name}",
            "POST",
            SINGLE,
            status,
            message,
            json={"image_input": uri, "text_prompt": "x"},
        )
    )
    CASES.append(
        _c(
            f"datauri-embeddings-{name}",
            "POST",
            EMB,
            status,
            message,
            json={"input": [uri], "modality": "image"},
        )
    )

# --- JSON: malformed bodies and wrong types, on every JSON endpoint -------------------------------

JSON_ENDPOINTS = {
    "single": SINGLE,
    "batch": BATCH,
    "embed": "/embed",
    "embeddings": EMB,
    "rank": RANK,
    "classify": CLASSIFY,
}
RAW_BODIES = [
    ("truncated", b'{"a": ', 422, "validation failed"),
    ("garbage", b"\x00\xff\xfe garbage", 400, "error parsing the body"),
    ("array", b"[1, 2, 3]", 422, "validation failed"),
    ("null", b"null", 422, "validation failed"),
    ("number", b"42", 422, "validation failed"),
    ("string", b'"hello"', 422, "validation failed"),
    ("empty-object", b"{}", 422, "validation failed"),
    ("nan", b'{"input_text": NaN}', 422, "validation failed"),
    ("deep-nesting", b"[" * 50_000 + b"]" * 50_000, 400, "error parsing the body"),
    ("bom", b'\xef\xbb\xbf{"input_text": "x"}', 422, ""),
    ("lone-surrogate-escape", b'{"input_text": "\\ud800", "text_prompt": "\\udfff"}', 422, ""),
]
for endpoint, path in JSON_ENDPOINTS.items():
    for name, body, status, message in RAW_BODIES:
        if endpoint == "embed" and name in ("lone-surrogate-escape", "bom"):
            continue  # valid for /embed: covered below as unicode cases
        CASES.append(
            _c(
                f"json-{endpoint}-{name}",
                "POST",
                path,
                status,
                message,
                content=body,
                headers={"content-type": "application/json"},
            )
        )
    CASES.append(
        _c(
            f"content-type-text-{endpoint}",
            "POST",
            path,
            422,
            "validation failed",
            content=b'{"input_text": "x"}',
            headers={"content-type": "text/plain"},
        )
    )
    CASES.append(_c(f"method-get-{endpoint}", "GET", path, 405, "Method Not Allowed"))

WRONG_TYPES = [
    ("single-text-int", SINGLE, {"image_input": "x", "text_prompt": 5}, "text_prompt"),
    ("single-image-list", SINGLE, {"image_input": ["x"], "text_prompt": "x"}, "image_input"),
    (
        "single-model-int",
        SINGLE,
        {"image_input": "x", "text_prompt": "x", "model_config_name": 3},
        "model_config_name",
    ),
    ("batch-empty", BATCH, {"evaluations": []}, "evaluations"),
    ("batch-not-list", BATCH, {"evaluations": {"image_input": "x"}}, "evaluations"),
    (
        "batch-size-zero",
        BATCH,
        {"evaluations": [{"image_input": "x", "text_prompt": "y"}], "batch_size": 0},
        "batch_size",
    ),
    (
        "batch-size-huge",
        BATCH,
        {"evaluations": [{"image_input": "x", "text_prompt": "y"}], "batch_size": 10**30},
        "batch_size",
    ),
    (
        "batch-size-float",
        BATCH,
        {"evaluations": [{"image_input": "x", "text_prompt": "y"}], "batch_size": 1.5},
        "batch_size",
    ),
    (
        "batch-size-string",
        BATCH,
        {"evaluations": [{"image_input": "x", "text_prompt": "y"}], "batch_size": "big"},
        "batch_size",
    ),
    ("embed-empty", "/embed", {"input_text": ""}, "input_text"),
    ("embed-too-long", "/embed", {"input_text": "x" * 1025}, "input_text"),
    ("embed-null", "/embed", {"input_text": None}, "input_text"),
    ("embeddings-input-dict", EMB, {"input": {"text": "x"}}, "input"),
    ("embeddings-mixed-types", EMB, {"input": ["x", 1]}, "input"),
    ("embeddings-format", EMB, {"input": "x", "encoding_format": "binary"}, "encoding_format"),
    ("embeddings-dimensions-negative", EMB, {"input": "x", "dimensions": -4}, "dimensions"),
    ("embeddings-modality", EMB, {"input": "x", "modality": "audio"}, "modality"),
    ("embeddings-item-both", EMB, {"input": [{"text": "x", "image": "y"}]}, "input"),
    ("embeddings-item-empty", EMB, {"input": [{}]}, "input"),
    ("rank-no-documents", RANK, {"query": "q"}, "documents"),
    ("rank-top-n-zero", RANK, {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
    ("rank-query-null", RANK, {"query": None, "documents": ["a"]}, "query"),
    ("classify-labels-empty", CLASSIFY, {"input": "x", "labels": []}, "labels"),
    ("classify-labels-not-list", CLASSIFY, {"input": "x", "labels": "cat"}, "labels"),
    (
        "classify-template-short",
        CLASSIFY,
        {"input": "x", "labels": ["a"], "template": "{"},
        "template",
    ),
]
for name, path, body, where in WRONG_TYPES:
    CASES.append(
        _c(f"type-{name}", "POST", path, 422, f"request validation failed: {where}", json=body)
    )
CASES.append(
    _c(
        "single-image-empty",
        "POST",
        SINGLE,
        422,
        "image_input is empty",
        json={"image_input": "", "text_prompt": "x"},
    )
)

LIMITS = [
    (
        "batch-over-limit",
        BATCH,
        {"evaluations": [{"image_input": "x", "text_prompt": "y"}] * 21},
        422,
        "the request has 21 evaluations; the limit is 20",
    ),
    (
        "embeddings-over-limit",
        EMB,
        {"input": ["x"] * 21},
        422,
        "the request has 21 inputs; the limit is 20",
    ),
    (
        "rank-over-limit",
        RANK,
        {"query": "q", "documents": ["d"] * 21},
        422,
        "the request has 21 documents; the limit is 20",
    ),
    (
        "classify-over-limit",
        CLASSIFY,
        {"input": ["x"] * 21, "labels": ["a"]},
        422,
        "the request has 21 images; the limit is 20",
    ),
    (
        "prompt-over-limit",
        SINGLE,
        {"image_input": "{media}", "text_prompt": "x" * 10_001},
        422,
        "limit is 10000",
    ),
    ("embeddings-prompt-over-limit", EMB, {"input": ["x" * 10_001]}, 422, "limit is 10000"),
    ("body-over-limit", EMB, {"input": "x" * 300_000}, 413, "over the limit of 200000 bytes"),
    ("token-ids", EMB, {"input": [1, 2, 3]}, 422, "token-id inputs are not supported"),
    ("token-id-lists", EMB, {"input": [[1, 2], [3]]}, 422, "token-id inputs are not supported"),
    ("empty-string-input", EMB, {"input": ""}, 422, "input[0] is an empty string"),
    (
        "template-without-slot",
        CLASSIFY,
        {"input": "{media}", "labels": ["a"], "template": "a photo"},
        422,
        "template must contain '{}'",
    ),
    (
        "blank-label",
        CLASSIFY,
        {"input": "{media}", "labels": ["a", "  "]},
        422,
        "labels must not be empty strings",
    ),
    (
        "dimensions-refused",
        EMB,
        {"input": "x", "dimensions": 8},
        422,
        "cannot return 8-dimensional embeddings",
    ),
]
for name, path, body, status, message in LIMITS:
    CASES.append(_c(f"limit-{name}", "POST", path, status, message, json=body, media="png"))

MODELS = [
    ("unknown", "nope", 404, "model config 'nope' is unknown"),
    ("disabled", "hidden", 404, "model config 'hidden' is disabled"),
    ("traversal", "../../etc/passwd", 404, "is unknown"),
    ("very-long", "m" * 5000, 404, "is unknown"),
    ("unicode", "modèle-ü", 404, "is unknown"),
    ("broken", "broken", 503, "unavailable"),
    ("text-only-for-images", "minilm", 400, "cannot encode image inputs"),
]
for name, model, status, message in MODELS:
    CASES.append(
        _c(
            f"model-single-{name}",
            "POST",
            SINGLE,
            status,
            message,
            json={"image_input": "{media}", "text_prompt": "x", "model_config_name": model},
            media="png",
        )
    )
    CASES.append(
        _c(
            f"model-embeddings-{name}",
            "POST",
            EMB,
            status,
            message,
            json={"model": model, "input": ["{media}"], "modality": "image"},
            media="png",
        )
    )

# --- unicode: odd but legal texts are served; the limits hold -------------------------------------

UNICODE = [
    ("emoji", "a cat 🐈‍⬛ on a 🛋️"),
    ("rtl", "قطة على أريكة"),
    ("cjk", "沙发上的猫"),
    ("zero-width", "a\u200bc\u200da\u2060t"),
    ("combining", "ca\u0301t" * 50),
    ("control", "a\x01b\x1bc\x7f"),
    ("nul", "a\x00cat"),
    ("bidi-override", "\u202ecat a\u202c"),
    ("long-unicode", "猫" * 1024),
    ("newlines", "a\ncat\r\nin\tspace"),
    ("whitespace-only", " \t\n "),
]
SURROGATE = "\ud800cat"
CASES += [
    _c(
        "surrogate-model-name",
        "POST",
        EMB,
        404,
        "is unknown",
        json={"model": SURROGATE, "input": "x"},
    ),
    _c(
        "surrogate-model-name-eval",
        "POST",
        SINGLE,
        404,
        "is unknown",
        json={"image_input": "{media}", "text_prompt": "x", "model_config_name": SURROGATE},
        media="png",
    ),
    _c(
        "surrogate-embed",
        "POST",
        "/embed",
        422,
        "validation failed",
        json={"input_text": SURROGATE},
    ),
    _c(
        "surrogate-single",
        "POST",
        SINGLE,
        422,
        "unpaired UTF-16 surrogate",
        json={"image_input": "{media}", "text_prompt": SURROGATE},
        media="png",
    ),
    _c(
        "surrogate-embeddings",
        "POST",
        EMB,
        422,
        "unpaired UTF-16 surrogate",
        json={"input": ["ok", SURROGATE]},
    ),
    _c(
        "surrogate-batch",
        "POST",
        BATCH,
        200,
        "unpaired UTF-16 surrogate",
        per_item=True,
        json={"evaluations": [{"image_input": "{media}", "text_prompt": SURROGATE}]},
        media="png",
    ),
    _c(
        "surrogate-classify-label",
        "POST",
        CLASSIFY,
        422,
        "unpaired UTF-16 surrogate",
        json={"input": "{media}", "labels": [SURROGATE]},
        media="png",
    ),
    _c(
        "surrogate-rank-query",
        "POST",
        RANK,
        422,
        "unpaired UTF-16 surrogate",
        json={"query": SURROGATE, "documents": ["a"]},
    ),
]
for name, text in UNICODE:
    blank = not text.strip()  # seed 003: "Text cannot be empty or whitespace-only"
    CASES.append(
        _c(
            f"unicode-embed-{name}",
            "POST",
            "/embed",
            422 if blank else 200,
            "the text is empty" if blank else "",
            json={"input_text": text[:1024]},
        )
    )
    CASES.append(
        _c(
            f"unicode-single-{name}",
            "POST",
            SINGLE,
            422 if blank else 200,
            "text_prompt is empty" if blank else "",
            json={"image_input": "{media}", "text_prompt": text},
            media="png",
        )
    )

# --- multipart ------------------------------------------------------------------------------------

CASES += [
    _c(
        "multipart-classify-no-files",
        "POST",
        CLASSIFY,
        422,
        "validation failed",
        data={"labels": ["a"]},
        files=[("other", ("x.txt", b"x", "text/plain"))],
    ),
    _c(
        "multipart-classify-text-file",
        "POST",
        CLASSIFY,
        200,
        "image could not be decoded",
        per_item=True,
        data={"labels": ["a"]},
        files=[("files", ("x.png", b"not an image", "image/png"))],
    ),
    _c(
        "multipart-classify-empty-file",
        "POST",
        CLASSIFY,
        200,
        "the data is empty",
        per_item=True,
        data={"labels": ["a"]},
        files=[("files", ("e.png", b"", "image/png"))],
    ),
    _c(
        "multipart-classify-bad-json-labels",
        "POST",
        CLASSIFY,
        422,
        "labels: not a valid JSON array",
        data={"labels": "[oops"},
        files=[("files", ("x.png", b"x", "image/png"))],
    ),
    _c(
        "multipart-classify-json-not-strings",
        "POST",
        CLASSIFY,
        422,
        "array of strings",
        data={"labels": "[1, 2]"},
        files=[("files", ("x.png", b"x", "image/png"))],
    ),
    _c(
        "multipart-rank-both-queries",
        "POST",
        RANK,
        422,
        "exactly one of 'query'",
        data={"query": "q", "documents": ["a"]},
        files=[("query_file", ("q.png", b"x", "image/png"))],
    ),
    _c("form-rank-no-documents", "POST", RANK, 422, "exactly one", data={"query": "q"}),
    _c("form-rank-texts", "POST", RANK, 200, data={"query": "q", "documents": ["a", "b"]}),
    _c(
        "multipart-upload-no-files",
        "POST",
        UPLOAD,
        422,
        "validation failed",
        data={"model": "fast"},
    ),
    _c(
        "multipart-upload-text",
        "POST",
        UPLOAD,
        400,
        "image could not be decoded",
        files=[("files", ("a.txt", b"hello", "text/plain"))],
    ),
    _c(
        "multipart-no-boundary",
        "POST",
        UPLOAD,
        400,
        "Missing boundary",
        content=b"--x\r\n\r\n",
        headers={"content-type": "multipart/form-data"},
    ),
    _c(
        "multipart-bad-boundary",
        "POST",
        UPLOAD,
        400,
        "Invalid multipart data",
        content=b"garbage without parts",
        headers={"content-type": "multipart/form-data; boundary=abc"},
    ),
    _c(
        "multipart-truncated",
        "POST",
        CLASSIFY,
        422,
        "",
        content=b'--abc\r\nContent-Disposition: form-data; name="labels"\r\n\r\ncat',
        headers={"content-type": "multipart/form-data; boundary=abc"},
    ),
    _c(
        "multipart-json-on-upload-only-route",
        "POST",
        UPLOAD,
        422,
        "validation failed",
        json={"files": []},
    ),
]

# --- routes, methods, headers --------------------------------------------------------------------

CASES += [
    _c("unknown-path", "GET", "/v1/nothing-here", 404, "Not Found"),
    _c("unknown-path-traversal", "GET", "/../../etc/passwd", 404, "Not Found"),
    _c("unknown-model-info", "GET", "/v1/system/models/nope/info", 404, "is unknown"),
    _c("delete-embeddings", "DELETE", EMB, 405, "Method Not Allowed"),
    _c("put-classify", "PUT", CLASSIFY, 405, "Method Not Allowed"),
    _c(
        "bad-request-id",
        "POST",
        "/embed",
        200,
        json={"input_text": "x"},
        headers={"x-request-id": "\x00" * 10 + "../" * 100},
    ),
    _c(
        "huge-header",
        "POST",
        "/embed",
        200,
        json={"input_text": "x"},
        headers={"x-junk": "j" * 20_000},
    ),
    _c(
        "unknown-fields-evaluation",
        "POST",
        SINGLE,
        200,
        json={"image_input": "{media}", "text_prompt": "x", "extra": {"nested": [1]}},
        media="png",
    ),
]


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-media")
    (root / "subdir").mkdir()
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("these are notes, not a photo\n")
    os.mkfifo(root / "pipe.png")
    (root / "escape.png").symlink_to("/etc/passwd")
    return root


@pytest.fixture(scope="module")
def media(photos: dict[str, Any]) -> dict[str, bytes]:
    return _media(photos["astronaut"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(media_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """One service for the whole module: every hostile case hits the same app, which must keep
    answering good requests throughout."""
    config = media_root / "models.json"
    config.write_text(json.dumps(REGISTRY))
    settings = Settings(
        config_path=config,
        config_reload_interval_s=0,
        media={"allow_private_urls": False, "media_root": media_root},
        server={"max_batch_items": 20, "max_body_bytes": 200_000, "max_images_per_request": 20},
    )
    app = create_app(settings, loader=FakeLoader())
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


def _fill(value: Any, uri: str) -> Any:
    if isinstance(value, str):
        return uri if value == "{media}" else value
    if isinstance(value, list):
        return [_fill(v, uri) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, uri) for k, v in value.items()}
    return value


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error["message"] if isinstance(error, dict) else error)


async def still_serves(client: Any, media: dict[str, bytes]) -> None:
    good = await client.post(SINGLE, json={"image_input": _uri(media["png"]), "text_prompt": "ok"})
    assert good.status_code == 200, good.text
    assert good.json()["clip_score"] is not None


def test_there_are_at_least_200_cases() -> None:
    assert len(CASES) >= 200
    assert len({case.id for case in CASES}) == len(CASES)  # distinct


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_hostile_input(client: Any, media: dict[str, bytes], case: Case) -> None:
    kwargs: dict[str, Any] = {"headers": case.headers}
    if case.json is not None:
        body = _fill(case.json, _uri(media[case.media])) if case.media else case.json
        kwargs["content"] = json.dumps(body).encode()
        kwargs["headers"] = {"content-type": "application/json", **case.headers}
    elif case.content is not None:
        kwargs["content"] = case.content
    if case.files is not None or case.data is not None:
        kwargs["files"] = case.files
        kwargs["data"] = case.data
    response = await client.request(case.method, case.path, **kwargs)

    assert response.status_code == case.status, response.text[:500]
    assert len(response.content) <= case.max_response_bytes, len(response.content)
    if case.forbidden is not None:
        assert case.forbidden not in response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if case.per_item:
        (failed,) = [r for r in body.get("results", body.get("data")) if r["error"] is not None]
        assert (
            failed.get("clip_score", failed.get("relevance_score", failed.get("top_label"))) is None
        )
        assert case.message in failed["error"]
    elif case.status >= 400:
        assert case.message in _message(body), body
        if not isinstance(body["error"], dict):
            assert set(body) == {"error", "detail"}
    await still_serves(client, media)


# --- property: any JSON at all gets a clean 2xx/4xx, never a 5xx ----------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(
    [
        "input",
        "input_text",
        "image_input",
        "text_prompt",
        "evaluations",
        "model",
        "labels",
        "query",
        "documents",
        "template",
        "modality",
        "encoding_format",
        "dimensions",
        "top_n",
    ]
)
_bodies = st.dictionaries(_field_names, _json, max_size=6) | _json


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(path=st.sampled_from(list(JSON_ENDPOINTS.values())), body=_bodies)
def test_any_json_gets_a_clean_answer(
    make_settings: Callable[..., Any], path: str, body: Any
) -> None:
    settings = make_settings(media={"allow_private_urls": False, "allowed_hosts": ["fuzz.invalid"]})

    async def run() -> None:
        app = create_app(settings, loader=FakeLoader())
        async with LifespanManager(app) as manager:
            transport = httpx.ASGITransport(app=manager.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                response = await client.post(path, json=body)
        assert response.status_code < 500, response.text[:500]
        if response.status_code >= 400:
            assert _message(response.json())

    asyncio.run(run())
