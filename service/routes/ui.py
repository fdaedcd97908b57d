"""The web view: ``/ui`` (the page) and ``/ui/static/...`` (its scripts, style sheet and the vendored chart library).

The files are the package's data (``service/ui/static``), read once into memory: a path is looked up in that
table, so nothing outside it can be named, and anything else is a 404. Every answer carries a
Content-Security-Policy that allows scripts, styles and requests from this origin only (no inline script, no
eval), so the page can reach nothing but the API it was served with. The page needs no key; the API calls it
makes send theirs (``Authorization: Bearer``, from the session's storage, never in a URL).
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from ..errors import ServiceError

router = APIRouter(tags=["ui"], include_in_schema=False)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidated on every load (the ETag makes that a 304): a new version of the service is seen at once
    "Cache-Control": "no-cache",
}
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".png": "image/png", ".svg": "image/svg+xml"}


class StaticNotFound(ServiceError):
    status_code = 404


@dataclass(frozen=True)
class Static:
    body: bytes
    media_type: str
    etag: str


def _walk(folder: Traversable, prefix: str) -> dict[str, Static]:
    out: dict[str, Static] = {}
    for entry in folder.iterdir():
        path = f"{prefix}{entry.name}"
        if entry.is_dir():
            out.update(_walk(entry, f"{path}/"))
        elif not entry.name.startswith("."):
            suffix = "." + entry.name.rpartition(".")[2]
            media = TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if media.startswith("text/"):
                media += "; charset=utf-8"
            body = entry.read_bytes()
            out[path] = Static(body, media, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return out


@cache
def static_files() -> dict[str, Static]:
    """Every file of ``service/ui/static`` by its path below it (``app.js``, ``vendor/uplot/uPlot.min.css``)."""
    return _walk(resources.files("service.ui") / "static", "")


def _answer(request: Request, path: str) -> Response:
    found = static_files().get(path)
    if found is None:
        raise StaticNotFound(f"no file {path!r} in the web view")
    headers = {**HEADERS, "ETag": found.etag}
    if request.headers.get("if-none-match") == found.etag:
        return Response(status_code=304, headers=headers)
    return Response(found.body, media_type=found.media_type, headers=headers)


@router.get("/ui", summary="The web view")
async def page(request: Request) -> Response:
    return _answer(request, "index.html")


@router.get("/ui/", summary="The web view")
async def page_slash() -> Response:
    return RedirectResponse("/ui", status_code=308, headers=HEADERS)


@router.get("/ui/static/{path:path}", summary="The web view's files")
async def static(request: Request, path: str) -> Response:
    return _answer(request, path)
