"""`Idempotency-Key` on the generate endpoints: the same key replays the first answer and is
charged once.

The first request with a key claims it (one atomic insert, committed at once, so a concurrent
duplicate sees the claim); its answer is stored in the same transaction as the work it did. A
duplicate while the first still runs gets 409; the same key with another body, 422; a failed
first request releases the key so that a retry can run. A claim left pending by a crashed process
is taken over after `STALE_AFTER`; a key is remembered for `KEEP_FOR`.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import TracebackType
from typing import Annotated, TypeVar

from fastapi import Header
from sqlalchemy import ColumnElement, delete, or_, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aihub.core.db import insert_if_absent
from aihub.core.errors import Conflict, Unprocessable
from aihub.usage.models import IdempotencyKey

T = TypeVar("T")

STALE_AFTER = timedelta(minutes=10)
KEEP_FOR = timedelta(hours=24)

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Any unique string (a UUID, say): a retry with the same key replays the "
        "first answer instead of generating (and charging) again. Kept for 24 hours.",
    ),
]


class IdempotencyInProgress(Conflict):
    code = "idempotency_in_progress"
    default_message = "A request with this Idempotency-Key is still being processed"


class IdempotencyKeyReused(Unprocessable):
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was used with a different request body"


IDEMPOTENCY_ERRORS = {
    409: "A request with the same Idempotency-Key is still running",
    422: "Invalid body, or an Idempotency-Key reused with another body",
}


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: bytes


class IdempotentRequest:
    """`async with IdempotentRequest(...) as request:` then either `request.replay` is the stored
    answer, or the caller does the work and calls `complete` in the transaction that saves it.
    With `key=None` it does nothing."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        user_id: uuid.UUID,
        scope: str,
        key: str | None,
        fingerprint: str,
        now: datetime,
    ) -> None:
        self._sessions = sessions
        self._pk = (user_id, scope, key)
        self._key = key
        self._hash = hashlib.sha256(f"{scope}\x1f{fingerprint}".encode()).hexdigest()
        self._now = now
        self._owned = False
        self._completed = False
        self.replay: StoredResponse | None = None

    async def __aenter__(self) -> IdempotentRequest:
        if self._key is not None:
            for _ in range(3):  # the row can vanish between the two statements: look again
                if await self._claim():
                    break
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._owned and not self._completed:
            async with self._sessions.begin() as session:
                await session.execute(
                    delete(IdempotencyKey).where(
                        *self._where(), IdempotencyKey.status_code.is_(None)
                    )
                )

    async def complete(self, session: AsyncSession, *, status_code: int, body: bytes) -> None:
        """Store the answer; call it inside the transaction that saves the work."""
        if not self._owned:
            return
        await session.execute(
            update(IdempotencyKey)
            .where(*self._where())
            .values(status_code=status_code, response_body=body.decode())
        )
        self._completed = True

    def saver(
        self, render: Callable[[T], bytes], *, status_code: int = 200
    ) -> Callable[[AsyncSession, T], Awaitable[None]]:
        """A hook that stores `render(result)` as the answer, in the caller's transaction."""

        async def save(session: AsyncSession, result: T) -> None:
            await self.complete(session, status_code=status_code, body=render(result))

        return save

    async def _claim(self) -> bool:
        """True once decided: owned, or a replay. False: look again."""
        async with self._sessions.begin() as session:
            if await self._insert(session):
                self._owned = True
                return True
            row = await session.get(IdempotencyKey, self._pk, populate_existing=True)
            if row is None:
                return False
            if await self._take_over(session, row):
                self._owned = True
                return True
            if row.request_hash != self._hash:
                raise IdempotencyKeyReused()
            if row.status_code is None or row.response_body is None:
                raise IdempotencyInProgress(headers={"Retry-After": "1"})
            self.replay = StoredResponse(row.status_code, row.response_body.encode())
            return True

    async def _insert(self, session: AsyncSession) -> bool:
        user_id, scope, key = self._pk
        return await insert_if_absent(
            session,
            IdempotencyKey,
            user_id=user_id,
            scope=scope,
            key=key,
            request_hash=self._hash,
            created_at=self._now,
        )

    async def _take_over(self, session: AsyncSession, row: IdempotencyKey) -> bool:
        """Claim a key whose first request died, or that has been kept long enough."""
        abandoned = IdempotencyKey.status_code.is_(None) & (
            IdempotencyKey.created_at <= self._now - STALE_AFTER
        )
        expired = IdempotencyKey.created_at <= self._now - KEEP_FOR
        result = await session.execute(
            update(IdempotencyKey)
            .where(*self._where(), IdempotencyKey.created_at == row.created_at)
            .where(or_(abandoned, expired))
            .values(
                request_hash=self._hash,
                status_code=None,
                response_body=None,
                created_at=self._now,
            )
            .execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    def _where(self) -> tuple[ColumnElement[bool], ...]:
        user_id, scope, key = self._pk
        return (
            IdempotencyKey.user_id == user_id,
            IdempotencyKey.scope == scope,
            IdempotencyKey.key == key,
        )
