"""Schemathesis against our own OpenAPI spec, in-process: generated requests (valid and invalid)
never get a 5xx, and every answer matches its documented status, content type and schema."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from clipserve.api.app import create_app
from clipserve.config import Settings
from clipserve.testing import FakeLoader

_DIR = Path(tempfile.mkdtemp(prefix="clipserve-fuzz-"))
(_DIR / "models.json").write_text(
    json.dumps(
        {
            "fast": {"model_name": "fake-fast"},
            "accurate": {"model_name": "fake-accurate"},
            "blip": {"model_name": "fake-blip", "backend": "hf", "task": "caption"},
            "minilm": {"model_name": "fake-text", "backend": "sentence-transformers"},
        }
    )
)
APP = create_app(
    Settings(
        config_path=_DIR / "models.json",
        config_reload_interval_s=0,
        # Generated URLs must not reach DNS or the network: every host but this one is refused.
        media={"media_root": _DIR, "allowed_hosts": ["fuzz.invalid"]},
        server={"max_batch_items": 50, "max_body_bytes": 1_000_000},
    ),
    loader=FakeLoader(),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module", autouse=True)
def _stop_the_app() -> Iterator[None]:
    yield
    shutdown_lifespans()


@schema.parametrize()
@hypothesis_settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same cases on every run: CI stays reproducible
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_answers_match_the_spec(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
