"""The engine as `aihub.core.db` builds it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import random
import secrets
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, event, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from aihub.core.db import AppSessions, create_engine, create_sessionmaker


def _can_write(path: Path) -> bool:
    connection = sqlite3.connect(path, timeout=0.5)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.rollback()
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        connection.close()


async def test_a_task_cancelled_mid_statement_leaves_sqlite_writable(tmp_path: Path) -> None:
    """Cancelling a task inside an `UPDATE ... RETURNING` (a worker stopping, a client leaving)
    must not leave the write lock behind: it used to stay held by the thrown-away connection
    for as long as the cancelled task's traceback lived, and every later write failed with
    "database is locked" after its busy timeout."""
    path = tmp_path / "cancel.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path.as_posix()}")
    sessions = create_sessionmaker(engine)
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE counter (n INTEGER)"))
        await connection.execute(text("INSERT INTO counter VALUES (0), (0), (0)"))

    async def write_forever() -> None:
        while True:
            async with sessions.begin() as session:
                await session.scalar(text("UPDATE counter SET n = n + 1 RETURNING n"))

    rng = random.Random(7)
    cancelled = []  # kept, as a real program may keep them (logs, task results)
    try:
        for _ in range(200):
            task = asyncio.create_task(write_forever())
            await asyncio.sleep(rng.random() * 0.005)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            cancelled.append(task)
            assert await asyncio.to_thread(_can_write, path)
        async with sessions.begin() as session:  # and the pool still works
            assert await session.scalar(text("SELECT count(*) FROM counter")) == 3
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def _counter_sessions(tmp_path: Path) -> AsyncIterator[tuple[AppSessions, list[int]]]:
    """A SQLite database with a `counter` table, its sessions, and a list of the commits of
    every connection to it."""
    engine = create_engine(f"sqlite+aiosqlite:///{(tmp_path / 'writes.db').as_posix()}")
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER)"))
        await connection.execute(text("INSERT INTO counter VALUES (1, 0)"))
    commits: list[int] = []

    def count(_connection: Connection) -> None:
        commits.append(1)

    event.listen(Engine, "commit", count)  # the writer thread's engine is the sessions' own
    sessions = create_sessionmaker(engine)
    try:
        yield sessions, commits
    finally:
        event.remove(Engine, "commit", count)
        await sessions.aclose()
        await engine.dispose()


def _add(n: int) -> Callable[[Connection], int]:
    def job(connection: Connection) -> int:
        return int(connection.scalar(text(f"UPDATE counter SET n = n + {n} RETURNING n")))

    return job


async def _total(sessions: AppSessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(text("SELECT n FROM counter")))


async def test_writes_that_queue_up_on_sqlite_are_committed_together(tmp_path: Path) -> None:
    async with _counter_sessions(tmp_path) as (sessions, commits):
        results = await asyncio.gather(*(sessions.write(_add(1)) for _ in range(50)))
        assert sorted(results) == list(range(1, 51))  # each job saw its own write
        assert await _total(sessions) == 50
        assert 1 <= len(commits) < 10  # not one transaction each


async def test_a_write_on_sqlite_leaves_no_cycle_behind(tmp_path: Path) -> None:
    """What a write makes is freed as it ends: garbage in reference cycles waits for the
    collector's full passes, which stop the event loop for as long as they take."""
    async with _counter_sessions(tmp_path) as (sessions, _):
        await sessions.write(_add(1))  # the writer thread and its connection, made once
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(3):
                await sessions.write(_add(1))
            await asyncio.sleep(0)
            gc.collect()
            left = [type(o).__qualname__ for o in gc.garbage if type(o) in _WRITE_TYPES]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
    assert left == []


_WRITE_TYPES = (concurrent.futures.Future, asyncio.Future)


async def test_a_write_waits_for_a_transaction_under_way_and_follows_it(tmp_path: Path) -> None:
    async with _counter_sessions(tmp_path) as (sessions, _):
        async with sessions.begin() as session:
            await session.execute(text("UPDATE counter SET n = n + 5"))
            writing = asyncio.create_task(sessions.write(_add(1)))
            await asyncio.sleep(0.05)
            assert not writing.done()  # SQLite's write lock is the transaction's
        assert await asyncio.wait_for(writing, timeout=2) == 6


