"""The engine as `aihub.core.db` builds it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

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


async def _counter_sessions(tmp_path: Path) -> tuple[AsyncEngine, AppSessions, list[int]]:
    """A SQLite database with a `counter` table, its sessions, and a list of commits."""
    engine = create_engine(f"sqlite+aiosqlite:///{(tmp_path / 'writes.db').as_posix()}")
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER)"))
        await connection.execute(text("INSERT INTO counter VALUES (1, 0)"))
    commits: list[int] = []
    event.listen(engine.sync_engine, "commit", lambda _connection: commits.append(1))
    return engine, create_sessionmaker(engine), commits


def _add(n: int) -> Callable[[AsyncSession], Awaitable[int]]:
    async def job(session: AsyncSession) -> int:
        return int(await session.scalar(text(f"UPDATE counter SET n = n + {n} RETURNING n")))

    return job


async def _total(sessions: AppSessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(text("SELECT n FROM counter")))


async def test_writes_that_queue_up_on_sqlite_are_committed_together(tmp_path: Path) -> None:
    engine, sessions, commits = await _counter_sessions(tmp_path)
    try:
        results = await asyncio.gather(*(sessions.write(_add(1)) for _ in range(50)))
        assert sorted(results) == list(range(1, 51))  # each job saw its own write
        assert await _total(sessions) == 50
        assert len(commits) < 10  # not one transaction each
    finally:
        await engine.dispose()


async def test_a_failing_write_fails_alone(tmp_path: Path) -> None:
    engine, sessions, _ = await _counter_sessions(tmp_path)

    async def clash(session: AsyncSession) -> None:
        await session.execute(text("INSERT INTO counter VALUES (1, 0)"))  # the key is taken

    try:
        outcomes = await asyncio.gather(
            *(sessions.write(_add(1)) for _ in range(5)),
            sessions.write(clash),
            *(sessions.write(_add(1)) for _ in range(5)),
            return_exceptions=True,
        )
        assert isinstance(outcomes[5], IntegrityError)
        assert all(isinstance(outcome, int) for i, outcome in enumerate(outcomes) if i != 5)
        assert await _total(sessions) == 10
    finally:
        await engine.dispose()


async def test_a_write_whose_caller_left_before_it_ran_is_dropped(tmp_path: Path) -> None:
    engine, sessions, _ = await _counter_sessions(tmp_path)
    release = asyncio.Event()

    async def slow(session: AsyncSession) -> int:
        await release.wait()  # holds the writer while the next write queues up
        return await _add(1)(session)

    try:
        first = asyncio.create_task(sessions.write(slow))
        await asyncio.sleep(0.05)
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
    finally:
        await engine.dispose()


async def test_a_write_whose_caller_left_after_it_ran_is_undone(tmp_path: Path) -> None:
    engine, sessions, _ = await _counter_sessions(tmp_path)
    running, release = asyncio.Event(), asyncio.Event()

    async def reserve(session: AsyncSession) -> int:
        n = await _add(1)(session)
        running.set()
        await release.wait()
        return n

    def give_back(n: int) -> Callable[[AsyncSession], Awaitable[int]]:
        assert n == 1
        return _add(-1)

    try:
        caller = asyncio.create_task(sessions.write(reserve, undo=give_back))
        await running.wait()
        caller.cancel()  # while its job runs: too late to drop it
        release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await sessions.write(_add(0))  # after the reversal, which was queued first
        assert await _total(sessions) == 0
    finally:
        await engine.dispose()
