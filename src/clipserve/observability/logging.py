"""Logs: JSON lines (the default when stderr is not a terminal, for Loki and friends) or console
text, one logging set-up for clipserve and uvicorn, and the one access line per request.

The access line (logger ``clipserve.access``, written by the request middleware) carries the
request id, method, route template, status, latency, what the route recorded in
``request.state.log`` (items), and for requests that used a model its config name(s) and the
embeddings they got from the cache (``model``, ``cache_hits``: from the request's
:class:`~clipserve.observability.context.RequestContext`); never bodies, image bytes, prompts or
keys.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from typing import Any, Literal

LogFormat = Literal["auto", "json", "console"]
ACCESS_LOGGER = "clipserve.access"

_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    the record's ``extra`` fields, and ``exc`` with the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in ("color_message",):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def resolve_format(fmt: LogFormat) -> Literal["json", "console"]:
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def configure_logging(level: str, fmt: LogFormat = "auto") -> dict[str, Any]:
    """Put the root logger (ours) at ``level`` with the chosen format on stderr, and return
    uvicorn's logging config with the same level and format. uvicorn's own access log is off:
    the ``clipserve.access`` line replaces it (with the route template and the request id)."""
    import uvicorn.config

    level = level.upper()
    chosen = resolve_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    if chosen == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    config: dict[str, Any] = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for logger_config in config["loggers"].values():
        logger_config["level"] = level
    config["loggers"]["uvicorn.access"]["handlers"] = []
    config["loggers"]["uvicorn.access"]["propagate"] = False
    if chosen == "json":
        config["formatters"]["default"] = {"()": "clipserve.observability.logging.JsonFormatter"}
    return config
