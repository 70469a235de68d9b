"""Captions and texts for the backend tests (tiny models: the root conftest's ``tiny_dirs``)."""

from __future__ import annotations

import pytest


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
