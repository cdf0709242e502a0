"""Database: the declarative base, the engine, and the session dependency.

The session dependency commits when the request succeeds and rolls back when it fails; services
only `flush()`. Streams never hold a request session open: they use `Sessions` for short sessions
of their own before the first byte and after the last.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

import sqlalchemy
from fastapi import Depends, Request
from sqlalchemy import DateTime, MetaData, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.dml import ReturningInsert, UpdateBase
from sqlalchemy.types import TypeDecorator
from sqlalchemy.util.concurrency import in_greenlet

from aihub.core.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

Job = Callable[[Connection], T]
"""Synchronous database work (Core statements) on a connection, inside a transaction the caller
does not manage."""

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
            hide_parameters=True,
            connect_args={"timeout": 30},
            pool_size=max(pool_size, 20),
            max_overflow=pool_size,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        event.listen(engine.sync_engine, "invalidate", _sqlite_rollback_before_close)
        return engine
    # asyncpg wants its timeouts as numbers; a URL's query carries strings.
    parsed = make_url(url)
    timeouts = {
        name: float(given)
        for name in ("timeout", "command_timeout")
        if isinstance(given := parsed.query.get(name), str)
    }
    return create_async_engine(
        parsed.difference_update_query(timeouts),
        echo=echo,
        hide_parameters=True,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=pool_size * 2,
        connect_args=timeouts,
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


def create_sessionmaker(engine: AsyncEngine | Engine) -> AppSessions:
    assert isinstance(engine, AsyncEngine)
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        return _SQLiteSessions(engine, expire_on_commit=False)
    return AppSessions(engine, expire_on_commit=False)


class AppSessions(async_sessionmaker[AsyncSession]):
    """The app's sessions: `begin()` for a transaction of one's own, `write(job)` for the short
    writes that run before and after every stream and generation."""

    def __init__(self, engine: AsyncEngine, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self._undoing: set[asyncio.Task[Any]] = set()

    async def write(self, job: Job[T], *, undo: Callable[[T], Job[Any] | None] | None = None) -> T:
        """Run `job` in a transaction and commit it; its result, or its exception.

        A job is synchronous database work on a `Connection` (no other I/O): here it runs
        through the async connection's `run_sync`; on SQLite, batched on a writer thread. A job
        gets a connection, not a session: the ORM's session cost more than the quota
        reservation's statement on the writer thread (0.2 of 0.6 ms). `undo`, given the
        job's result, names the write that reverses it: where writes are batched, it is written
        in the job's place if the caller stops waiting after the job was committed. Here a
        cancelled caller rolls its own transaction back."""
        async with self._engine.begin() as connection:
            return await connection.run_sync(job)

    async def write_each(
        self, job: Job[T], *, undo: Callable[[T], Job[Any] | None] | None = None
    ) -> T:
        """`write` for a job each of whose statements stands on its own (each is atomic, and
        together they are correct in any interleaving): each is committed as it runs. A job of
        one statement costs two round trips to the database (the pool's ping, the statement)
        rather than four (BEGIN and COMMIT besides): an idea stored with its usage row is one.

        Here that is autocommit: a row a statement locks (a user's quota, which every request of
        theirs updates) is locked for that statement only, not until a COMMIT that, under load,
        waits for turns of a busy event loop while every other request for that row queues
        behind it (seconds, for one user's 300 concurrent streams). The job runs to its end even
        if the caller stops waiting; `undo`, if given, then reverses it. On SQLite: `write`."""
        running = asyncio.ensure_future(self._run_autocommitted(job))
        try:
            return await asyncio.shield(running)
        except asyncio.CancelledError:
            reversing = asyncio.get_running_loop().create_task(self._undo(running, undo))
            self._undoing.add(reversing)
            reversing.add_done_callback(self._undoing.discard)
            raise

    def submit_each(
        self, job: Job[T], *, undo: Callable[[T], Job[Any] | None] | None = None
    ) -> asyncio.Future[T]:
        """`write_each`, started now: its outcome as a future, which a caller that stops
        waiting cancels (`undo` then reverses the job once it has run)."""
        return asyncio.ensure_future(self.write_each(job, undo=undo))

    async def _run_autocommitted(self, job: Job[T]) -> T:
        async with self._autocommit.connect() as connection:
            return await connection.run_sync(job)

    @property
    def _engine(self) -> AsyncEngine:
        engine: AsyncEngine = self.kw["bind"]
        return engine

    @functools.cached_property
    def _autocommit(self) -> AsyncEngine:
        """The same pool, with statements that each commit as they run."""
        return self._engine.execution_options(isolation_level="AUTOCOMMIT")

    async def _undo(
        self, running: asyncio.Future[T], undo: Callable[[T], Job[Any] | None] | None
    ) -> None:
        """Once the job its caller left is done, reverse it (if there is a way)."""
        try:
            result = await running
        except Exception:
            return  # it failed: its caller was told nothing, and there is nothing to reverse
        if undo is not None and (reversal := undo(result)) is not None:
            try:
                await self.write(reversal)
            except Exception as exc:
                _reversal_failed(exc)

    async def aclose(self) -> None:
        """Release what the sessions hold beside the engine (call before `engine.dispose()`)."""
        if self._undoing:
            await asyncio.gather(*self._undoing, return_exceptions=True)


@dataclass(eq=False)
class _Write(Generic[T]):
    job: Job[T]
    future: asyncio.Future[T]
    undo: Callable[[T], Job[Any] | None] | None = None


@dataclass(frozen=True, slots=True)
class _Outcome:
    result: Any = None
    error: Exception | None = None


class _SQLiteSessions(AppSessions):
    """SQLite has one writer at a time, so writes here take turns, and those that queue up are
    committed together, on a thread of their own.

    `begin()` transactions take turns on an asyncio lock in this process: a writer that finds
    SQLite's lock taken sleeps in its busy handler (1, 2, 5, ... 100 ms) before it looks again,
    and under a burst most of a write's time went to those sleeps.

    `write(job)` goes further (group commit): the jobs that arrive while a transaction holds the
    lock run together in the next one, in one call to a writer thread with a plain `sqlite3`
    connection. Through aiosqlite every statement is a trip to its thread and back (several per
    transaction), each costing a thread wake-up and a turn of an event loop that, under load, is
    busy with hundreds of streams' chunks: one transaction per write made every stream's quota
    reservation queue behind every other stream's writes (seconds of time to first token at 300
    streams), and the trips cost more CPU than the writes. If a batch fails, its jobs are retried
    one transaction each, so a failing job fails alone.

    A batch goes to the thread from the write that finds the writer idle, and its results come
    back in one callback that settles every write of it and sends the next batch: no task runs
    in between, because under load each task's turn of the loop costs milliseconds of the
    write's time (a quota reservation's: of a stream's first token).
    """

    def __init__(self, engine: AsyncEngine, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self._writer = asyncio.Lock()
        """Held by a `begin()` transaction; batches wait for it to be released."""
        self._queued: list[_Write[Any]] = []
        self._writing: list[_Write[Any]] = []
        """The batch on the writer thread now."""
        self._idle = asyncio.Event()
        """Set while no batch is on the writer thread."""
        self._idle.set()
        self._thread: _WriterThread | None = None
        self._released: Future[None] | None = None
        self._closed = False
        """After `aclose()`: a late write (a request the server stopped waiting for) is still
        written, and the thread and connection it needed are released after it."""

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncSession]:  # type: ignore[override]
        try:
            async with self._writer:
                await self._idle.wait()  # the batch on the thread holds SQLite's write lock
                async with super().begin() as session:
                    yield session
        finally:
            self._send_batch()  # what queued up meanwhile

    async def write(self, job: Job[T], *, undo: Callable[[T], Job[Any] | None] | None = None) -> T:
        write = self._queue(job, undo)
        future = write.future
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.exception() is None:
                # The result came in the same turn as the cancellation, which won: this caller
                # never sees the result, so the write is reversed as if it had been cancelled first.
                self._reverse(write, future.result())
            raise

    async def write_each(
        self, job: Job[T], *, undo: Callable[[T], Job[Any] | None] | None = None
    ) -> T:
        return await self.write(job, undo=undo)

    def submit_each(
        self, job: Job[T], *, undo: Callable[[T], Job[Any] | None] | None = None
    ) -> asyncio.Future[T]:
        # The write's own future: no task in between (under load, a task's first step waits a
        # whole turn of the event loop, and so does the wake-up of whoever awaits it).
        return self._queue(job, undo).future

    def _queue(self, job: Job[T], undo: Callable[[T], Job[Any] | None] | None) -> _Write[T]:
        """Queue the write (cancelled while queued, it is dropped; once it ran, `undo` runs)."""
        write = _Write(job, asyncio.get_running_loop().create_future(), undo)
        self._queued.append(write)
        self._send_batch()
        return write

    async def aclose(self) -> None:
        await super().aclose()
        self._closed = True
        while self._queued or not self._idle.is_set():
            async with self._writer:  # after a `begin()` transaction under way
                pass
            self._send_batch()
            await self._idle.wait()
        if (released := self._release()) is not None:
            await asyncio.wrap_future(released)

    def _send_batch(self) -> None:
        """Send the queued writes to the writer thread, unless a batch or a `begin()`
        transaction is under way (its end sends them)."""
        if self._writing or self._writer.locked():
            return
        batch = [write for write in self._queued if not write.future.cancelled()]
        self._queued = []
        if not batch:
            if self._closed:
                self._release()
            return
        if self._thread is None:
            self._thread = _WriterThread(self._engine)
        self._writing = batch
        self._idle.clear()
        loop = asyncio.get_running_loop()
        done = self._thread.executor.submit(self._thread.run, [write.job for write in batch])
        # The future as the callback's argument: a callback that held it would make a cycle
        # (the future keeps its callbacks), freed only by the garbage collector's full passes.
        done.add_done_callback(lambda done: loop.call_soon_threadsafe(self._batch_done, done))

    def _batch_done(self, done: Future[list[_Outcome]]) -> None:
        batch, self._writing = self._writing, []
        self._idle.set()
        try:
            outcomes = done.result()
        except BaseException as exc:  # the thread could not run it (its executor shut down)
            outcomes = [_Outcome(error=RuntimeError(f"not written: {exc!r}"))] * len(batch)
        for write, outcome in zip(batch, outcomes, strict=True):
            self._settle(write, outcome)
        self._send_batch()

    def _release(self) -> Future[None] | None:
        """Let the writer thread close its connection and end, after the job it may be running:
        its end (the last thread's, if there is none now; None if there never was one). A later
        write starts another."""
        if self._thread is not None:
            thread, self._thread = self._thread, None
            self._released = thread.close()
        return self._released

    def _settle(self, write: _Write[Any], outcome: _Outcome) -> None:
        if not write.future.cancelled():
            if outcome.error is not None:
                write.future.set_exception(outcome.error)
            else:
                write.future.set_result(outcome.result)
            return
        if outcome.error is None:  # its caller left after it was committed
            self._reverse(write, outcome.result)

    def _reverse(self, write: _Write[T], result: T) -> None:
        """Queue the write that reverses `write` (which returned `result`), if there is one."""
        if write.undo is not None and (undo := write.undo(result)) is not None:
            reversal: _Write[Any] = _Write(undo, asyncio.get_running_loop().create_future())
            reversal.future.add_done_callback(_log_failure)
            self._queued.append(reversal)
            self._send_batch()


class _WriterThread:
    """A thread of its own with a plain `sqlite3` connection to the database file, kept open
    between transactions (a pool checkout per write cost more than a quota reservation's
    statement)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.executor = ThreadPoolExecutor(1, "aihub-sqlite-writer")
        self._url = engine.url.set(drivername="sqlite")
        self._echo = engine.echo
        self._connection: Connection | None = None

    def run(self, jobs: list[Job[Any]]) -> list[_Outcome]:
        """On the thread: the jobs in one transaction, or each in its own if that fails."""
        if len(jobs) > 1:
            try:
                return [_Outcome(result) for result in self._transaction(*jobs)]
            except Exception:
                logger.debug("a batch of %d writes failed; retrying them one by one", len(jobs))
        outcomes = []
        for job in jobs:
            try:
                outcomes.append(_Outcome(self._transaction(job)[0]))
            except Exception as exc:
                outcomes.append(_Outcome(error=exc))
        return outcomes

    def close(self) -> Future[None]:
        """Close the connection on the thread (after what it is running), then end it."""
        closed = self.executor.submit(self._close)
        self.executor.shutdown(wait=False)
        return closed

    def _transaction(self, *jobs: Job[Any]) -> list[Any]:
        if self._connection is None:
            plain = sqlalchemy.create_engine(
                self._url,
                echo=self._echo,
                hide_parameters=True,
                connect_args={"timeout": 30},
                pool_size=1,
            )
            event.listen(plain, "connect", _sqlite_pragmas)
            self._connection = plain.connect()
        # A connection that broke is invalidated, and `begin()` reconnects it.
        with self._connection.begin():
            return [job(self._connection) for job in jobs]

    def _close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.close()
            connection.engine.dispose()


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        _reversal_failed(exc)


def _reversal_failed(exc: BaseException) -> None:
    logger.error("a write reversing an abandoned one failed: %s", type(exc).__name__)


async def run_job(session: AsyncSession, job: Job[T]) -> T:
    """`job` on the session's connection, inside the session's transaction, after what the
    session holds is flushed (as `session.execute` would)."""
    await session.flush()
    connection = await session.connection()
    return await connection.run_sync(job)


async def get_sessions(request: Request) -> AppSessions:
    sessions: AppSessions = request.app.state.sessions
    return sessions


Sessions = Annotated[AppSessions, Depends(get_sessions)]


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


class DriverStatement:
    """A Core DML statement that runs straight on the driver's cursor where it can, inside the
    `Connection`'s transaction: compiled once, its parameters converted by the types' own
    dialect implementations, without SQLAlchemy's execution around it (its compiled cache,
    events, result objects). Elsewhere it runs through `execute`.

    For a statement before every stream's first token on SQLite's writer thread (the quota
    reservation): there the thread's work is a turn the event loop waits for, and SQLAlchemy's
    execution took longer than SQLite's own (a reservation in its transaction: 0.77 against
    0.50 ms cold, 0.21 against 0.13 warm). Only the plain `sqlite3` driver takes the shortcut
    (`runs_on`): elsewhere a statement may be cancelled halfway (aiosqlite), or a round trip
    costs far more than this (PostgreSQL), and with `DATABASE_ECHO` every statement is to be
    logged. The driver's errors are raised as SQLAlchemy's, as `execute` raises them."""

    def __init__(self, statement: UpdateBase) -> None:
        self.statement = statement
        self._compiled: tuple[str, tuple[str, ...], tuple[Any, ...]] | None = None
        """The SQL, its parameters' names in order and their conversions, once compiled."""

    @staticmethod
    def runs_on(connection: Connection) -> bool:
        """Whether the statement takes the driver's cursor on `connection`."""
        return connection.dialect.driver == "pysqlite" and not connection.engine.echo

    def first(
        self, connection: Connection, parameters: Mapping[str, Any]
    ) -> tuple[Any, ...] | None:
        """The first row the statement returns (None: none)."""
        if not self.runs_on(connection):
            row = connection.execute(self.statement, parameters).first()
            return None if row is None else tuple(row)
        sql, names, processors = self._compiled or self._compile(connection.dialect)
        values = tuple(
            parameters[name] if process is None else process(parameters[name])
            for name, process in zip(names, processors, strict=True)
        )
        dbapi = connection.dialect.loaded_dbapi
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql, values)
            first: tuple[Any, ...] | None = cursor.fetchone()
            return first
        except dbapi.Error as exc:
            raise DBAPIError.instance(
                sql, values, exc, dbapi.Error, hide_parameters=True, dialect=connection.dialect
            ) from exc
        finally:
            cursor.close()

    def _compile(self, dialect: Dialect) -> tuple[str, tuple[str, ...], tuple[Any, ...]]:
        compiled = self.statement.compile(dialect=dialect)
        names = tuple(compiled.positiontup or ())
        processors = tuple(
            # The dialect's own implementation of each type: SQLite's formats datetimes.
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in names
        )
        self._compiled = (compiled.string, names, processors)
        return self._compiled


def dialect_insert(
    session: AsyncSession | Session | Connection, table: Any
) -> postgresql.Insert | sqlite.Insert:
    """An INSERT with `ON CONFLICT` support in the session's dialect (SQLite or PostgreSQL)."""
    bind = session if isinstance(session, Connection) else session.get_bind()
    if bind.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def insert_if_absent_statement(
    session: AsyncSession | Session | Connection, model: type[Base], **values: Any
) -> ReturningInsert[Any]:
    """`INSERT ... ON CONFLICT DO NOTHING RETURNING` the primary key, in the session's dialect."""
    return (
        dialect_insert(session, model)
        .values(**values)
        .on_conflict_do_nothing()
        .returning(*inspect(model).primary_key)
    )


async def insert_if_absent(session: AsyncSession, model: type[Base], **values: Any) -> bool:
    """`INSERT ... ON CONFLICT DO NOTHING`, one atomic statement: whether this call inserted the
    row (False: it, or a row clashing with a unique key, was already there)."""
    statement = insert_if_absent_statement(session, model, **values)
    return (await session.execute(statement)).first() is not None
