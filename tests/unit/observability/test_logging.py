"""Logs: JSON lines with the record's fields, and one access line per request carrying the
request id, route template, status, latency and item count; never the prompt."""

from __future__ import annotations

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
