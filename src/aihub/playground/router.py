"""Serves the playground page, its script and its stylesheet.

The three files are read once, at import, from the package (`importlib.resources`, so they ship
in the wheel): a request never touches the disk. Every answer carries a strict
Content-Security-Policy (the page has no inline script or style) and `Cache-Control: no-cache`,
with an ETag so a revalidation costs a 304.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import Response

router = APIRouter(include_in_schema=False)

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob: https:; connect-src {connect}; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
)


def _policy(request: Request) -> str:
    """With a cloud storage backend the browser uploads straight to the bucket (another origin)."""
    local = request.app.state.settings.storage_backend == "local"
    return CONTENT_SECURITY_POLICY.format(connect="'self'" if local else "'self' https:")


@dataclass(frozen=True, slots=True)
class _Asset:
    body: bytes
    media_type: str
    etag: str


def _load(name: str, media_type: str) -> _Asset:
    body = resources.files("aihub.playground").joinpath("static", name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    return _Asset(body, media_type, etag)


_PAGE = _load("index.html", "text/html; charset=utf-8")
_SCRIPT = _load("app.js", "text/javascript; charset=utf-8")
_STYLES = _load("app.css", "text/css; charset=utf-8")


def _serve(request: Request, asset: _Asset) -> Response:
    headers = {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": _policy(request),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "ETag": asset.etag,
    }
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else asset.body
    response = Response(body, media_type=asset.media_type, headers=headers)
    if request.method == "HEAD":
        response.headers["Content-Length"] = str(len(asset.body))
    return response


@router.api_route("/", methods=["GET", "HEAD"])
@router.api_route("/playground", methods=["GET", "HEAD"])
async def page(request: Request) -> Response:
    """The playground page."""
    return _serve(request, _PAGE)


@router.api_route("/playground/app.js", methods=["GET", "HEAD"])
async def script(request: Request) -> Response:
    return _serve(request, _SCRIPT)


@router.api_route("/playground/app.css", methods=["GET", "HEAD"])
async def styles(request: Request) -> Response:
    return _serve(request, _STYLES)
