"""Wake-ups across instances: a transaction says "this changed", and whoever waits on it wakes
once the change is committed.

`notifier.notify(session, topic, key)` is called inside the transaction that makes the change;
`async with notifier.subscribe(topic, key) as wake: await wake.wait(timeout)` waits for one.
On PostgreSQL the wake-up is a `NOTIFY` (sent by the server on commit, heard by every instance
through one `LISTEN` connection each); on SQLite (one instance) it is dispatched in-process after
the commit. A wake-up says only that something changed: the subscriber reads what.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

logger = logging.getLogger("aihub.notify")

CHANNEL = "aihub"
_PENDING = "aihub_notify_pending"


class Wake:
    """One subscriber's wake-up flag."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait for a wake-up (True) or the timeout (False); either way, clear the flag."""
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True


class Notifier:
    """In-process wake-ups, delivered after the notifying transaction commits."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[tuple[str, str], set[Wake]] = defaultdict(set)

    async def start(self) -> None:
        """Begin listening (PostgreSQL)."""

    async def aclose(self) -> None:
        """Stop listening."""

    @asynccontextmanager
    async def subscribe(self, topic: str, key: str = "") -> AsyncIterator[Wake]:
        wake = Wake()
        subscribers = self._subscribers[(topic, key)]
        subscribers.add(wake)
        try:
            yield wake
        finally:
            subscribers.discard(wake)
            if not subscribers:
                self._subscribers.pop((topic, key), None)

    async def notify(self, session: AsyncSession, topic: str, key: str = "") -> None:
        """Wake `(topic, key)`'s subscribers once `session`'s transaction commits."""
        pending: set[tuple[Notifier, str, str]] = session.sync_session.info.setdefault(
            _PENDING, set()
        )
        pending.add((self, topic, key))

    def dispatch(self, topic: str, key: str = "") -> None:
        for wake in self._subscribers.get((topic, key), ()):
            wake.set()

    def dispatch_all(self) -> None:
        """Wake everyone (after a gap in which notifications may have been lost)."""
        for subscribers in self._subscribers.values():
            for wake in subscribers:
                wake.set()


@event.listens_for(Session, "after_commit")
def _deliver(session: Session) -> None:
    for notifier, topic, key in session.info.pop(_PENDING, ()):
        notifier.dispatch(topic, key)


@event.listens_for(Session, "after_rollback")
def _discard(session: Session) -> None:
    session.info.pop(_PENDING, None)


class PostgresNotifier(Notifier):
    """`NOTIFY aihub, '<topic>:<key>'` in the transaction; one `LISTEN` connection per instance,
    re-opened if it drops (every subscriber is woken then, since notifications may be lost)."""

    def __init__(self, database_url: str) -> None:
        super().__init__()
        self._dsn = (
            make_url(database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )
        self._task: asyncio.Task[None] | None = None
        self._tried = asyncio.Event()
        """Set once the first connection attempt has ended, whichever way."""

    async def start(self) -> None:
        """Start listening; wait (up to 10 s) for the first attempt to connect, so that an
        instance that can reach its database misses no notification from its first request on,
        and one that cannot still starts at once (and answers `/api/ready` with 503)."""
        self._task = asyncio.create_task(self._listen(), name="aihub-notify-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self._tried.wait()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def notify(self, session: AsyncSession, topic: str, key: str = "") -> None:
        await session.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {"channel": CHANNEL, "payload": f"{topic}:{key}"},
        )

    def _on_notification(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        topic, _, key = payload.partition(":")
        self.dispatch(topic, key)

    async def _listen(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        delay = 0.1
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                logger.warning("LISTEN connection failed: %s", type(exc).__name__)
                self._tried.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
                continue
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(CHANNEL, self._on_notification)
                delay = 0.1
                if self._tried.is_set():
                    self.dispatch_all()  # notifications sent while we were away are lost
                self._tried.set()
                await lost.wait()
                logger.warning("LISTEN connection lost; reconnecting")
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)


def create_notifier(database_url: str) -> Notifier:
    if make_url(database_url).get_backend_name() == "postgresql":
        return PostgresNotifier(database_url)
    return Notifier()
