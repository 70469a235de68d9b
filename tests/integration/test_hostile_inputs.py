"""Hostile input against every endpoint: each case asserts its status, its error text and a bound on
its wall time (and, for the memory cases, on the growth of the serving process's resident memory),
then that the service still answers a good request. SSRF forms, bombs, forged and corrupt files,
malformed JSON and multipart, wrong content types, huge and empty inputs, unicode edge cases;
compressed bodies and fetched media, amplification, work done before authentication, tokenizer
cost, metric label cardinality, X-Forwarded-For, and what errors must not repeat (signed URLs,
resolved addresses).

Most cases run against one in-process service with the fake backend (``client``); the others
against a service that may fetch from a local test origin (``fetching``), one with API keys
(``secured``), one per case with rate limits behind proxies, and one serving a tiny real open_clip
model (``tiny``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import io
import ipaddress
import json
import os
import random
import string
import struct
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler
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
from clipserve.api.security import hash_key
from clipserve.config import Settings
from clipserve.models.loader import load_backend
from clipserve.testing import FakeLoader, QuietHTTPServer

SINGLE = "/evaluator/v1/evaluation/single"
BATCH = "/evaluator/v1/evaluation/batch"
EMB = "/v1/embeddings"
RANK = "/v1/rank"
CLASSIFY = "/v1/classify"
UPLOAD = "/v1/embeddings/images"
EMBED = "/embed"
JSON_ENDPOINTS = {
    "single": SINGLE,
    "batch": BATCH,
    "embed": EMBED,
    "embeddings": EMB,
    "rank": RANK,
    "classify": CLASSIFY,
}
POST_ENDPOINTS = {**JSON_ENDPOINTS, "upload": UPLOAD}
REFUSED = "image URL refused"
MIB = 2**20
CHUNK = 64 * 1024
"""The part size of streamed request bodies."""
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
    forbidden: tuple[str, ...] = ()
    """Texts the answer must not hold (a secret of the input, too long a quote of it)."""
    max_seconds: float = 5.0
    """The wall time the answer may take: hostile input must not cost the server seconds."""
    stream: bool = False
    """``content`` is sent as a chunked stream of CHUNK-sized parts (no Content-Length)."""
    max_pulled: int | None = None
    """With ``stream``: the most parts the server may read before answering (0: it answered from
    the headers alone)."""
    stall: bool = False
    """With ``stream``: after ``content`` the body never ends (a slow-loris client)."""
    max_rss_growth: int | None = None
    """A memory case: the bytes by which the resident memory of the process serving the request
    (this one), and its peak, may grow while it is answered."""
    absent_from_metrics: str | None = None
    """A value of the request that must not appear in /metrics afterwards (a label's value)."""
    in_metrics: str | None = None
    """A label that must appear in /metrics instead (``method="other"``, ``model="unknown"``...)."""


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

GZIPPED = gzip.compress(json.dumps({"input": "x" * 10_000}).encode())
JSON_TYPE = {"content-type": "application/json"}
MULTIPART_TYPE = {"content-type": "multipart/form-data; boundary=hostile"}


def _not_accepted(encoding: str) -> str:
    return f"request bodies with Content-Encoding '{encoding}' are not accepted"


for endpoint, path in POST_ENDPOINTS.items():  # every POST endpoint, JSON or multipart
    body_type = MULTIPART_TYPE if endpoint == "upload" else JSON_TYPE
    for encoding in ("gzip", "deflate", "br", "x-gzip"):
        if endpoint == "embeddings" and encoding != "x-gzip":
            continue  # above
        CASES.append(
            _c(
                f"compressed-body-{endpoint}-{encoding}",
                "POST",
                path,
                415,
                _not_accepted(encoding),
                content=GZIPPED,
                headers={**body_type, "content-encoding": encoding},
                max_seconds=1.0,
            )
        )
for name, encoding, shown in (
    ("upper-case", "GZIP", "gzip"),
    ("padded", "  gzip  ", "gzip"),
    ("compress", "compress", "compress"),
    ("zstd", "zstd", "zstd"),
    ("identity-then-gzip", "identity, gzip", "identity, gzip"),
    ("gzip-then-identity", "gzip, identity", "gzip, identity"),
    ("huge-name", "x" * 5000, "x" * 40),  # quoted short
):
    CASES.append(
        _c(
            f"compressed-body-{name}",
            "POST",
            EMB,
            415,
            _not_accepted(shown),
            content=GZIPPED,
            headers={**JSON_TYPE, "content-encoding": encoding},
            forbidden=("x" * 41,),
            max_response_bytes=1_000,
            max_seconds=1.0,
        )
    )
CASES += [
    _c(
        "compressed-body-empty",
        "POST",
        EMB,
        415,
        _not_accepted("gzip"),
        content=b"",
        headers={**JSON_TYPE, "content-encoding": "gzip"},
    ),
    _c(  # refused as compressed before its size counts
        "compressed-body-over-the-limit",
        "POST",
        SINGLE,
        415,
        _not_accepted("gzip"),
        content=os.urandom(300_000),
        headers={**JSON_TYPE, "content-encoding": "gzip"},
        max_seconds=1.0,
    ),
    _c(
        "compressed-body-multipart-classify",
        "POST",
        CLASSIFY,
        415,
        _not_accepted("deflate"),
        content=zlib.compress(b"--hostile\r\n" * 1000),
        headers={**MULTIPART_TYPE, "content-encoding": "deflate"},
    ),
    _c(  # "identity" is no encoding: the gzip bytes are parsed as they are, and are no JSON
        "identity-gzip-bytes-single",
        "POST",
        SINGLE,
        400,
        "There was an error parsing the body",
        content=GZIPPED,
        headers={**JSON_TYPE, "content-encoding": "identity"},
    ),
    _c(
        "identity-gzip-bytes-embeddings",
        "POST",
        EMB,
        400,
        "There was an error parsing the body",
        content=GZIPPED,
        headers={**JSON_TYPE, "content-encoding": "identity"},
    ),
    _c(
        "identity-plain-json",
        "POST",
        EMB,
        200,
        json={"input": "a photo"},
        headers={"content-encoding": "identity"},
    ),
    _c(
        "identity-upper-case-padded",
        "POST",
        EMB,
        200,
        json={"input": "a photo"},
        headers={"content-encoding": " IDENTITY "},
    ),
    _c(
        "content-encoding-empty",
        "POST",
        EMB,
        200,
        json={"input": "a photo"},
        headers={"content-encoding": ""},
    ),
    _c(  # no body to read, nothing to refuse
        "content-encoding-on-a-get",
        "GET",
        "/v1/system/models",
        200,
        headers={"content-encoding": "gzip"},
    ),
    _c(
        "compressed-body-unknown-path",
        "POST",
        "/v1/nothing-here",
        404,
        "Not Found",
        content=GZIPPED,
        headers={**JSON_TYPE, "content-encoding": "gzip"},
    ),
]

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
        "amplify-batch-of-empty-items",  # 5000 of them are refused before validation (LIMITS)
        "POST",
        BATCH,
        422,
        "(and 39 more problems; the detail lists the first 20)",
        json={"evaluations": [{}] * 20},
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

# Classify prompts: len(template) + slots * (len(label) - 2) characters, checked before building.
for name, template, size, built in (
    ("two-slots-over", "{}{}", 5001, 10002),
    ("two-slots-at-limit", "{}{}", 5000, None),
    ("ten-slots", "{}" * 10, 1001, 10010),
    ("hundred-slots", "{}" * 100, 101, 10100),
    ("250-slots", "{}" * 250, 41, 10250),
    ("250-slots-at-limit", "{}" * 250, 40, None),
    ("text-around-slots", "a {} and {} and {}", 3330, 10002),
    ("text-around-slots-under", "a {} and {} and {}", 3329, None),
    ("default-template-over", "a photo of a {}", 9988, 10001),
    ("default-template-at-limit", "a photo of a {}", 9987, None),
):
    slots = template.count("{}")
    CASES.append(
        _c(
            f"amplify-classify-{name}",
            "POST",
            CLASSIFY,
            422 if built else 200,
            f"labels[1]: its prompt would be {built} characters long (the template holds '{{}}' "
            f"{slots} times); the limit is 10000"
            if built
            else "",
            json={"input": "{media}", "labels": ["cat", "y" * size], "template": template},
            media="png_1x1",
            max_response_bytes=30_000,  # a served label is echoed (once per image)
        )
    )
CASES += [
    _c(
        "amplify-classify-last-of-20-labels",
        "POST",
        CLASSIFY,
        422,
        "labels[19]: its prompt would be 10001 characters long",
        json={"input": "{media}", "labels": [f"l{i}" for i in range(19)] + ["y" * 9988]},
        media="png_1x1",
    ),
    _c(  # '{}' inside a label is text, not a slot: the label is put in once per template slot
        "amplify-classify-braces-in-label",
        "POST",
        CLASSIFY,
        422,
        "labels[0]: its prompt would be 10004 characters long",
        json={"input": "{media}", "labels": ["{}" * 2501], "template": "{}{}"},
        media="png_1x1",
    ),
    _c(
        "amplify-classify-braces-in-label-at-limit",
        "POST",
        CLASSIFY,
        200,
        json={"input": "{media}", "labels": ["{}" * 2500], "template": "{}{}"},
        media="png_1x1",
    ),
    _c(  # the response lists every label (with its text) for every image: 20 x 190 KB
        "amplify-classify-labels-echoed-per-image",
        "POST",
        CLASSIFY,
        200,
        json={"input": ["{media}"] * 20, "labels": [f"{i:02}" + "y" * 9985 for i in range(19)]},
        media="png_1x1",
        max_response_bytes=1_000_000,  # 5x the request
    ),
]

# 422s list at most 20 problems and count the rest, however many items are bad.
# Lists over max_batch_items (20 here) are refused by their count before their items are
# validated (LIMITS); under it, the validation errors are capped: 20 listed, the rest counted.
for n in (15, 20):
    CASES += [
        _c(
            f"amplify-batch-{n}-bad-items",
            "POST",
            BATCH,
            422,
            f"(and {2 * n - 1} more problems; the detail lists the first 20)",
            json={"evaluations": [{"image_input": 1, "text_prompt": 2}] * n},
            max_response_bytes=4_000,
        ),
        _c(
            f"amplify-embeddings-{n}-bad-items",
            "POST",
            EMB,
            422,
            "more problems; the detail lists the first 20)",
            json={"input": [None] * n},
            max_response_bytes=4_000,
        ),
        _c(
            f"amplify-rank-{n}-bad-documents",
            "POST",
            RANK,
            422,
            "more problems; the detail lists the first 20)",
            json={"query": "q", "documents": [None] * n},
            max_response_bytes=4_000,
        ),
        _c(
            f"amplify-classify-{n}-bad-images",
            "POST",
            CLASSIFY,
            422,
            "more problems; the detail lists the first 20)",
            json={"input": [None] * n, "labels": ["a"]},
            max_response_bytes=5_000,
        ),
    ]
for n in (21, 100, 5000):
    CASES += [
        _c(
            f"amplify-{route}-{n}-bad-{what}",
            "POST",
            path,
            422,
            f"the request has {n} {what}; the limit is 20",
            json=body,
            max_response_bytes=500,
        )
        for route, path, what, body in (
            ("batch", BATCH, "evaluations", {"evaluations": [{"image_input": 1}] * n}),
            ("embeddings", EMB, "inputs", {"input": [None] * n}),
            ("rank", RANK, "documents", {"query": "q", "documents": [None] * n}),
            ("classify", CLASSIFY, "images", {"input": [None] * n, "labels": ["a"]}),
        )
    ]
CASES += [
    _c(
        f"amplify-classify-{n}-bad-labels",
        "POST",
        CLASSIFY,
        422,
        f"(and {n - 1} more problems; the detail lists the first 20)",
        json={"input": "x", "labels": [1] * n},
        max_response_bytes=4_000,
    )
    for n in (21, 100)
]
CASES += [
    _c(
        "amplify-classify-5000-bad-labels",
        "POST",
        CLASSIFY,
        422,
        "labels: List should have at most 1000 items",
        json={"input": "x", "labels": [1] * 5000},
        max_response_bytes=4_000,
    ),
    _c(  # 20 problems: all listed, none counted
        "amplify-batch-20-problems",
        "POST",
        BATCH,
        422,
        "(and 19 more problems)",
        json={"evaluations": [{}] * 10},
        forbidden=("the detail lists",),
    ),
]

# Errors quote long input short: 200 characters (model names 100), then an ellipsis and the length.
M, X, K = "m" * 100_000, "x" * 100_000, "K" * 100_000
LONG_MODEL = "… (100000 characters)' is unknown"
QUOTED = "…(100000 chars)"  # how image inputs are described
for name, path, body in (
    ("single", SINGLE, {"image_input": "x", "text_prompt": "y", "model_config_name": M}),
    ("rank", RANK, {"model": M, "query": "q", "documents": ["a"]}),
    ("classify", CLASSIFY, {"model": M, "input": "x", "labels": ["a"]}),
):
    CASES.append(
        _c(
            f"amplify-long-model-name-{name}",
            "POST",
            path,
            404,
            LONG_MODEL,
            json=body,
            forbidden=("m" * 101,),
            max_response_bytes=2_000,
        )
    )
CASES += [
    _c(
        "amplify-long-model-name-upload",
        "POST",
        UPLOAD,
        404,
        LONG_MODEL,
        data={"model": M},
        files=[("files", ("a.png", b"x", "image/png"))],
        forbidden=("m" * 101,),
        max_response_bytes=2_000,
    ),
    _c(
        "amplify-long-model-name-classify-upload",
        "POST",
        CLASSIFY,
        404,
        LONG_MODEL,
        data={"model": M, "labels": ["a"]},
        files=[("files", ("a.png", b"x", "image/png"))],
        forbidden=("m" * 101,),
        max_response_bytes=2_000,
    ),
    _c(
        "amplify-long-model-name-info",
        "GET",
        f"/v1/system/models/{'m' * 20_000}/info",
        404,
        "… (20000 characters)' is unknown",
        forbidden=("m" * 101,),
        max_response_bytes=2_000,
    ),
]
for name, path, body, status, message in (
    (
        "single",
        SINGLE,
        {"image_input": "{media}", "text_prompt": X},
        422,
        "text is 100000 characters long",
    ),
    ("embeddings", EMB, {"input": ["a", X]}, 422, "text is 100000 characters long"),
    ("embed", EMBED, {"input_text": X}, 422, "input_text: String should have at most 1024"),
    ("rank-query", RANK, {"query": X, "documents": ["a"]}, 422, "query: text is 100000"),
    ("rank-documents", RANK, {"query": "q", "documents": [X]}, 200, "text is 100000 characters"),
    ("classify-label", CLASSIFY, {"input": "{media}", "labels": [X]}, 422, "labels[0]: its prompt"),
):
    CASES.append(
        _c(
            f"amplify-long-prompt-{name}",
            "POST",
            path,
            status,
            message,
            json=body,
            media="png_1x1",
            per_item=status == 200,
            forbidden=("x" * 201,),
            max_response_bytes=2_000,
        )
    )
for name, path, body, status, message in (
    ("single", SINGLE, {"image_input": X, "text_prompt": "x"}, 400, QUOTED),
    ("batch", BATCH, {"evaluations": [{"image_input": X, "text_prompt": "x"}]}, 200, QUOTED),
    ("embeddings", EMB, {"input": [X], "modality": "image"}, 400, QUOTED),
    ("image-item", EMB, {"input": [{"image": X}]}, 400, QUOTED),
    ("rank-query", RANK, {"query": {"image": X}, "documents": ["a"]}, 400, QUOTED),
    ("rank-documents", RANK, {"query": "q", "documents": [{"image": X}]}, 200, QUOTED),
    ("classify", CLASSIFY, {"input": [X], "labels": ["a"]}, 200, QUOTED),
    (
        "url",
        SINGLE,
        {"image_input": "http://exa mple.com/" + X, "text_prompt": "x"},
        400,
        "…(100020 chars): URL too long",
    ),
    ("absolute-path", SINGLE, {"image_input": "/" + X, "text_prompt": "x"}, 400, "…(100001 chars)"),
):
    CASES.append(
        _c(
            f"amplify-long-image-input-{name}",
            "POST",
            path,
            status,
            message,
            json=body,
            per_item=status == 200,
            forbidden=("x" * 201,),
            max_response_bytes=2_000,
        )
    )
CASES += [
    _c(
        "amplify-long-scheme",
        "POST",
        SINGLE,
        415,
        f"unsupported image URL scheme '{'y' * 20}'",
        json={"image_input": "y" * 100_000 + ":a.png", "text_prompt": "x"},
        forbidden=("y" * 21,),
    ),
    _c(
        "amplify-long-data-uri-type",
        "POST",
        SINGLE,
        415,
        f"data URI media type '{'i' * 80}'",
        json={"image_input": "data:" + "i" * 100_000 + ",abc", "text_prompt": "x"},
        forbidden=("i" * 81,),
    ),
]
# Unknown keys: ignored where the schema allows extras, quoted short where it forbids them.
for name, path, body, status in (
    ("embeddings-top-level", EMB, {"input": "x", K: 1}, 200),
    ("single-top-level", SINGLE, {"image_input": "{media}", "text_prompt": "x", K: 1}, 200),
    ("embed-top-level", EMBED, {"input_text": "x", K: 1}, 200),
    ("embeddings-text-item", EMB, {"input": [{"text": "x", K: 1}]}, 422),
    ("rank-query-item", RANK, {"query": {"text": "q", K: 1}, "documents": ["a"]}, 422),
    ("classify-image-item", CLASSIFY, {"input": {"image": "x", K: 1}, "labels": ["a"]}, 422),
    ("image-url-part", EMB, {"input": [{"image_url": {"url": "x", K: 1}}]}, 422),
):
    CASES.append(
        _c(
            f"amplify-long-key-{name}",
            "POST",
            path,
            status,
            "request validation failed" if status == 422 else "",
            json=body,
            media="png",
            forbidden=("K" * 101,),
            max_response_bytes=4_000,
        )
    )

# --- host names a resolver would choke on: refused before any lookup, never a 500 ------------

for name, host, message in (
    ("empty-label", "a..example", "an empty label"),
    ("long-label", "a" * 64 + ".example", "longer than 63 characters"),
    ("digits-5000", "1" * 5000, "has characters a host name cannot have"),
    ("zero-padded-octal", "0" * 300 + "177.0.0.1", "is 127.0.0.1, a loopback"),  # inet_aton's
    ("leading-dot", ".example", "has characters a host name cannot have"),
    ("trailing-empty-label", "example..", "an empty label"),
    ("long-middle-label", "a." + "b" * 64 + ".example", "longer than 63 characters"),
    ("over-253-characters", "a." * 130 + "example", "has characters a host name cannot have"),
    ("one-300-letter-label", "a" * 300, "has characters a host name cannot have"),
    ("leading-hyphen", "-a.example", "has characters a host name cannot have"),
    ("hex-5000-digits", "0x" + "f" * 5000, "has characters a host name cannot have"),
    ("zeros-5000", "0" * 5000, "is 0.0.0.0, an unspecified"),
    ("digits-5000-dot-com", "1" * 5000 + ".com", "has characters a host name cannot have"),
    ("zero-padded-5000", "127." + "0" * 5000 + "1", "is 127.0.0.1, a loopback"),
    ("ipv6-zone", "[fe80::1%25eth0]", "a link-local"),
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

# httpx's own URL errors repeat the whole host (or port): the message quotes ~1800 characters.
for name, url, repeated in (
    ("ipv4-5000-digit-part", "http://1.2.3." + "4" * 5000 + "/a.png", "4" * 300),
    ("ipv6-5000-digits", "http://[" + "f" * 5000 + "]/a.png", "f" * 300),
    ("port-5000-digits", "http://a:" + "9" * 5000 + "/a.png", "9" * 300),
    ("unicode-5000-letters", "http://" + "é" * 5000 + "/a.png", "é" * 300),
):
    CASES.append(
        _c(
            f"host-{name}",
            "POST",
            SINGLE,
            400,
            "invalid image URL",
            json={"image_input": url, "text_prompt": "x"},
            forbidden=(repeated,),
        )
    )
# Punycode that does not decode: httpx raises idna.IDNAError (a UnicodeError) from URL.host.
CASES += [
    _c(
        "host-punycode-empty",
        "POST",
        SINGLE,
        400,
        "invalid image URL",
        json={"image_input": "http://xn--/a.png", "text_prompt": "x"},
    ),
    _c(
        "host-punycode-emoji-embeddings",
        "POST",
        EMB,
        400,
        "invalid image URL",
        json={"input": ["http://xn--ls8h.la/a.png"], "modality": "image"},
    ),
    _c(
        "host-punycode-control-batch",
        "POST",
        BATCH,
        200,
        "invalid image URL",
        per_item=True,
        json={"evaluations": [{"image_input": "http://xn--a.example/a.png", "text_prompt": "x"}]},
    ),
    _c(
        "host-punycode-trailing-hyphen-classify",
        "POST",
        CLASSIFY,
        200,
        "invalid image URL",
        per_item=True,
        json={"input": ["http://xn---.example/a.png"], "labels": ["a"]},
    ),
]

# --- signed URLs: query values and user info are never echoed (nor logged) ----------------------

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
        forbidden=("SECRET",),
    )
)
for name, credentials, query in (
    ("aws", "", "?X-Amz-Credential=SECRET1&X-Amz-Signature=SECRET2&X-Amz-Security-Token=SECRET3"),
    ("gcs", "", "?X-Goog-Credential=SECRET1&X-Goog-Signature=SECRET2"),
    ("azure-sas", "", "?sv=2022-11-02&se=2030-01-01&sig=SECRET1"),
    ("token", "", "?token=SECRET1"),
    ("access-token", "", "?access_token=SECRET1&expires=1"),
    ("any-value", "", "?size=SECRET1&q=SECRET2"),
    ("repeated-key", "", "?sig=SECRET1&sig=SECRET2"),
    ("empty-value-then-secret", "", "?sig=&token=SECRET1"),
    ("user-and-password", "user:SECRET1@", ""),
    ("user-only", "SECRET1@", ""),
    ("password-with-at", "user:SECRET1@x@", ""),
    ("user-info-and-query", "user:SECRET1@", "?sig=SECRET2"),
):
    CASES.append(
        _c(
            f"signed-url-{name}",
            "POST",
            BATCH,
            200,
            "image URL refused: host '127.0.0.1' is 127.0.0.1",
            per_item=True,
            json={
                "evaluations": [
                    {
                        "image_input": f"http://{credentials}127.0.0.1/a.png{query}",
                        "text_prompt": "x",
                    }
                ]
            },
            forbidden=("SECRET",),
        )
    )
