"""A loopback HTTP origin for tests that fetch image URLs."""

from __future__ import annotations

import sys
from http.server import ThreadingHTTPServer
from typing import Any


class QuietHTTPServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` for a test origin: a client that hangs up mid-answer (the service
    does, at its byte cap) is expected, not a traceback on stderr. Handler threads are daemons."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)
