"""Tiny seeded models shared by the backend and loader tests (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipserve.testing.tiny import (
    build_tiny_hf_clip,
    build_tiny_hf_siglip,
    build_tiny_open_clip,
    convert_open_clip_to_hf_clip,
)


@pytest.fixture(scope="session")
def captions() -> dict[str, str]:
    """One caption per photo of the root ``photos`` fixture."""
    return {
        "astronaut": "a photo of an astronaut in a white space suit",
        "chelsea": "a cat with orange and black fur",
        "coffee": "a cup of coffee on a saucer",
        "rocket": "a rocket standing on the launch pad",
    }


@pytest.fixture(scope="session")
def long_text() -> str:
    """504 words: far beyond any context length here."""
    return " ".join(["a very long caption about a cat"] * 72)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """open_clip (CLIP and SigLIP-style), transformers CLIP and SigLIP, and the transformers copy
    of the open_clip CLIP model (same weights)."""
    root = tmp_path_factory.mktemp("backend-models")
    open_clip_dir = build_tiny_open_clip(root / "open_clip", seed=0)
    return {
        "open_clip": open_clip_dir,
        "open_clip_siglip": build_tiny_open_clip(root / "open_clip_siglip", siglip=True, seed=1),
        "hf_clip": build_tiny_hf_clip(root / "hf_clip", seed=2),
        "hf_siglip": build_tiny_hf_siglip(root / "hf_siglip", seed=3),
        "open_clip_as_hf": convert_open_clip_to_hf_clip(open_clip_dir, root / "open_clip_as_hf"),
    }
