"""Keyset pagination over (created_at, id), newest first, with opaque cursors."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, Select, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from aihub.core.errors import Unprocessable

T = TypeVar("T")


def encode_cursor(created_at: datetime, id: uuid.UUID | str) -> str:
    raw = f"{created_at.isoformat()}|{id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, id_type: Callable[[str], Any] = uuid.UUID) -> tuple[datetime, Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, _, id = raw.partition("|")
        at = datetime.fromisoformat(created_at)
        if at.tzinfo is None:
            raise ValueError("cursor time without a zone")
        return at, id_type(id)
    except (ValueError, UnicodeDecodeError):
        raise Unprocessable("cursor: not a cursor this API returned") from None


def newest_first(
    query: Select[T],
    *,
    created_at: InstrumentedAttribute[datetime],
    id: InstrumentedAttribute[Any],
    cursor: str | None,
    limit: int,
    id_type: Callable[[str], Any] = uuid.UUID,
) -> Select[T]:
    """Order newest first and start after `cursor`; fetches one extra row to detect more."""
    if cursor is not None:
        after_at, after_id = decode_cursor(cursor, id_type)
        query = query.where(or_(created_at < after_at, and_(created_at == after_at, id < after_id)))
    return query.order_by(created_at.desc(), id.desc()).limit(limit + 1)


class _Keyed(Protocol):
    created_at: datetime

    @property
    def id(self) -> uuid.UUID | str: ...


K = TypeVar("K", bound=_Keyed)


async def page_newest_first(
    session: AsyncSession,
    model: type[K],
    *,
    where: ColumnElement[bool],
    limit: int,
    cursor: str | None,
    id_type: Callable[[str], Any] = uuid.UUID,
    at: str = "created_at",
) -> tuple[list[K], str | None]:
    """One page of `model`'s rows matching `where`, newest first by `at` (a timestamp column),
    and the next page's cursor."""
    query = newest_first(
        select(model).where(where),
        created_at=getattr(model, at),
        id=model.id,  # type: ignore[arg-type]
        cursor=cursor,
        limit=limit,
        id_type=id_type,
    )
    rows = list((await session.scalars(query)).all())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(getattr(last, at), last.id)
