"""The storage interface."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import httpx

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


_TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Retries:
    """How a bucket's transient failures are retried: connection errors and 408, 429 and 5xx
    answers, up to `attempts` tries in all, with exponential backoff and full jitter from
    `first_delay` (GCS's and S3's own guidance). Every request the backends send is idempotent:
    an upload writes the same bytes to the same name again."""

    attempts: int = 3
    first_delay: float = 0.2
    max_delay: float = 5.0

    async def send(self, send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
        """`send()`'s response: the first that is not transient, or the last one; its
        `httpx.TransportError` once the tries are spent."""
        for attempt in range(1, self.attempts + 1):
            try:
                response = await send()
            except httpx.TransportError:
                if attempt == self.attempts:
                    raise
            else:
                if response.status_code not in _TRANSIENT_STATUSES or attempt == self.attempts:
                    return response
            delay = min(self.max_delay, self.first_delay * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, delay))  # noqa: S311 - jitter, not a secret
        raise AssertionError("unreachable: the last attempt returns or raises")


DEFAULT_RETRIES = Retries()


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

    def presigned_get(
        self, key: str, expires_at: datetime, *, attachment: bool = False
    ) -> str | None:
        """A URL a browser can `GET` the object from until `expires_at`; None when aihub serves
        it itself. `attachment`: the store answers with `Content-Disposition: attachment`, so a
        browser that opens the link saves the file rather than showing it as a page."""
        return None

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release clients."""


RUNS_AS_A_PAGE = frozenset(
    {"text/html", "application/xhtml+xml", "image/svg+xml", "text/xml", "application/xml"}
)
"""Types a browser opening the file renders as a document that runs scripts. aihub serves them
sandboxed (`stored_response`); a bucket's signed link cannot, so it makes them downloads."""


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
