from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from starlette.responses import Response

from aihub.core.config import Settings
from aihub.core.errors import Forbidden, Unauthorized
from aihub.storage.base import Storage
from aihub.storage.signing import UrlSigner
from aihub.users.models import User


async def get_storage(request: Request) -> Storage:
    storage: Storage = request.app.state.storage
    return storage


async def get_signer(request: Request) -> UrlSigner:
    signer: UrlSigner = request.app.state.url_signer
    return signer


StorageDep = Annotated[Storage, Depends(get_storage)]
SignerDep = Annotated[UrlSigner, Depends(get_signer)]


def public_base_url(request: Request, settings: Settings) -> str:
    """Where clients reach aihub: `PUBLIC_BASE_URL`, else the request's own base URL."""
    return (settings.public_base_url or str(request.base_url)).rstrip("/")


def reader_of(
    signer: UrlSigner,
    path: str,
    *,
    expires: int | None,
    signature: str | None,
    user: User | None,
    now: datetime,
) -> uuid.UUID | None:
    """Who is reading a stored file: None for the holder of a valid signed link (anyone), else
    the caller, who must then own it. 403 for an invalid or expired link, 401 for neither."""
    if signature is not None or expires is not None:
        valid = (
            signature is not None
            and expires is not None
            and signer.verify(path, expires=expires, signature=signature, now=now)
        )
        if not valid:
            raise Forbidden("This link is invalid or has expired")
        return None
    if user is None:
        raise Unauthorized()
    return user.id


def stored_response(data: bytes, content_type: str) -> Response:
    """A stored file as a response: never sniffed, never run as a page of this origin."""
    return Response(
        data,
        media_type=content_type,
        headers={
            "Cache-Control": "private, max-age=3600",
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "sandbox",
        },
    )
