"""Test helpers for clipserve and its users: tiny random models (no downloads), a fake backend."""

from __future__ import annotations

from clipserve.testing.fake import DeviceGate, FakeBackend, FakeCaptionBackend, FakeLoader
from clipserve.testing.origin import QuietHTTPServer
from clipserve.testing.tiny import build_tiny_hf_clip, build_tiny_hf_siglip, build_tiny_open_clip

__all__ = [
    "DeviceGate",
    "FakeBackend",
    "FakeCaptionBackend",
    "FakeLoader",
    "QuietHTTPServer",
    "build_tiny_hf_clip",
    "build_tiny_hf_siglip",
    "build_tiny_open_clip",
]
