"""Helpers of the playground's browser tests: Debian's chromium driven by Playwright, a page that
records every request it makes and every script or policy error it meets."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
TIMEOUT_MS = 15_000
"""The bound of every wait in the browser (Playwright's default is 30 s)."""
ARTIFACTS_ENV = "TEST_ARTIFACTS_DIR"
"""Not ``CLIPSERVE_*``: tests/conftest.py clears those (tests build their own settings)."""


def data_uri(content: bytes, mime: str) -> str:
    """What the page's FileReader makes of a file with these bytes and this type."""
    return f"data:{mime};base64,{base64.b64encode(content).decode('ascii')}"


def artifacts_dir(fallback: Path) -> Path:
    """Where screenshots go: ``$TEST_ARTIFACTS_DIR`` if set, else ``fallback``."""
    chosen = os.environ.get(ARTIFACTS_ENV)
    folder = Path(chosen) if chosen else fallback
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class Playground:
    """One browser page on the playground, with what it asked for and what went wrong in it."""

    page: Any  # playwright.sync_api.Page
    base: str
    requests: list[Any] = field(default_factory=list)  # playwright.sync_api.Request
    problems: list[str] = field(default_factory=list)

    def watch(self) -> None:
        self.page.on("request", lambda request: self.requests.append(request))
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text}")

    def open(self) -> None:
        self.page.goto(self.base + "/ui", timeout=TIMEOUT_MS)
        self.page.wait_for_selector("body[data-ready=true]", timeout=TIMEOUT_MS)

    def foreign_requests(self) -> list[str]:
        """Requests to anywhere but the server (inline data: and blob: URLs are no host)."""
        return [
            r.url
            for r in self.requests
            if not r.url.startswith(self.base + "/") and not r.url.startswith(("data:", "blob:"))
        ]

    def calls_to(self, path: str) -> list[Any]:
        return [r for r in self.requests if r.url.split("?")[0] == self.base + path]
