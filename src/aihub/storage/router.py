"""Uploads: a signed URL to `PUT` a file to, then a link to use it by."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from starlette.responses import Response

from aihub.core.auth import AUTH_ERRORS, CurrentUser, OptionalUser
from aihub.core.clock import Now
from aihub.core.config import SettingsDep
from aihub.core.db import Sessions
from aihub.core.errors import Forbidden, error_responses
from aihub.core.text import Text
from aihub.storage import files
from aihub.storage.dependencies import (
    SignerDep,
    StorageDep,
    public_base_url,
    reader_of,
    stored_response,
)
from aihub.storage.models import StoredFile

router = APIRouter(tags=["files"])


class UploadUrlCreate(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_by_name=True)

    filename: Text = Field(min_length=1, max_length=255)
    content_type: Text = Field(
        default="",
        max_length=100,
        validation_alias=AliasChoices("contentType", "content_type"),
        description="The file's MIME type; empty: taken from the file name",
    )
    size: int | None = Field(default=None, ge=0, description="The file's size in bytes, if known")


class UploadUrlRead(BaseModel):
    url: str = Field(description="`PUT` the raw bytes here, with this Content-Type, no token")
    gcs_url: str = Field(description="A browser-loadable link; send it back to use the file")
    file_id: uuid.UUID
    content_type: str
    expires_at: datetime = Field(description="When `url` stops accepting the upload")
    method: str = "PUT"
    headers: dict[str, str]


@router.post(
    "/api/upload-url",
    summary="Get a signed URL to upload a file to",
    response_model=UploadUrlRead,
    responses=error_responses({**AUTH_ERRORS, 422: "Type not accepted, unknown, or too large"}),
)
async def create_upload_url(
    request: Request,
    body: UploadUrlCreate,
    user: CurrentUser,
    settings: SettingsDep,
    sessions: Sessions,
    storage: StorageDep,
    signer: SignerDep,
    now: Now,
) -> UploadUrlRead:
    """The browser then `PUT`s the file's bytes to `url` (no Authorization header: the URL is
    bound to this file and content type, and expires), and sends `gcs_url` as the media part of
    a chat message. The file is checked when first used: it must exist, fit the size limit
    (`UPLOAD_MAX_BYTES`) and start with bytes of its type."""
    async with sessions.begin() as session:
        stored = await files.create_upload(
            session,
            user_id=user.id,
            filename=body.filename,
            content_type=body.content_type,
            size=body.size,
            allowed=settings.upload_allowed_types,
            max_bytes=settings.upload_max_bytes,
            now=now,
        )
    links = files.FileLinks(storage, signer, public_base_url(request, settings))
    expires_at = files.expiry(now, settings.upload_url_ttl_seconds)
    return UploadUrlRead(
        url=links.upload_url(stored, expires_at),
        gcs_url=links.download_url(stored, files.expiry(now, settings.storage_url_ttl_seconds)),
        file_id=stored.id,
        content_type=stored.content_type,
        expires_at=expires_at,
        headers={"Content-Type": stored.content_type},
    )


_SIGNED = Annotated[int | None, Query(description="From the signed link")]


@router.put(
    "/api/files/{file_id}",
    summary="Upload a file's bytes (local storage; the signed URL from /api/upload-url)",
    responses=error_responses(
        {
            403: "Invalid or expired link, or another Content-Type",
            409: "A message uses the file already: its content can no longer change",
            413: "Too large",
        }
    ),
)
async def upload_file(
    request: Request,
    file_id: uuid.UUID,
    sessions: Sessions,
    storage: StorageDep,
    signer: SignerDep,
    now: Now,
    expires: _SIGNED = None,
    signature: Annotated[str | None, Query(max_length=100)] = None,
) -> dict[str, object]:
    async with sessions() as session:
        stored = await session.get(StoredFile, file_id)
    declared = request.headers.get("content-type", "").strip()
    if declared:
        content_type = files.resolve_content_type("", declared)
    else:  # a browser that could not type the file sends none: the recorded type applies
        content_type = stored.content_type if stored is not None else "-"
    valid = (
        expires is not None
        and signature is not None
        and signer.verify(
            files.file_path(file_id),
            expires=expires,
            signature=signature,
            now=now,
            bound=f"PUT {content_type}",
        )
    )
    if not valid:
        raise Forbidden("This upload link is invalid or has expired, or the Content-Type differs")
    if stored is None:
        raise files.FileNotFound()
    if stored.checked_at is not None:
        # A message uses these bytes (checked then): new ones would change what the chat holds
        # and would reach the model unchecked.
        raise files.UploadSealed()
    # The body limit of this path is UPLOAD_MAX_BYTES (BodySizeLimitMiddleware): 413 beyond.
    data = await request.body()
    await storage.put(stored.key, data, content_type=stored.content_type)
    return {"file_id": str(file_id), "size": len(data)}


@router.get(
    "/api/files/{file_id}",
    summary="Download a stored file (signed link, or the owner's token)",
    response_class=Response,
    responses=error_responses(
        {401: "No token and no signature", 403: "Invalid or expired link", 404: "No such file"}
    ),
)
async def download_file(
    file_id: uuid.UUID,
    sessions: Sessions,
    storage: StorageDep,
    signer: SignerDep,
    user: OptionalUser,
    now: Now,
    expires: _SIGNED = None,
    signature: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    owner = reader_of(
        signer,
        files.file_path(file_id),
        expires=expires,
        signature=signature,
        user=user,
        now=now,
    )
    async with sessions() as session:
        stored = await session.get(StoredFile, file_id)
    if stored is None or (owner is not None and stored.user_id != owner):
        raise files.FileNotFound()
    data = await storage.get(stored.key)
    return stored_response(data.data, stored.content_type)