for name, url, message in (  # errors that describe the URL
    ("port", "http://user:SECRET1@127.0.0.1:99999/a.png?sig=SECRET2", "port 99999 is out of range"),
    ("bad-host", "http://user:SECRET1@exa mple.com/?token=SECRET2", "a host name cannot have"),
    ("long-label", "http://" + "a" * 64 + ".example/?X-Amz-Signature=SECRET", "longer than 63"),
    ("empty-label", "http://a..example/?X-Amz-Signature=SECRET", "an empty label"),
    ("no-host", "http:///a.png?token=SECRET", "it has no host"),
):
    CASES.append(
        _c(
            f"signed-url-error-{name}",
            "POST",
            SINGLE,
            400,
            message,
            json={"image_input": url, "text_prompt": "x"},
            forbidden=("SECRET",),
        )
    )
CASES += [
    _c(
        f"signed-url-error-unclosed-bracket-{name}",
        "POST",
        SINGLE,
        400,
        "invalid image URL",
        json={"image_input": url, "text_prompt": "x"},
        forbidden=("SECRET",),
    )
    for name, url in (
        ("query", "http://[::1/a.png?token=SECRET"),
        ("password", "http://user:SECRET@[::1/a.png"),
    )
]

# --- refusals of names do not say the internal address they resolve to (only literals do) -------

