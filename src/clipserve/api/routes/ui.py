"""The web playground: GET /ui/ (one static page) and the files next to it.

The page, its script and its style sheet ship in the package (``api/static/ui``); nothing else is
served from here. Every answer carries a strict Content-Security-Policy (same origin only: the page
loads nothing from elsewhere) and ``Cache-Control: no-cache`` (the browser revalidates, so an
upgraded server never runs yesterday's script)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

router = APIRouter(tags=["ui"], include_in_schema=False)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'"
)
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def _assets() -> dict[str, tuple[bytes, str]]:
    """The folder's files by name, with their content types, read once (the first request)."""
    folder = files("clipserve.api").joinpath("static", "ui")
    found: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rpartition(".")[2] if "." in entry.name else ""
        if entry.is_file() and suffix in _CONTENT_TYPES:
            found[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return found


def _serve(name: str) -> Response:
    asset = _assets().get(name)
    if asset is None:  # answered as an unknown path is: the one mapping, the same 404 body
        raise StarletteHTTPException(status_code=404, detail="Not Found")
    body, content_type = asset
    return Response(body, media_type=content_type, headers=_HEADERS)


@router.get("/ui")
async def ui_root() -> RedirectResponse:
    """The playground lives at /ui/ (its relative links need the slash; a relative Location
    keeps a proxy's path prefix)."""
    return RedirectResponse("ui/", status_code=307)


@router.get("/ui/")
async def ui_index() -> Response:
    """The playground page."""
    return _serve("index.html")


@router.get("/ui/{file}")
async def ui_file(file: str) -> Response:
    """One of the page's files (script, style sheet); anything else is a 404."""
    return _serve(file)
