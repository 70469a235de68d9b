"""Untrusted image inputs (URLs, data URIs, paths, bytes, PIL images) → clean RGB PIL images.

Never imports ``api`` or ``engine``; the engine calls :class:`ImageLoader`.
"""

from clipserve.media.decode import DECODABLE_FORMATS, decode_image, prepare_image, to_rgb
from clipserve.media.fetch import Resolver, UrlFetcher, system_resolver
from clipserve.media.loader import EncodedImage, ImageLoader, LoadedImage
from clipserve.media.source import (
    ImageInput,
    SourceKind,
    classify,
    describe,
    parse_data_uri,
    read_local_image,
)

__all__ = [
    "DECODABLE_FORMATS",
    "EncodedImage",
    "ImageInput",
    "ImageLoader",
    "LoadedImage",
    "Resolver",
    "SourceKind",
    "UrlFetcher",
    "classify",
    "decode_image",
    "describe",
    "parse_data_uri",
    "prepare_image",
    "read_local_image",
    "system_resolver",
    "to_rgb",
]