LOOPBACK_NAME = "image URL refused: host 'localhost' resolves to a loopback address"
for name, path, body, status in (
    ("single", SINGLE, {"image_input": "http://localhost/a.png", "text_prompt": "x"}, 400),
    ("port", SINGLE, {"image_input": "http://localhost:8080/a.png", "text_prompt": "x"}, 400),
    ("user-info", SINGLE, {"image_input": "http://u:p@localhost/a.png", "text_prompt": "x"}, 400),
    ("embeddings", EMB, {"input": ["http://localhost/a.png"], "modality": "image"}, 400),
    ("image-url-part", EMB, {"input": [{"image_url": {"url": "http://localhost/"}}]}, 400),
    (
        "batch",
        BATCH,
        {"evaluations": [{"image_input": "http://localhost/a.png", "text_prompt": "x"}]},
        200,
    ),
    ("rank-query", RANK, {"query": {"image": "http://localhost/a.png"}, "documents": ["a"]}, 400),
    ("rank-documents", RANK, {"query": "q", "documents": [{"image": "http://localhost/"}]}, 200),
    ("classify", CLASSIFY, {"input": ["http://localhost/a.png"], "labels": ["a"]}, 200),
):
    CASES.append(
        _c(
            f"resolved-address-not-said-{name}",
            "POST",
            path,
            status,
            LOOPBACK_NAME,
            json=body,
            per_item=status == 200,
            forbidden=("127.0.0.1", "::1"),
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
        "batch-over-limit-items-unvalidated",
        BATCH,
        {"evaluations": [{}] * 5000},
        422,
        "the request has 5000 evaluations; the limit is 20",
    ),
    (
        "embeddings-over-limit-items-unvalidated",
        EMB,
        {"input": [{"bogus": 1}] * 5000},
        422,
        "the request has 5000 inputs; the limit is 20",
    ),
    (
        "rank-over-limit-items-unvalidated",
        RANK,
        {"query": "q", "documents": [None] * 5000},
        422,
        "the request has 5000 documents; the limit is 20",
    ),
    (
        "classify-over-limit-items-unvalidated",
        CLASSIFY,
        {"input": [7] * 5000, "labels": ["a"]},
        422,
        "the request has 5000 images; the limit is 20",
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


# --- tokenizer cost: long words and many random words answer fast, 200 or a clear 422 -----------

_RNG = random.Random(20261202)


def _letters(n: int) -> str:
    """``n`` random lower-case letters: one word no BPE cache holds, the tokenizer's worst case."""
    return "".join(_RNG.choices(string.ascii_lowercase, k=n))


def _words(count: int, length: int) -> str:
    return " ".join(_letters(length) for _ in range(count))


WORD_20K, WORD_10K = _letters(20_000), _letters(10_000)
WORDS_10K = [_letters(10_000) for _ in range(9)]
RANDOM_WORDS = _words(1000, 9)  # 9999 characters
OVER = "text is 20000 characters long; the limit is 10000"
for name, path, body, status, message in (
    ("single-20k-letters", SINGLE, {"image_input": "{media}", "text_prompt": WORD_20K}, 422, OVER),
    ("single-10k-letters", SINGLE, {"image_input": "{media}", "text_prompt": WORD_10K}, 200, ""),
    (
        "single-random-words",
        SINGLE,
        {"image_input": "{media}", "text_prompt": RANDOM_WORDS},
        200,
        "",
    ),
    (
        "batch-20k-letters",
        BATCH,
        {"evaluations": [{"image_input": "{media}", "text_prompt": WORD_20K}]},
        200,
        OVER,
    ),
    (
        "batch-nine-10k-letter-words",
        BATCH,
        {"evaluations": [{"image_input": "{media}", "text_prompt": w} for w in WORDS_10K]},
        200,
        "",
    ),
    ("embed-1024-letters", EMBED, {"input_text": _letters(1024)}, 200, ""),
    ("embeddings-20k-letters", EMB, {"input": WORD_20K}, 422, OVER),
    ("embeddings-nine-10k-letter-words", EMB, {"input": WORDS_10K}, 200, ""),
    ("embeddings-random-words", EMB, {"input": [RANDOM_WORDS] * 9}, 200, ""),
    (
        "rank-query-20k-letters",
        RANK,
        {"query": WORD_20K, "documents": ["a"]},
        422,
        "query: " + OVER,
    ),
    ("rank-documents-20k-letters", RANK, {"query": "q", "documents": ["a", WORD_20K]}, 200, OVER),
    (
        "rank-nine-10k-letter-words",
        RANK,
        {"query": WORD_10K, "documents": WORDS_10K[:8] + [RANDOM_WORDS]},
        200,
        "",
    ),
    (
        "classify-20k-letter-label",
        CLASSIFY,
        {"input": "{media}", "labels": ["a", WORD_20K]},
        422,
        "labels[1]: its prompt would be 20013 characters long",
    ),
    (
        "classify-nine-long-labels",
        CLASSIFY,
        {"input": "{media}", "labels": [w[:9987] for w in WORDS_10K]},
        200,
        "",
    ),
):
    CASES.append(
        _c(
            f"tokenizer-{name}",
            "POST",
            path,
            status,
            message,
            json=body,
            media="png_1x1",
            per_item=status == 200 and bool(message),
            max_response_bytes=120_000,  # the classify labels are echoed
        )
    )

# --- metric labels never take a value the client chose: `other`, `unknown`, `unmatched` instead --

UPLOAD_FILE = [("files", ("a.png", b"x", "image/png"))]
METRIC_CASES = [
    _c(
        f"metrics-method-{name}",
        method,
        path,
        405,
        "Method Not Allowed",
        absent_from_metrics=method,
        in_metrics='method="other"',
    )
    for name, method, path in (
        ("propfind", "PROPFIND", EMB),
        ("brew", "BREW", CLASSIFY),
        ("m-search", "M-SEARCH", RANK),
        ("connect", "CONNECT", SINGLE),
        ("long", "ZZMETHOD" * 40, BATCH),
    )
]
METRIC_CASES += [
    _c(
        "metrics-method-on-a-made-up-path",
        "PURGE",
        "/zz-made-up-path-0",
        404,
        "Not Found",
        absent_from_metrics="zz-made-up-path-0",
        in_metrics='endpoint="unmatched"',
    )
]
METRIC_CASES += [
    _c(
        f"metrics-path-{i}",
        method,
        path,
        404,
        "Not Found",
        absent_from_metrics=f"zz-made-up-path-{i}",
        in_metrics='endpoint="unmatched"',
    )
    for i, (method, path) in enumerate(
        (
            ("GET", "/zz-made-up-path-1/deeper/still"),
            ("POST", "/v1/zz-made-up-path-2"),
            ("POST", "/evaluator/v1/evaluation/zz-made-up-path-3"),
            ("GET", "/%7Ezz-made-up-path-4"),
            ("GET", "/health/zz-made-up-path-5"),
        ),
        start=1,
    )
]
for name, path, body, status, label in (
    (
        "single",
        SINGLE,
        {"image_input": "x", "text_prompt": "x", "model_config_name": "<model>"},
        404,
        'model="unknown"',
    ),
    (
        "batch",
        BATCH,
        {"evaluations": [{"image_input": "x", "text_prompt": "x", "model_config_name": "<model>"}]},
        200,
        'model="unknown"',
    ),
    ("embeddings", EMB, {"model": "<model>", "input": "x"}, 404, 'endpoint="/v1/embeddings"'),
    (
        "rank",
        RANK,
        {"model": "<model>", "query": "q", "documents": ["a"]},
        404,
        'endpoint="/v1/rank"',
    ),
    (
        "classify",
        CLASSIFY,
        {"model": "<model>", "input": "x", "labels": ["a"]},
        404,
        'endpoint="/v1/classify"',
    ),
):
    marker = f"zz-made-up-model-{name}"
    METRIC_CASES.append(
        _c(
            f"metrics-model-{name}",
            "POST",
            path,
            status,
            f"model config '{marker}' is unknown",
            json=json.loads(json.dumps(body).replace("<model>", marker)),
            per_item=status == 200,
            absent_from_metrics=marker,
            in_metrics=label,
        )
    )
METRIC_CASES += [
    _c(
        "metrics-model-upload",
        "POST",
        UPLOAD,
        404,
        "model config 'zz-made-up-model-upload' is unknown",
        data={"model": "zz-made-up-model-upload"},
        files=UPLOAD_FILE,
        absent_from_metrics="zz-made-up-model-upload",
        in_metrics='endpoint="/v1/embeddings/images"',
    ),
    _c(
        "metrics-model-info",
        "GET",
        "/v1/system/models/zz-made-up-model-info/info",
        404,
        "model config 'zz-made-up-model-info' is unknown",
        absent_from_metrics="zz-made-up-model-info",
        in_metrics='endpoint="/v1/system/models/{config_name}/info"',
    ),
    _c(
        "metrics-query-string",
        "POST",
        f"{EMB}?model=zz-made-up-query&zz-made-up-key=1",
        200,
        json={"input": "x"},
        absent_from_metrics="zz-made-up-",
        in_metrics='endpoint="/v1/embeddings"',
    ),
    _c(
        "metrics-request-id-and-host",
        "POST",
        EMBED,
        200,
        json={"input_text": "x"},
        headers={"x-request-id": "zz-made-up-request-id", "host": "zz-made-up-host.example"},
        absent_from_metrics="zz-made-up-",
        in_metrics='endpoint="/embed"',
    ),
]

# === cases served by other services ==============================================================

# --- compressed fetched media: one gzip/deflate layer inflated within the byte cap ---------------
# Served by a local origin (`origin`) to a service that may fetch from it (`fetching`: private URLs
# allowed, media.max_image_bytes and server.max_body_bytes of 1 MiB, no retries).

BIG = b"[" * (10 * MIB)  # a request body 10 to 50 times over the limits
BOMB_MIB = 128  # what the bombs inflate to: 128 times the cap, in a few hundred KB
MEMORY = 48 * MIB  # what a memory case may grow the process's resident memory (and peak) by
CORRUPT = "image could not be fetched: the compressed response from {origin}/"
TRUNCATED = "image could not be"  # decoded (the image is cut), or fetched (the stream is cut)
LAYERS = "only an uncompressed body, or one layer of gzip or deflate, is accepted"
TOO_LARGE = "sent more than 1048576 bytes"


def _bomb(wbits: int, mib: int = BOMB_MIB) -> bytes:
    """``mib`` MiB of zeros deflated (gzip with wbits 31, zlib with 15), streamed: never held."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, wbits)
    zeros = bytes(MIB)
    return b"".join([deflate.compress(zeros) for _ in range(mib)] + [deflate.flush()])


def _bmp(width: int, height: int) -> bytes:
    return _encode(Image.new("RGB", (width, height), "navy"), "BMP")  # 3 bytes a pixel


def _origin_routes(png: bytes) -> dict[str, tuple[int, dict[str, str], bytes]]:
    """path -> (status, headers, body) of what the origin serves (images as image/png)."""
    gz = gzip.compress(png)
    raw_deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    gzip_bomb = _bomb(31)
    routes = {
        "/gzip.png": ("gzip", gz),
        "/x-gzip.png": ("x-gzip", gz),
        "/deflate.png": ("deflate", zlib.compress(png)),
        "/upper-case.png": ("GZIP", gz),
        "/identity-then-gzip.png": ("identity, gzip", gz),
        "/gzip-then-identity.png": ("gzip, identity", gz),
        "/identity.png": ("identity", png),
        "/raw-deflate.png": ("deflate", raw_deflate.compress(png) + raw_deflate.flush()),
        "/not-gzip.png": ("gzip", png),
        "/bad-checksum.png": ("gzip", gz[:-8] + bytes(4) + gz[-4:]),
        "/nested.png": ("gzip, gzip", gzip.compress(gz)),
        "/deflate-then-gzip.png": ("deflate, gzip", gzip.compress(zlib.compress(png))),
        "/br.png": ("br", gz),
        "/zstd.png": ("zstd", gz),
        "/compress.png": ("compress", gz),
        "/long-encoding.png": ("x" * 500, gz),
        "/gzip-bomb.png": ("gzip", gzip_bomb),
        "/deflate-bomb.png": ("deflate", _bomb(15)),
        "/nested-bomb.png": ("gzip, gzip", gzip.compress(gzip_bomb)),
        "/bomb-under-the-cap.png": ("gzip", gzip.compress(bytes(MIB - 1))),  # no image
        "/bmp-under-the-cap.png": ("gzip", gzip.compress(_bmp(600, 400))),  # 720,054 bytes
        "/bmp-over-the-cap.png": ("gzip", gzip.compress(_bmp(700, 600))),  # 1,260,054 bytes
        "/truncated.png": ("gzip", gz[: len(gz) // 2]),
        "/header-only.png": ("gzip", gz[:10]),
        "/no-trailer.png": ("gzip", gz[:-8]),
        "/two-members.png": ("gzip", gzip.compress(png[:100]) + gzip.compress(png[100:])),
    }
    served: dict[str, tuple[int, dict[str, str], bytes]] = {
        path: (200, {"Content-Encoding": encoding}, body)
        for path, (encoding, body) in routes.items()
    }
    served["/declares-too-much.png"] = (200, {"Content-Length": str(5 * MIB)}, gz)
    served["/redirect-signed.png"] = (302, {"Location": "/missing.png?token=SECRET2"}, b"")
    return served


def _fetch(name: str, status: int, message: str, **kw: Any) -> Case:
    """A case fetching ``/<name>.png`` from the origin for a single evaluation."""
    kw.setdefault("json", {"image_input": f"{{origin}}/{name}.png", "text_prompt": "x"})
    return _c(f"fetch-{name}", "POST", kw.pop("path", SINGLE), status, message, **kw)


FETCH_CASES = [
    *(
        _fetch(name, 200, "")
        for name in (
            "gzip",
            "x-gzip",
            "deflate",
            "upper-case",
            "identity-then-gzip",
            "gzip-then-identity",
            "identity",
            "bmp-under-the-cap",
        )
    ),
    _fetch("raw-deflate", 400, CORRUPT + "raw-deflate.png is corrupt"),
    _fetch("not-gzip", 400, CORRUPT + "not-gzip.png is corrupt"),
    _fetch("bad-checksum", 400, CORRUPT + "bad-checksum.png is corrupt"),
    *(
        _fetch(name, 415, f"Content-Encoding '{shown}': {LAYERS}")
        for name, shown in (
            ("nested", "gzip, gzip"),
            ("deflate-then-gzip", "deflate, gzip"),
            ("br", "br"),
            ("zstd", "zstd"),
            ("compress", "compress"),
        )
    ),
    _fetch("long-encoding", 415, f"Content-Encoding '{'x' * 80}'", forbidden=("x" * 81,)),
    _fetch("bmp-over-the-cap", 413, TOO_LARGE),
    _fetch("bomb-under-the-cap", 400, "image could not be decoded", max_rss_growth=MEMORY),
    _fetch("declares-too-much", 413, f"declares {5 * MIB} bytes, over the limit of {MIB} bytes"),
    _fetch("truncated", 400, TRUNCATED),
    _fetch("header-only", 400, TRUNCATED),
    _fetch(
        "no-trailer",
        400,
        TRUNCATED,
    ),
    _fetch(
        "two-members",
        200,
        "",
    ),
    _fetch(
        "missing",
        400,
        "image could not be fetched: HTTP 404 from {origin}/missing.png?X-Amz-Signature=***",
        json={
            "image_input": "{origin}/missing.png?X-Amz-Signature=SECRET1&X-Amz-Credential=SECRET2",
            "text_prompt": "x",
        },
        forbidden=("SECRET",),
    ),
    _fetch(
        "redirect-signed",
        400,
        "HTTP 404 from {origin}/missing.png?token=***",
        json={"image_input": "{origin}/redirect-signed.png?sig=SECRET1", "text_prompt": "x"},
        forbidden=("SECRET",),
    ),
]

# Memory cases, each reading the resident memory of the serving process (this one) before and
# after: bombs of every kind, and the largest would-be allocations this service's 1 MiB caps allow.
FETCH_CASES += [
    _fetch("gzip-bomb", 413, TOO_LARGE, max_rss_growth=MEMORY, max_seconds=3.0),
    _fetch(
        "deflate-bomb",
        413,
        TOO_LARGE,
        path=EMB,
        json={"input": ["{origin}/deflate-bomb.png"], "modality": "image"},
        max_rss_growth=MEMORY,
        max_seconds=3.0,
    ),
    _fetch("nested-bomb", 415, LAYERS, max_rss_growth=MEMORY, max_seconds=3.0),
    _c(
        "fetch-gzip-bomb-batch-item",
        "POST",
        BATCH,
        200,
        TOO_LARGE,
        per_item=True,
        json={"evaluations": [{"image_input": "{origin}/gzip-bomb.png", "text_prompt": "x"}]},
        max_rss_growth=MEMORY,
        max_seconds=3.0,
    ),
    _c(
        "fetch-gzip-bomb-classify-image",
        "POST",
        CLASSIFY,
        200,
        TOO_LARGE,
        per_item=True,
        json={"input": ["{origin}/gzip-bomb.png"], "labels": ["a", "b"]},
        max_rss_growth=MEMORY,
        max_seconds=3.0,
    ),
    _c(
        "fetch-deflate-bomb-rank-document",
        "POST",
        RANK,
        200,
        TOO_LARGE,
        per_item=True,
        json={"query": "q", "documents": [{"text": "a"}, {"image": "{origin}/deflate-bomb.png"}]},
        max_rss_growth=MEMORY,
        max_seconds=3.0,
    ),
    _c(
        "memory-pixel-bomb",
        "POST",
        SINGLE,
        413,
        "image is too large",
        json={"image_input": "{media}", "text_prompt": "x"},
        media="bomb_png",
        max_rss_growth=MEMORY,
    ),
    _c(  # a 225-million-character prompt, refused before it is built
        "memory-classify-template-times-label",
        "POST",
        CLASSIFY,
        422,
        "labels[0]: its prompt would be 225000000 characters long",
        json={"input": "x", "labels": ["y" * 900_000], "template": "{}" * 250},
        max_rss_growth=MEMORY,
    ),
    _c(
        "memory-body-over-the-limit-streamed",
        "POST",
        EMB,
        413,
        f"request body is over the limit of {MIB} bytes",
        content=BIG,
        headers=JSON_TYPE,
        stream=True,
        max_pulled=MIB // CHUNK + 1,
        max_rss_growth=MEMORY,
    ),
    _c(
        "memory-5000-invalid-items",
        "POST",
        EMB,
        422,
        "the request has 5000 inputs; the limit is 20",
        json={"input": [None] * 5000},
        max_rss_growth=MEMORY,
    ),
]


# --- work before authentication, and body limits: refused from the headers, before the body ------
# Served with an API key configured (`secured`), bodies of 200,000 bytes and a 1 s body deadline.

KEY = "hostile-suite-key"
AUTHORIZED = {"authorization": f"Bearer {KEY}"}
NEEDS_KEY = "this server requires an API key: send 'Authorization: Bearer <key>'"
WRONG_KEY = "invalid API key"
OVER_LIMIT = "request body is over the limit of 200000 bytes (max_body_bytes)"
BIG_UPLOAD = (  # a well-formed start, then a 10 MiB file
    b'--hostile\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
    b"Content-Type: image/png\r\n\r\n" + BIG
)
AUTH_CASES: list[Case] = []
for endpoint, path in POST_ENDPOINTS.items():
    body_type = MULTIPART_TYPE if endpoint == "upload" else JSON_TYPE
    for who, key, message in (
        ("no-key", {}, NEEDS_KEY),
        ("wrong-key", {"authorization": "Bearer not-the-key"}, WRONG_KEY),
    ):
        AUTH_CASES.append(
            _c(  # 10 MiB that is never read: the answer comes from the headers
                f"auth-{who}-{endpoint}-10mib-body",
                "POST",
                path,
                401,
                message,
                content=BIG,
                headers={**body_type, **key},
                stream=True,
                max_pulled=0,
                max_seconds=1.0,
            )
        )
    AUTH_CASES.append(
        _c(  # with the key, the body is read only up to the limit
            f"body-limit-{endpoint}-10mib-streamed",
            "POST",
            path,
            413,
            OVER_LIMIT,
            content=BIG_UPLOAD if endpoint == "upload" else BIG,
            headers={**body_type, **AUTHORIZED},
            stream=True,
            max_pulled=200_000 // CHUNK + 1,
            max_seconds=2.0,
        )
    )
for name, method, path in (
    ("models", "GET", "/v1/system/models"),
    ("model-info", "GET", "/v1/system/models/fast/info"),
    ("status", "GET", "/v1/system/status"),
    ("reload", "POST", "/v1/system/models/reload"),
):
    AUTH_CASES.append(_c(f"auth-no-key-{name}", method, path, 401, NEEDS_KEY, max_seconds=1.0))
AUTH_CASES += [
    _c("auth-open-health", "GET", "/health", 200),
    _c("auth-open-ready", "GET", "/ready", 200),
]
for name, headers, status, message in (
    ("basic-scheme", {"authorization": "Basic aG9zdGlsZTprZXk="}, 401, NEEDS_KEY),
    ("token-scheme", {"authorization": f"Token {KEY}"}, 401, NEEDS_KEY),
    ("empty-bearer", {"authorization": "Bearer "}, 401, NEEDS_KEY),
    ("blank-bearer", {"authorization": "Bearer" + " " * 1000}, 401, NEEDS_KEY),
    ("empty-x-api-key", {"x-api-key": ""}, 401, NEEDS_KEY),
    ("huge-key", {"authorization": "Bearer " + "k" * 10_000}, 401, WRONG_KEY),
    ("key-with-suffix", {"authorization": f"Bearer {KEY} extra"}, 401, WRONG_KEY),
    (
        "wrong-bearer-right-x-api-key",
        {"authorization": "Bearer nope", "x-api-key": KEY},
        401,
        WRONG_KEY,
    ),
    ("key-in-query", {}, 401, NEEDS_KEY),
    ("lower-case-bearer", {"authorization": f"bearer {KEY}"}, 200, ""),
    ("padded-bearer", {"authorization": f"Bearer   {KEY}  "}, 200, ""),
    ("x-api-key", {"x-api-key": KEY}, 200, ""),
):
    AUTH_CASES.append(
        _c(
            f"auth-{name}",
            "POST",
            f"{EMB}?api_key={KEY}" if name == "key-in-query" else EMB,
            status,
            message,
            json={"input": "a photo"},
            headers=headers,
            forbidden=("k" * 100,),
            max_seconds=1.0,
        )
    )
AUTH_CASES += [
    _c(  # who asks is checked before what the body is
        "auth-no-key-compressed-body",
        "POST",
        EMB,
        401,
        NEEDS_KEY,
        content=GZIPPED,
        headers={**JSON_TYPE, "content-encoding": "gzip"},
        stream=True,
        max_pulled=0,
    ),
    _c(
        "auth-no-key-declared-over-the-limit",
        "POST",
        SINGLE,
        401,
        NEEDS_KEY,
        content=BIG,
        headers={**JSON_TYPE, "content-length": str(len(BIG))},
        stream=True,
        max_pulled=0,
    ),
    _c(
        "body-limit-declared-over-the-limit",
        "POST",
        SINGLE,
        413,
        "request body of 300000 bytes is over the limit of 200000 bytes",
        content=BIG[:300_000],
        headers={**JSON_TYPE, **AUTHORIZED, "content-length": "300000"},
        stream=True,
        max_pulled=0,
    ),
    _c(
        "body-limit-compressed-with-key",
        "POST",
        EMB,
        415,
        _not_accepted("gzip"),
        content=GZIPPED,
        headers={**JSON_TYPE, **AUTHORIZED, "content-encoding": "gzip"},
        stream=True,
        max_pulled=0,
    ),
    _c(  # slow-loris without a key: refused at once, nothing read
        "slow-body-no-key",
        "POST",
        EMB,
        401,
        NEEDS_KEY,
        content=b'{"input": ',
        headers=JSON_TYPE,
        stream=True,
        stall=True,
        max_pulled=0,
        max_seconds=1.0,
    ),
]
AUTH_CASES += [
    _c(  # slow-loris with the key: the body deadline (1 s here) ends it
        f"slow-body-{endpoint}",
        "POST",
        path,
        408,
        "the request body did not arrive within 1 s (body_timeout_s)",
        content=b'{"input": ' if endpoint != "upload" else b"--hostile\r\n",
        headers={**(MULTIPART_TYPE if endpoint == "upload" else JSON_TYPE), **AUTHORIZED},
        stream=True,
        stall=True,
        max_pulled=1,
        max_seconds=3.0,
    )
    for endpoint, path in (("embeddings", EMB), ("single", SINGLE), ("upload", UPLOAD))
]

# --- tokenizer cost with a real BPE tokenizer: a tiny open_clip model (CLIP's vocabulary) --------
# Prompts up to 100,000 characters here, so that 20,000-letter words reach the tokenizer.

TOKENIZER_CASES = [
    _c(f"bpe-{name}", "POST", path, 200, json=body, media="png_1x1", max_response_bytes=40_000)
    for name, path, body in (
        ("embeddings-20k-letters", EMB, {"input": _letters(20_000)}),
        ("single-20k-letters", SINGLE, {"image_input": "{media}", "text_prompt": _letters(20_000)}),
        (
            "batch-20k-letters",
            BATCH,
            {"evaluations": [{"image_input": "{media}", "text_prompt": _letters(20_000)}]},
        ),
        ("rank-query-20k-letters", RANK, {"query": _letters(20_000), "documents": ["a cat"]}),
        ("rank-document-20k-letters", RANK, {"query": "a cat", "documents": [_letters(20_000)]}),
        (
            "classify-20k-letter-label",
            CLASSIFY,
            {"input": "{media}", "labels": ["cat", _letters(20_000)]},
        ),
        ("embeddings-5000-random-words", EMB, {"input": _words(5000, 12)}),
        (
            "embeddings-20-texts-of-random-words",
            EMB,
            {"input": [_words(300, 30) for _ in range(20)]},
        ),
        (
            "rank-20-documents-of-random-words",
            RANK,
            {"query": "q", "documents": [_words(300, 30) for _ in range(19)]},
        ),
        ("embeddings-20k-accented-letters", EMB, {"input": "é" * 20_000}),
        ("embeddings-20k-cjk", EMB, {"input": "猫" * 20_000}),
    )
]
TOKENIZER_CASES.append(
    _c(
        "bpe-embeddings-six-10k-letter-words",
        "POST",
        EMB,
        200,
        json={"input": [_letters(10_000) for _ in range(6)]},
        max_seconds=0.5,  # milliseconds of tokenizing each, and one tiny forward pass
    )
)

# --- X-Forwarded-For: read from the right, past `rate_limit.trusted_proxies` only ----------------
# One service per case, 1 request an hour per caller: the second request's 429 names the caller.

XFF = "x-forwarded-for"
PEER = "127.0.0.1"
FORWARDED_CASES: list[tuple[int, Case]] = []  # (rate_limit.trusted_proxies, case)
for name, proxies, headers, caller, spoofed in (
    ("ignored-without-proxies", 0, [(XFF, "6.6.6.6")], PEER, "6.6.6.6"),
    ("one-proxy", 1, [(XFF, "6.6.6.6")], "6.6.6.6", None),
    ("one-proxy-spoofed-entry", 1, [(XFF, "1.1.1.1, 6.6.6.6")], "6.6.6.6", "1.1.1.1"),
    ("two-proxies", 2, [(XFF, "1.1.1.1, 6.6.6.6, 10.0.0.2")], "6.6.6.6", "1.1.1.1"),
    ("fewer-entries-than-proxies", 2, [(XFF, "6.6.6.6")], PEER, "6.6.6.6"),
    ("two-headers", 1, [(XFF, "1.1.1.1"), (XFF, "6.6.6.6")], "6.6.6.6", "1.1.1.1"),
    ("padded", 1, [(XFF, "   6.6.6.6   ")], "6.6.6.6", None),
    ("ipv6", 1, [(XFF, "2001:DB8::7")], "2001:db8::7", None),
    (
        "v4-mapped-ipv6",
        1,
        [(XFF, "::ffff:6.6.6.6")],
        str(ipaddress.ip_address("::ffff:6.6.6.6")),
        None,
    ),
    (
        "5000-entries",
        1,
        [(XFF, ", ".join(f"10.{i // 256}.{i % 256}.1" for i in range(5000)))],
        "10.19.135.1",
        "10.0.0.1",
    ),
    ("not-an-address", 1, [(XFF, "not-an-address")], PEER, "not-an-address"),
    ("huge-entry", 1, [(XFF, "9" * 10_000)], PEER, "9" * 20),
    ("with-port", 1, [(XFF, "6.6.6.6:4711")], PEER, "6.6.6.6"),
    ("bracketed-ipv6", 1, [(XFF, "[2001:db8::7]")], PEER, "2001:db8::7"),
    ("empty-last-entry", 1, [(XFF, "6.6.6.6,")], PEER, "6.6.6.6"),
    ("leading-zeros", 1, [(XFF, "006.006.006.006")], PEER, "006"),
    (
        "other-headers-ignored",
        1,
        [("forwarded", "for=6.6.6.6"), ("x-real-ip", "6.6.6.6")],
        PEER,
        "6.6.6.6",
    ),
):
    FORWARDED_CASES.append(
        (
            proxies,
            _c(
                f"forwarded-for-{name}",
                "POST",
                EMB,
                429,
                f"rate limit exceeded: 1 per 1 hour requests for ip:{caller}",
                json={"input": "a photo"},
                headers=headers,
                forbidden=(spoofed,) if spoofed else (),
                max_seconds=1.0,
            ),
        )
    )


# === services, and the one runner of every table =================================================


@pytest.fixture(scope="module")
def media_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile-media")
    (root / "models.json").write_text(json.dumps(REGISTRY))
    (root / "subdir").mkdir()
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("these are notes, not a photo\n")
    os.mkfifo(root / "pipe.png")
    (root / "escape.png").symlink_to("/etc/passwd")
    return root


@pytest.fixture(scope="module")
def media(photos: dict[str, Any]) -> dict[str, bytes]:
    return _media(photos["astronaut"])


def _settings(
    root: Path,
    *,
    media: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    **overrides: Any,
) -> Settings:
    """The suite's settings: the fake registry, media under ``root``, private URLs refused and
    small limits; ``media`` and ``server`` entries are merged in, other fields replace."""
    overrides.setdefault("config_path", root / "models.json")
    return Settings(
        config_reload_interval_s=0,
        media={"allow_private_urls": False, "media_root": root, **(media or {})},
        server={
            "max_batch_items": 20,
            "max_body_bytes": 200_000,
            "max_images_per_request": 20,
            **(server or {}),
        },
        **overrides,
    )


@asynccontextmanager
async def _serving(settings: Settings, loader: Any = None) -> AsyncIterator[Any]:
    """A started app (in this process: its memory is this process's)."""
    app = create_app(settings, loader=loader or FakeLoader())
    async with LifespanManager(app, startup_timeout=60) as manager:
        yield manager.app


def _client(app: Any, peer: str = "127.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 123))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(media_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """One service for the whole module: every hostile case hits the same app, which must keep
    answering good requests throughout."""
    async with _serving(_settings(media_root)) as app, _client(app) as http:
        yield http


@pytest.fixture(scope="module")
def origin(media: dict[str, bytes]) -> Iterator[str]:
    """The base URL of a local HTTP server serving ``_origin_routes`` (404 for other paths)."""
    routes = _origin_routes(media["png"])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            status, headers, body = routes.get(self.path.partition("?")[0], (404, {}, b"not found"))
            self.send_response(status)
            self.send_header("Content-Type", "image/png" if status == 200 else "text/plain")
            for name, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            with contextlib.suppress(OSError):  # the service stops reading a bomb at its cap
                self.wfile.write(body)

    server = QuietHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secured(media_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A service that wants an API key (KEY), with a body deadline of 1 s."""
    settings = _settings(
        media_root, auth={"api_keys": [hash_key(KEY)]}, server={"body_timeout_s": 1.0}
    )
    async with _serving(settings) as app, _client(app) as http:
        yield http


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from clipserve.testing.tiny import build_tiny_open_clip

    return build_tiny_open_clip(tmp_path_factory.mktemp("tiny") / "open_clip", seed=0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tiny(
    media_root: Path, tiny_model: Path, media: dict[str, bytes]
) -> AsyncIterator[httpx.AsyncClient]:
    """A service whose default model is a tiny random open_clip CLIP (the real BPE tokenizer)."""
    config = media_root / "tiny-models.json"
    config.write_text(
        json.dumps({"tiny": {"model_name": f"local-dir:{tiny_model}", "backend": "open_clip"}})
    )
    settings = _settings(
        media_root,
        config_path=config,
        default_model="tiny",
        server={"max_prompt_chars": 100_000, "max_body_bytes": 2 * MIB},
    )
    async with _serving(settings, FakeLoader(fallback=load_backend)) as app, _client(app) as http:
        await still_serves(http, media)  # loaded: the cases time the tokenizer, not the load
        yield http


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fetching(media_root: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A service that may fetch from the origin on 127.0.0.1, with caps of 1 MiB."""
    settings = _settings(
        media_root,
        media={"allow_private_urls": True, "max_image_bytes": MIB, "fetch_retries": 0},
        server={"max_body_bytes": MIB},
    )
    async with _serving(settings) as app, _client(app) as http:
        yield http


def _fill(value: Any, uri: str, origin: str) -> Any:
    if isinstance(value, str):
        return uri if value == "{media}" else value.replace("{origin}", origin)
    if isinstance(value, list):
        return [_fill(v, uri, origin) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, uri, origin) for k, v in value.items()}
    return value


def _message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error["message"] if isinstance(error, dict) else error)


class _Body:
    """A request body streamed in CHUNK-sized parts; ``pulled`` counts the parts the server asked
    for. With ``stall`` it never ends: only the server's body deadline ends the request."""

    def __init__(self, data: bytes, *, stall: bool) -> None:
        self.data = data
        self.stall = stall
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), CHUNK):
            self.pulled += 1
            yield self.data[start : start + CHUNK]
        if self.stall:
            await asyncio.Event().wait()  # never set


def _memory() -> tuple[int, int]:
    """This process's resident memory and its peak since the last reset, in bytes."""
    status = Path("/proc/self/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _reset_peak_memory() -> None:
    """Start the peak (VmHWM) afresh where the kernel allows it; else it is compared as it is."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


async def _exercise(client: Any, media: dict[str, bytes], case: Case, origin: str = "") -> None:
    """Send ``case`` and check its answer: status, error text, wall time, size, secrets, and for
    streamed bodies how much was read, for memory cases how much memory grew."""
    headers = httpx.Headers(case.headers)
    kwargs: dict[str, Any] = {"headers": headers}
    body_stream = None
    if case.json is not None:
        uri = _uri(media[case.media]) if case.media else ""
        kwargs["content"] = json.dumps(_fill(case.json, uri, origin)).encode()
        headers.setdefault("content-type", "application/json")
    elif case.content is not None:
        body_stream = _Body(case.content, stall=case.stall) if case.stream else None
        kwargs["content"] = body_stream or case.content
    if case.files is not None or case.data is not None:
        kwargs["files"] = case.files
        kwargs["data"] = case.data
    memory_before = None
    if case.max_rss_growth is not None:
        if not Path("/proc/self/status").exists():
            pytest.skip("no /proc/self/status: resident memory cannot be read here")
        _reset_peak_memory()
        memory_before = _memory()

    started = time.perf_counter()
    response = await client.request(case.method, case.path, **kwargs)
    elapsed = time.perf_counter() - started

    assert response.status_code == case.status, response.text[:500]
    assert elapsed < case.max_seconds, f"answered in {elapsed:.2f} s"
    assert len(response.content) <= case.max_response_bytes, len(response.content)
    if body_stream is not None and case.max_pulled is not None:
        assert body_stream.pulled <= case.max_pulled, f"{body_stream.pulled} parts read"
    if case.max_rss_growth is not None and memory_before is not None:
        (rss_before, peak_before), (rss_after, peak_after) = memory_before, _memory()
        assert rss_after - rss_before < case.max_rss_growth, f"RSS +{rss_after - rss_before}"
        assert peak_after - peak_before < case.max_rss_growth, f"peak +{peak_after - peak_before}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    message = case.message.replace("{origin}", origin)
    shown = response.text + json.dumps(body, ensure_ascii=False)  # escaped and as read
    for secret in case.forbidden:
        assert secret not in shown, f"{secret[:40]!r} in {response.text[:300]}"
    if case.per_item:
        (failed,) = [r for r in body.get("results", body.get("data")) if r["error"] is not None]
        assert (
            failed.get("clip_score", failed.get("relevance_score", failed.get("top_label"))) is None
        )
        assert message in failed["error"]
    elif case.status >= 400:
        assert message in _message(body), body
        if not isinstance(body["error"], dict):
            assert set(body) == {"error", "detail"}
            if isinstance(body["detail"], list):
                assert len(body["detail"]) <= 20  # problems listed, the rest counted
    else:
        assert case.message == ""  # a message is an error's


async def still_serves(
    client: Any, media: dict[str, bytes], headers: dict[str, str] | None = None
) -> None:
    good = await client.post(
        SINGLE, json={"image_input": _uri(media["png"]), "text_prompt": "ok"}, headers=headers
    )
    assert good.status_code == 200, good.text
    assert good.json()["clip_score"] is not None


def _params(cases: list[Case]) -> list[Any]:
    """pytest params of ``cases``, named by their ids."""
    return [pytest.param(case, id=case.id) for case in cases]


def test_there_are_at_least_540_distinct_cases() -> None:
    assert len(CASES) >= 200
    every = CASES + FETCH_CASES + AUTH_CASES + METRIC_CASES + TOKENIZER_CASES
    every += [case for _, case in FORWARDED_CASES]
    assert len(every) >= 540
    assert len({case.id for case in every}) == len(every)  # distinct


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", _params(CASES))
async def test_hostile_input(client: Any, media: dict[str, bytes], case: Case) -> None:
    await _exercise(client, media, case)
    await still_serves(client, media)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", _params(FETCH_CASES))
async def test_fetched_media(
    fetching: Any, origin: str, media: dict[str, bytes], case: Case
) -> None:
    await _exercise(fetching, media, case, origin)
    await still_serves(fetching, media)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", _params(AUTH_CASES))
async def test_before_authentication_and_body_limits(
    secured: Any, media: dict[str, bytes], case: Case
) -> None:
    await _exercise(secured, media, case)
    await still_serves(secured, media, headers=AUTHORIZED)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("proxies", "case"), [pytest.param(p, case, id=case.id) for p, case in FORWARDED_CASES]
)
async def test_forwarded_for_names_the_client(
    media_root: Path, media: dict[str, bytes], proxies: int, case: Case
) -> None:
    """The first request of the caller is served; the second is refused, naming the caller the
    limit counted (the peer, or an X-Forwarded-For entry a trusted proxy wrote). Another client
    is still served."""
    limits = {"requests": "1/hour", "trusted_proxies": proxies}
    async with (
        _serving(_settings(media_root, rate_limit=limits)) as app,
        _client(app, PEER) as caller,
        _client(app, "192.0.2.1") as bystander,
    ):
        # The first request also loads the model (and, late in a long run, may meet a full
        # garbage collection of a large heap): its bound is looser than the refusal's.
        first = replace(case, status=200, message="", forbidden=(), max_seconds=5.0)
        await _exercise(caller, media, first)
        await _exercise(caller, media, case)
        await still_serves(bystander, media)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", _params(TOKENIZER_CASES))
async def test_real_tokenizer_cost(tiny: Any, media: dict[str, bytes], case: Case) -> None:
    await _exercise(tiny, media, case)
    await still_serves(tiny, media)


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", _params(METRIC_CASES))
async def test_client_chosen_values_are_never_metric_labels(
    client: Any, media: dict[str, bytes], case: Case
) -> None:
    assert case.absent_from_metrics
    assert case.in_metrics
    await _exercise(client, media, case)
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert case.absent_from_metrics not in metrics.text
    assert case.in_metrics in metrics.text
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