async def test_closing_the_sessions_writes_what_is_queued_first(tmp_path: Path) -> None:
    async with _counter_sessions(tmp_path) as (sessions, _):
        async with sessions.begin():
            writing = [asyncio.create_task(sessions.write(_add(1))) for _ in range(3)]
            await asyncio.sleep(0)
            closing = asyncio.create_task(sessions.aclose())
            await asyncio.sleep(0.05)
            assert not closing.done()
        await asyncio.wait_for(closing, timeout=2)
        assert sorted([await w for w in writing]) == [1, 2, 3]


async def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    def clash(connection: Connection) -> None:
        connection.execute(text("INSERT INTO counter VALUES (1, 0)"))  # the key is taken

    async with _counter_sessions(tmp_path) as (sessions, _):
        outcomes = await asyncio.gather(
            *(sessions.write(_add(1)) for _ in range(5)),
            sessions.write(clash),
            *(sessions.write(_add(1)) for _ in range(5)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[5], IntegrityError)
        assert all(isinstance(outcome, int) for i, outcome in enumerate(outcomes) if i != 5)
        assert await _total(sessions) == 10


async def test_a_write_whose_caller_left_before_it_ran_is_dropped(tmp_path: Path) -> None:
    running, release = threading.Event(), threading.Event()

    def slow(connection: Connection) -> int:
        running.set()
        release.wait(10)  # holds the writer while the next writes queue up
        return _add(1)(connection)

    async with _counter_sessions(tmp_path) as (sessions, _):
        first = asyncio.create_task(sessions.write(slow))
        await asyncio.to_thread(running.wait, 10)
        second = asyncio.create_task(sessions.write(_add(100)))
        third = asyncio.create_task(sessions.write(_add(10)))  # the same batch as the second
        await asyncio.sleep(0.05)
        second.cancel()
        release.set()
        assert await first == 1
        assert await third == 11
        with contextlib.suppress(asyncio.CancelledError):
            await second
        assert await _total(sessions) == 11


def _held_reservation() -> tuple[Callable[[Connection], int], threading.Event, threading.Event]:
    """A job adding 1 that then holds the writer thread: the job, set once it added, and what
    lets it return."""
    running, release = threading.Event(), threading.Event()

    def reserve(connection: Connection) -> int:
        n = _add(1)(connection)
        running.set()
        release.wait(10)
        return n

    return reserve, running, release


def _give_back(n: int) -> Callable[[Connection], int]:
    assert n == 1
    return _add(-1)


async def test_a_write_whose_caller_left_after_it_ran_is_undone(tmp_path: Path) -> None:
    reserve, running, release = _held_reservation()
    async with _counter_sessions(tmp_path) as (sessions, _):
        caller = asyncio.create_task(sessions.write(reserve, undo=_give_back))
        await asyncio.to_thread(running.wait, 10)
        caller.cancel()  # while its job runs: too late to drop it
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await sessions.write(_add(0))  # after the reversal, which was queued first
        assert await _total(sessions) == 0


async def test_a_write_whose_caller_left_as_its_result_came_is_undone(tmp_path: Path) -> None:
    """The result is set and its caller is cancelled in the same turn of the loop (a client
    that leaves as its quota reservation commits): the caller never sees the result, so the
    write is reversed all the same."""
    async with _counter_sessions(tmp_path) as (sessions, _):
        caller = asyncio.create_task(sessions.write(_add(1), undo=_give_back))
        settle = sessions._settle  # type: ignore[attr-defined]

        def settle_then_cancel(*args: Any) -> None:
            settle(*args)
            caller.cancel()

        sessions._settle = settle_then_cancel  # type: ignore[attr-defined]
        with pytest.raises(asyncio.CancelledError):
            await caller
        sessions._settle = settle  # type: ignore[attr-defined]
        await sessions.write(_add(0))  # after the reversal, which was queued first
        assert await _total(sessions) == 0


async def test_a_submitted_write_is_on_its_way_at_once_and_undone_if_its_caller_left(
    tmp_path: Path,
) -> None:
    """`submit_each` sends the write before it returns, with no task to wait a turn of the
    loop for (a quota reservation committing while the provider's request goes out), and its
    future's cancellation is its caller leaving."""
    reserve, running, release = _held_reservation()
    async with _counter_sessions(tmp_path) as (sessions, _):
        reserving = sessions.submit_each(reserve, undo=_give_back)
        assert running.wait(5)  # the loop has not turned: the writer thread took it already
        reserving.cancel()
        release.set()
        await sessions.write(_add(0))  # after the reversal
        assert await _total(sessions) == 0
        assert await sessions.submit_each(_add(5)) == 5


async def test_a_write_after_the_sessions_closed_is_written_and_its_thread_released(
    tmp_path: Path,
) -> None:
    """A request the server stopped waiting for may still store what it produced after the
    app closed its sessions: the write is made, and the thread and connection it needed end
    with it instead of living on unclosed."""

    def writers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("aihub-sqlite-writer")]

    async def no_writers_left() -> None:
        for _ in range(200):
            if not writers():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(writers())

    async with _counter_sessions(tmp_path) as (sessions, _):
        assert await sessions.write(_add(1)) == 1
        await sessions.aclose()
        await no_writers_left()
        assert await sessions.write(_add(1)) == 2  # late, and written
        await no_writers_left()
        assert await _total(sessions) == 2


