"""The storage interface."""

from __future__ import annotations

import logging
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime

from aihub.core.errors import NotFound

logger = logging.getLogger("aihub.storage")

USER_PREFIXES = ("images", "uploads")
"""Every key a user owns starts with one of these, then their id."""

_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


class ObjectNotFound(NotFound):
    code = "file_not_found"
    default_message = "No such file"


@dataclass(frozen=True, slots=True)
class StoredObject:
    data: bytes
    content_type: str


def check_key(key: str) -> str:
    """`key` if every segment is safe (no `..`, no leading dot, no empty segment)."""
    segments = key.split("/")
    if not segments or not all(_SEGMENT.fullmatch(s) and ".." not in s for s in segments):
        raise ValueError(f"unsafe storage key {key!r}")
    return key


class Storage(ABC):
    name: str

    @abstractmethod
    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store `data` under `key`, replacing what was there (atomically: a reader sees the old
        object or the new one, never a part)."""

    @abstractmethod
    async def get(self, key: str) -> StoredObject:
        """The object; `ObjectNotFound` when there is none."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object, if it exists."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix/`; how many were removed."""

    def presigned_put(self, key: str, content_type: str, expires_at: datetime) -> str | None:
        """A URL a browser can `PUT` the object to without a token, bound to `content_type`;
        None when aihub serves uploads itself (the local backend)."""
        return None

    def presigned_get(self, key: str, expires_at: datetime) -> str | None:
        """A URL a browser can `GET` the object from until `expires_at`; None when aihub serves
        it itself."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients."""


async def delete_user_files(storage: Storage, user_id: uuid.UUID) -> int:
    """Remove everything `user_id` owns (their rows are gone with the user: these are the
    files). Failures are logged, not raised: the user is deleted either way."""
    removed = 0
    for prefix in USER_PREFIXES:
        try:
            removed += await storage.delete_prefix(f"{prefix}/{user_id}")
        except OSError as exc:
            logger.warning("could not delete a deleted user's files: %s", type(exc).__name__)
    return removed
