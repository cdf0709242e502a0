"""Database: the declarative base, the engine, and the session dependency.

The session dependency commits when the request succeeds and rolls back when it fails; services
only `flush()`. Streams never hold a request session open: they use `Sessions` for short sessions
of their own before the first byte and after the last.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from sqlalchemy import DateTime, MetaData, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.types import TypeDecorator
from sqlalchemy.util.concurrency import in_greenlet

from aihub.core.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime}


class IdMixin:
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    if url.startswith("sqlite"):
        # Opening an aiosqlite connection costs a thread and the pragmas: keep enough open that
        # a burst of requests never churns through new ones.
        engine = create_async_engine(
            url,
            echo=echo,
            connect_args={"timeout": 30},
            pool_size=max(pool_size, 20),
            max_overflow=pool_size,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "invalidate", _sqlite_rollback_before_close)
        return engine
    return create_async_engine(
        url, echo=echo, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size * 2
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_rollback_before_close(
    dbapi_connection: Any, _record: ConnectionPoolEntry, _exc: BaseException | None
) -> None:
    """A task cancelled inside a statement (a client that left, a worker stopping) gets its
    connection thrown away rather than rolled back. When that statement was still open (an
    `UPDATE ... RETURNING` not read to its end), closing the connection alone leaves SQLite's
    write lock held until the statement is freed, and every later write waits out its busy
    timeout and fails. A rollback first aborts the statement and frees the lock."""
    if dbapi_connection is None or not in_greenlet():
        return  # garbage collection of a lost connection: nothing can be awaited here
    try:
        dbapi_connection.rollback()
    except Exception as exc:  # already broken: closing it is all that is left
        logger.debug("rollback before closing a connection failed: %s", type(exc).__name__)


async def ping(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Raise `DatabaseUnavailable` unless the database answers a trivial query."""
    try:
        async with sessions() as session:
            await session.execute(text("SELECT 1"))
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"The database does not answer ({type(exc).__name__})") from exc


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


def create_sessionmaker(engine: AsyncEngine | Engine) -> async_sessionmaker[AsyncSession]:
    assert isinstance(engine, AsyncEngine)
    if engine.dialect.name == "sqlite":
        return _SQLiteSessions(engine, expire_on_commit=False)
    return async_sessionmaker(engine, expire_on_commit=False)


class _SQLiteSessions(async_sessionmaker[AsyncSession]):
    """`begin()` transactions (the short writes of streams and generations) take turns in this
    process. SQLite has one writer at a time, and a writer that finds the lock taken sleeps in
    its busy handler (1, 2, 5, ... 100 ms) before it looks again: under a burst, most of a write's
    time went to those sleeps. Queued on an asyncio lock instead, the next one starts the moment
    the previous one ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._writer = asyncio.Lock()

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:  # type: ignore[override]
        async with self._writer, super().begin() as session:
            yield session


async def get_sessions(request: Request) -> async_sessionmaker[AsyncSession]:
    sessions: async_sessionmaker[AsyncSession] = request.app.state.sessions
    return sessions


Sessions = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessions)]


async def get_session(sessions: Sessions) -> AsyncIterator[AsyncSession]:
    async with sessions() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        else:
            await session.commit()


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


def dialect_insert(session: AsyncSession, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with `ON CONFLICT` support in the session's dialect (SQLite or PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


async def insert_if_absent(session: AsyncSession, model: type[Base], **values: Any) -> bool:
    """`INSERT ... ON CONFLICT DO NOTHING`, one atomic statement: whether this call inserted the
    row (False: it, or a row clashing with a unique key, was already there)."""
    statement = (
        dialect_insert(session, model)
        .values(**values)
        .on_conflict_do_nothing()
        .returning(*inspect(model).primary_key)
    )
    return (await session.execute(statement)).first() is not None