async def test_the_sqlite_writer_reconnects_after_its_connection_broke(tmp_path: Path) -> None:
    """The writer thread keeps one connection open between writes; once it breaks, the write
    that found it broken fails and the next one gets a new connection."""

    def break_connection(connection: Connection) -> int:
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        dbapi_connection.close()  # as a file that vanished or a disk error would leave it
        return _add(1)(connection)

    async with _counter_sessions(tmp_path) as (sessions, _):
        assert await sessions.write(_add(1)) == 1
        with pytest.raises(DBAPIError):
            await sessions.write(break_connection)
        assert await sessions.write(_add(1)) == 2
        assert await _total(sessions) == 2


@contextlib.asynccontextmanager
async def _postgres_counter(engine: AsyncEngine) -> AsyncIterator[tuple[AppSessions, str]]:
    """A `counter` table of this test's own on the test run's PostgreSQL database."""
    if engine.dialect.name != "postgresql":
        pytest.skip("autocommitted writes are PostgreSQL's: on SQLite `write_each` is `write`")
    table = f"counter_{secrets.token_hex(4)}"
    async with engine.begin() as connection:
        await connection.execute(text(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, n INTEGER)"))
        await connection.execute(text(f"INSERT INTO {table} VALUES (1, 0)"))
    sessions = create_sessionmaker(engine)
    try:
        yield sessions, table
    finally:
        await sessions.aclose()
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP TABLE {table}"))


def _add_then_wait(table: str, n: int, seconds: float) -> Callable[[Connection], int]:
    def job(connection: Connection) -> int:
        total = int(connection.scalar(text(f"UPDATE {table} SET n = n + {n} RETURNING n")))
        connection.execute(text(f"SELECT pg_sleep({seconds})"))
        return total

    return job


async def _read(sessions: AppSessions, table: str) -> int:
    async with sessions() as session:
        return int(await session.scalar(text(f"SELECT n FROM {table}")))


async def test_each_statement_of_a_write_each_is_committed_as_it_runs(
    db_engine: AsyncEngine,
) -> None:
    """A quota row that every request of a user updates must not stay locked until a COMMIT
    that waits for turns of a busy event loop: the update is visible (committed, its lock
    released) while the rest of the job still runs."""
    async with _postgres_counter(db_engine) as (sessions, table):
        job = asyncio.create_task(
            sessions.write_each(_add_then_wait(table, 1, 0.5), undo=lambda _: None)
        )
        await asyncio.sleep(0.2)
        assert not job.done()
        assert await _read(sessions, table) == 1
        assert await job == 1


@pytest.mark.parametrize("submitted", [False, True], ids=["awaited", "submitted"])
async def test_a_write_each_whose_caller_left_is_undone(
    db_engine: AsyncEngine, submitted: bool
) -> None:
    """Whether its caller's task is cancelled (`write_each`) or its future (`submit_each`)."""

    def give_back(n: int) -> Callable[[Connection], int]:
        assert n == 1
        return _add_then_wait(table, -1, 0)

    async with _postgres_counter(db_engine) as (sessions, table):
        job = _add_then_wait(table, 1, 0.3)
        caller = (
            sessions.submit_each(job, undo=give_back)
            if submitted
            else asyncio.create_task(sessions.write_each(job, undo=give_back))
        )
        await asyncio.sleep(0.1)
        caller.cancel()  # while its job runs: the update is committed already
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await sessions.aclose()  # waits for the reversal
        assert await _read(sessions, table) == 0


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///unused.db", "postgresql+asyncpg://u@h/db"])
def test_statement_parameters_stay_out_of_errors_and_logs(url: str) -> None:
    """A failed statement's message (logged as an unexpected error) must not carry its
    parameters: they are users' text."""
    engine = create_engine(url)
    assert engine.sync_engine.hide_parameters
