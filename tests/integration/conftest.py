"""Integration helpers: the real app served by a real uvicorn on a free loopback port."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
import uvicorn

from clipserve.api.app import create_app
from clipserve.config import Settings
from clipserve.testing import FakeLoader


class Service(uvicorn.Server):
    """A uvicorn server that signals when start-up is over (no polling, no sleeps)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self.ready.set()


@contextmanager
def running(settings: Settings, loader: Any = None) -> Iterator[str]:
    """Serve ``create_app(settings)`` (fake models unless ``loader``) on a free loopback port;
    yield its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    application = create_app(settings, loader=loader or FakeLoader())
    server = Service(uvicorn.Config(application, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert server.ready.wait(30), "the service did not start within 30 s"
        assert server.started, "the service failed to start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the service did not stop"


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """``serve(settings, loader=None)`` -> the URL of a running service (stopped after the test)."""
    with ExitStack() as stack:
        yield lambda settings, loader=None: stack.enter_context(running(settings, loader))
