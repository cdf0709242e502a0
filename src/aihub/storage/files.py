"""Uploaded files: signed upload and download links, the check on first use, and clean-up.

A browser uploads straight to the storage backend with a signed `PUT` URL (no token: the URL is
the authority, bound to the file, its content type and an expiry). For the local backend aihub
serves those URLs itself (`/api/files/{id}`); GCS and S3 sign their own. Nothing is trusted until
the file is first used: it must exist, be within the size limit, and begin with bytes that match
its declared type.
"""

from __future__ import annotations

import logging
import mimetypes
import re
import unicodedata
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aihub.core.errors import Conflict, NotFound, Unprocessable
from aihub.storage.base import RUNS_AS_A_PAGE, ObjectNotFound, Storage
from aihub.storage.models import StoredFile
from aihub.storage.signing import UrlSigner

logger = logging.getLogger("aihub.storage")

_REFERENCE = re.compile(
    r"/api/files/(?P<id>[0-9a-fA-F-]{36})|uploads/[^/]+/(?P<key_id>[0-9a-fA-F-]{36})-"
)


class FileNotFound(NotFound):
    code = "file_not_found"
    default_message = "No such file"


class UploadRefused(Unprocessable):
    code = "upload_refused"


class UploadSealed(Conflict):
    code = "upload_sealed"
    default_message = (
        "A message uses this file already, so its content can no longer change: upload the new "
        "content as a new file"
    )


_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,60}/[a-z0-9][a-z0-9.+-]{0,60}")


def file_path(file_id: uuid.UUID) -> str:
    return f"/api/files/{file_id}"


def resolve_content_type(filename: str, declared: str) -> str:
    """The declared type (lower case, no parameters), or one from the file name when empty."""
    content_type = declared.split(";", 1)[0].strip().lower()
    if content_type:
        return content_type
    guessed, _ = mimetypes.guess_type(filename, strict=False)
    if guessed is None:
        raise UploadRefused(
            "contentType: empty, and the file name does not tell the type; send the file's MIME "
            "type (for example image/png)"
        )
    return guessed


def is_allowed(content_type: str, allowed: Sequence[str]) -> bool:
    family = content_type.split("/", 1)[0] + "/*"
    return content_type in allowed or family in allowed


def safe_filename(name: str) -> str:
    """A file name fit for a storage key: ASCII letters, digits, `.`, `_` and `-` only."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_name.rsplit("/", 1)[-1]).strip("._-")
    return cleaned[-100:] or "file"


async def create_upload(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    filename: str,
    content_type: str,
    size: int | None,
    allowed: Sequence[str],
    max_bytes: int,
    now: datetime,
) -> StoredFile:
    """Record a file about to be uploaded (its checks come when it is first used)."""
    content_type = resolve_content_type(filename, content_type)
    if not is_allowed(content_type, allowed):
        # Named only when it is a media type, so a refusal never reflects arbitrary input.
        named = content_type if _MEDIA_TYPE.fullmatch(content_type) else "files of this type"
        raise UploadRefused(f"contentType: {named} files are not accepted")
    if size is not None and size > max_bytes:
        raise UploadRefused(f"size: files may be at most {_megabytes(max_bytes)}")
    file_id = uuid.uuid4()
    stored = StoredFile(
        id=file_id,
        user_id=user_id,
        key=f"uploads/{user_id}/{file_id}-{safe_filename(filename)}",
        filename=filename[:255],
        content_type=content_type,
        declared_size=size,
        created_at=now,
    )
    session.add(stored)
    await session.flush()
    return stored


class FileLinks:
    """Links to stored files: the backend's own signed URLs, or aihub's (`/api/files/{id}`)."""

    def __init__(self, storage: Storage, signer: UrlSigner, base_url: str) -> None:
        self.storage, self.signer, self.base_url = storage, signer, base_url.rstrip("/")

    def upload_url(self, file: StoredFile, expires_at: datetime) -> str:
        own = self.storage.presigned_put(file.key, file.content_type, expires_at)
        if own is not None:
            return own
        bound = f"PUT {file.content_type}"
        return self.signer.link(
            self.base_url, file_path(file.id), expires_at=expires_at, bound=bound
        )

    def download_url(self, file: StoredFile, expires_at: datetime) -> str:
        attachment = file.content_type in RUNS_AS_A_PAGE
        own = self.storage.presigned_get(file.key, expires_at, attachment=attachment)
        if own is not None:
            return own
        return self.signer.link(self.base_url, file_path(file.id), expires_at=expires_at)


def reference_id(reference: str) -> uuid.UUID | None:
    """The file id inside a link this API handed out (`gcs_url` or `url`), if any."""
    match = _REFERENCE.search(reference)
    if match is None:
        return None
    try:
        return uuid.UUID(match.group("id") or match.group("key_id"))
    except ValueError:
        return None


async def owned_file(
    session: AsyncSession, *, user_id: uuid.UUID, file_id: uuid.UUID
) -> StoredFile:
    """The caller's file; another user's is as unknown as a missing one."""
    file = await session.get(StoredFile, file_id)
    if file is None or file.user_id != user_id:
        raise FileNotFound()
    return file


async def file_by_reference(
    session: AsyncSession, *, user_id: uuid.UUID, reference: str
) -> StoredFile:
    file_id = reference_id(reference)
    if file_id is None:
        raise UploadRefused("messages: a media part's text must be the gcs_url of an upload")
    return await owned_file(session, user_id=user_id, file_id=file_id)


async def check_upload(storage: Storage, file: StoredFile, *, max_bytes: int) -> bytes:
    """The file's bytes, once they are known to exist, fit the limit and match the type."""
    try:
        data = await storage.get(file.key)
    except ObjectNotFound:
        raise UploadRefused(f"{file.filename}: the file was never uploaded") from None
    if len(data.data) > max_bytes:
        raise UploadRefused(f"{file.filename}: larger than {_megabytes(max_bytes)}")
    if not sniff_matches(file.content_type, data.data):
        raise UploadRefused(f"{file.filename}: its content is not {file.content_type}")
    return data.data


