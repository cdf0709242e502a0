"""Wake-ups across instances: PostgreSQL's NOTIFY heard through each instance's LISTEN."""

from __future__ import annotations

import time
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from aihub.core.db import create_sessionmaker
from aihub.core.notify import Notifier, create_notifier


@pytest.fixture
def postgres_url(database_url: str, db_engine: AsyncEngine) -> str:
    if db_engine.dialect.name != "postgresql":
        pytest.skip("NOTIFY and LISTEN are PostgreSQL's; on SQLite wake-ups stay in-process")
    return database_url


async def test_a_committed_notification_wakes_another_instance(
    postgres_url: str, db_engine: AsyncEngine
) -> None:
    sender, listener = create_notifier(postgres_url), create_notifier(postgres_url)
    await listener.start()
    sessions = create_sessionmaker(db_engine)
    try:
        async with listener.subscribe("job", "42") as wake, listener.subscribe("job", "7") as other:
            async with sessions.begin() as session:
                await sender.notify(session, "job", "42")
                assert not await wake.wait(0.2)  # not before the commit
            assert await wake.wait(5)
            assert not await other.wait(0.2)
    finally:
        await sessions.aclose()
        await listener.aclose()


async def test_a_database_out_of_reach_does_not_hold_up_start_and_is_caught_up_on(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first try fails: `start` returns at once. When the listener gets through, every
    subscriber is woken (what was notified in between is lost) and reads for itself."""
    connect = asyncpg.connect
    tries: list[float] = []

    async def out_of_reach_once(*args: Any, **kwargs: Any) -> Any:
        tries.append(time.monotonic())
        if len(tries) == 1:
            raise ConnectionRefusedError("the database is restarting")
        return await connect(*args, **kwargs)

    monkeypatch.setattr(asyncpg, "connect", out_of_reach_once)
    notifier: Notifier = create_notifier(postgres_url)
    started = time.monotonic()
    await notifier.start()
    try:
        assert len(tries) == 1  # returned after the failed try, not after the next one
        async with notifier.subscribe("job", "42") as wake:
            assert await wake.wait(5)
        assert len(tries) == 2
        assert tries[1] - started < 5
    finally:
        await notifier.aclose()
