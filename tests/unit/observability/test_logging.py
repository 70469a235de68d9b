"""Logs: JSON lines with the record's fields, and one access line per request carrying the
request id, route template, status, latency, item count, model and cache hits; never the prompt,
nor a model name the client made up."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from clipserve.observability.logging import ACCESS_LOGGER, JsonFormatter, configure_logging
from clipserve.testing import FakeLoader


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_the_fields_and_the_traceback() -> None:
    record = logging.LogRecord(
        "clipserve.x", logging.ERROR, __file__, 1, "failed %s", ("once",), None
    )
    record.request_id = "abc"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "error"
    assert entry["logger"] == "clipserve.x"
    assert entry["message"] == "failed once"
    assert entry["request_id"] == "abc"
    assert entry["ts"].endswith("Z")
    assert "ValueError: boom" in entry["exc"]


def test_configure_logging_writes_json_and_silences_uvicorns_access_log(
    restore_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    config = configure_logging("debug", "json")
    logging.getLogger("clipserve.test").info("hello", extra={"items": 3})
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert json.loads(line)["items"] == 3
    assert config["loggers"]["uvicorn.access"]["handlers"] == []
    assert config["loggers"]["uvicorn"]["level"] == "DEBUG"
    assert config["formatters"]["default"]["()"].endswith("JsonFormatter")


async def test_one_access_line_per_request_without_the_prompt(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = await client_for(make_settings(), FakeLoader())
    prompt = "a very private caption"
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        response = await client.post(
            "/v1/rank",
            json={"model": "fast", "query": prompt, "documents": ["a", "b", "c"]},
            headers={"X-Request-ID": "req-42"},
        )
    assert response.status_code == 200
    (record,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    fields = {k: getattr(record, k) for k in ("request_id", "method", "route", "status", "items")}
    assert fields == {
        "request_id": "req-42",
        "method": "POST",
        "route": "/v1/rank",
        "status": 200,
        "items": 3,
    }
    assert record.duration_ms > 0  # type: ignore[attr-defined]
    assert prompt not in JsonFormatter().format(record)


async def test_the_access_line_names_the_model_and_counts_cache_hits(
    client_for: Callable[..., Any],
    make_settings: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
    photo_bytes: Callable[..., bytes],
) -> None:
    client = await client_for(make_settings(), FakeLoader())
    body = {"model": "fast", "input": ["a cat", "a dog"]}
    made_up = "made-up-model-7f3a"
    uri = "data:image/png;base64," + base64.b64encode(photo_bytes("coffee", "PNG")).decode()
    pairs = [
        {"image_input": uri, "text_prompt": "coffee", "model_config_name": name}
        for name in ("fast", "accurate", made_up)
    ]
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        assert (await client.post("/v1/embeddings", json=body)).status_code == 200
        assert (await client.post("/v1/embeddings", json=body)).status_code == 200
        missing = await client.post("/v1/embeddings", json={"model": made_up, "input": "x"})
        assert missing.status_code == 404
        batch = await client.post("/evaluator/v1/evaluation/batch", json={"evaluations": pairs})
        assert batch.status_code == 200
        assert (await client.get("/evaluator/health")).status_code == 200
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == ACCESS_LOGGER]
    entries = [json.loads(line) for line in lines]
    assert [(e["route"], e.get("model"), e.get("cache_hits")) for e in entries[:3]] == [
        ("/v1/embeddings", "fast", 0),
        ("/v1/embeddings", "fast", 2),  # both inputs from the cache the first request filled
        ("/v1/embeddings", "unknown", 0),
    ]
    evaluation, health = entries[3:]
    assert set(evaluation["model"].split(",")) == {"fast", "accurate", "unknown"}
    assert evaluation["cache_hits"] == 0  # "coffee" was never embedded before
    assert "model" not in health  # no model used, no model field
    assert "cache_hits" not in health
    assert not [line for line in lines if made_up in line]