def still_as_checked(file: StoredFile, data: bytes) -> bool:
    """Whether bytes read again are still what was checked on first use. A signed `PUT` URL of
    GCS or S3 cannot be revoked, so until it expires it could replace them."""
    return (file.size is None or len(data) == file.size) and sniff_matches(file.content_type, data)


_SIGNATURES: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",),
    "audio/mpeg": (b"ID3", b"\xff\xfb", b"\xff\xf3", b"\xff\xf2"),
    "audio/ogg": (b"OggS",),
    "audio/flac": (b"fLaC",),
    "video/webm": (b"\x1a\x45\xdf\xa3",),
    "audio/webm": (b"\x1a\x45\xdf\xa3",),
}
_RIFF = {"image/webp": b"WEBP", "audio/wav": b"WAVE", "audio/x-wav": b"WAVE", "video/avi": b"AVI "}
_FTYP = ("video/mp4", "video/quicktime", "audio/mp4", "audio/x-m4a", "image/heic", "image/avif")


def sniff_matches(content_type: str, data: bytes) -> bool:
    """Whether the first bytes fit the type. Types without a known signature pass; text must be
    UTF-8 without NUL characters."""
    if not data:
        return False
    if content_type in _SIGNATURES:
        return data.startswith(_SIGNATURES[content_type])
    if content_type in _RIFF:
        return data[:4] == b"RIFF" and data[8:12] == _RIFF[content_type]
    if content_type in _FTYP:
        return data[4:8] == b"ftyp"
    if content_type.startswith("text/") or content_type == "application/json":
        try:
            text = data[:65536].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < 65536 - 4:  # not just a character cut at the sample's end
                return False
            text = ""
        return "\x00" not in text
    return True


async def delete_stored(storage: Storage, keys: Sequence[str]) -> None:
    """Remove stored objects, logging (not raising) what could not be removed."""
    for key in keys:
        try:
            await storage.delete(key)
        except OSError as exc:
            logger.warning("could not delete a stored file: %s", type(exc).__name__)


async def remove_orphans(
    sessions: async_sessionmaker[AsyncSession], storage: Storage, *, older_than: datetime
) -> int:
    """Remove uploads no message ever used, created before `older_than`."""
    async with sessions.begin() as session:
        doomed = (
            (
                await session.execute(
                    delete(StoredFile)
                    .where(StoredFile.attached_at.is_(None), StoredFile.created_at < older_than)
                    .returning(StoredFile.key)
                )
            )
            .scalars()
            .all()
        )
    await delete_stored(storage, list(doomed))
    return len(doomed)


async def files_of(
    session: AsyncSession, file_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, StoredFile]:
    if not file_ids:
        return {}
    rows = await session.scalars(select(StoredFile).where(StoredFile.id.in_(file_ids)))
    return {row.id: row for row in rows}


def _megabytes(size: int) -> str:
    return f"{size / 1024 / 1024:g} MB" if size >= 1024 * 1024 else f"{size} bytes"


def expiry(now: datetime, seconds: int) -> datetime:
    return now + timedelta(seconds=seconds)
