"""A stand-in for the Hugging Face Hub on 127.0.0.1, for tests of ``clipserve download``.

It serves folders as model repositories (``root/<org>/<name>/...``) through the three calls
``huggingface_hub``'s ``snapshot_download`` and ``hf_hub_download`` make: the revision info
(``GET /api/models/<repo>/revision/<rev>``), the file tree (``GET
/api/models/<repo>/tree/<rev>``) and each file (``GET|HEAD /<repo>/resolve/<rev>/<path>``),
and records every path asked for. Pass its ``url`` as the hub ``endpoint``::

    with FakeHub(tmp_path / "repos") as hub:
        snapshot_download("org/model", endpoint=hub.url, local_dir=...)
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from clipserve.testing.origin import QuietHTTPServer

COMMIT = "0" * 40


class FakeHub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def record(self, path: str) -> None:
        with self._lock:
            self.requests.append(path)

    def repo(self, repo_id: str) -> Path | None:
        folder = (self.root / repo_id).resolve()
        inside = folder.is_relative_to(self.root.resolve())
        return folder if inside and folder.is_dir() else None


class _Server(QuietHTTPServer):
    hub: FakeHub


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's signature)
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        hub = cast(_Server, self.server).hub
        path = self.path.split("?", 1)[0]
        hub.record(path)
        if path.startswith("/api/models/"):
            rest = path.removeprefix("/api/models/")
            if "/tree/" in rest:
                repo_id, _, _ = rest.partition("/tree/")
                folder = hub.repo(repo_id)
                if folder is None:
                    return self._json(404, {"error": "Repository not found"}, body)
                tree = [
                    {
                        "type": "file",
                        "path": _relative(f, folder),
                        "size": f.stat().st_size,
                        "oid": hashlib.sha1(f.read_bytes(), usedforsecurity=False).hexdigest(),
                    }
                    for f in sorted(folder.rglob("*"))
                    if f.is_file()
                ]
                return self._json(200, tree, body)
            repo_id, _, _ = rest.partition("/revision/")
            folder = hub.repo(repo_id)
            if folder is None:
                return self._json(404, {"error": "Repository not found"}, body)
            files = [{"rfilename": _relative(f, folder)} for f in sorted(folder.rglob("*"))]
            return self._json(200, {"id": repo_id, "sha": COMMIT, "siblings": files}, body)
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            folder = hub.repo("/".join(parts[:2]))
            file = folder / "/".join(parts[4:]) if folder is not None else None
            if file is None or not file.is_file():
                return self._json(404, {"error": "Entry not found"}, body)
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            if body:
                self.wfile.write(data)
            return None
        return self._json(404, {"error": "not found"}, body)

    def _json(self, status: int, payload: Any, body: bool) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _relative(file: Path, folder: Path) -> str:
    return file.relative_to(folder).as_posix()
