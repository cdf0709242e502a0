"""The engine as `aihub.core.db` builds it."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from pathlib import Path

from sqlalchemy import text

from aihub.core.db import create_engine, create_sessionmaker


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
