"""Per-user, per-product quotas: reserved atomically before a provider call, refunded after a
failure.

A balance lives in one `quota` row per user and product, created on first use with the policy's
starting balance. Every `period` the balance is topped up to at least `daily` (a top-up never
lowers a balance). The top-up and the reservation happen in one SQL statement, so sixty
concurrent requests against ten remaining units give exactly ten successes on SQLite and on
PostgreSQL alike.
"""

from __future__ import annotations

import asyncio
import functools
import math
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, cast

from sqlalchemy import Connection, Integer, String, Table, Uuid, bindparam, case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from aihub.core.config import Settings
from aihub.core.db import (
    AppSessions,
    DriverStatement,
    Job,
    UTCDateTime,
    insert_if_absent_statement,
    run_job,
)
from aihub.core.errors import AppError
from aihub.usage.models import Quota

Product = Literal["ideas", "challenges", "images", "chats"]
PRODUCTS: tuple[Product, ...] = ("ideas", "challenges", "images", "chats")
PERIOD = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class QuotaPolicy:
    initial: int
    """A new user's balance."""
    daily: int
    """The balance is topped up to at least this every `PERIOD`."""


def policy_for(settings: Settings, product: Product) -> QuotaPolicy | None:
    """The product's policy from the settings; None when it is unlimited."""
    daily: int | None = getattr(settings, f"{product}_daily_quota")
    if daily is None:
        return None
    initial: int | None = getattr(settings, f"{product}_initial_quota")
    return QuotaPolicy(initial=daily if initial is None else initial, daily=daily)


def quota_policies(settings: Settings) -> dict[Product, QuotaPolicy | None]:
    return {product: policy_for(settings, product) for product in PRODUCTS}


class QuotaExceeded(AppError):
    status_code = 429
    code = "quota_exceeded"
    default_message = "Daily quota exceeded"

    def __init__(self, product: Product, *, retry_after: int) -> None:
        super().__init__(
            f"Daily quota exceeded for {product}; it is topped up again in {_wait(retry_after)}",
            headers={"Retry-After": str(retry_after)},
        )
        self.retry_after = retry_after


def _wait(seconds: int) -> str:
    hours, minutes = divmod(math.ceil(seconds / 60), 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{max(minutes, 1)} min"


@dataclass(frozen=True, slots=True)
class Balance:
    remaining: int | None
    """None when the product is unlimited."""
    last_reset_at: datetime | None
    next_reset_at: datetime | None


async def reserve(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    product: Product,
    policy: QuotaPolicy | None,
    now: datetime,
    units: int = 1,
) -> int | None:
    """Take `units` from the balance (topping it up first when a period has passed) and return
    what is left; `QuotaExceeded` (429) when there is not enough. None: unlimited."""
    if policy is None:
        return None
    return await run_job(
        session,
        functools.partial(
            take, user_id=user_id, product=product, policy=policy, now=now, units=units
        ),
    )


def take(
    connection: Connection,
    *,
    user_id: uuid.UUID,
    product: Product,
    policy: QuotaPolicy | None,
    now: datetime,
    units: int = 1,
) -> int | None:
    """`reserve` as synchronous work on a connection (an `AppSessions.write` job)."""
    if policy is None:
        return None
    if units > policy.initial:
        # The insert branch below would start the row below zero: create it untouched first.
        _start_balance(connection, user_id, product, policy.initial, now)
    parameters = {
        "user_id": user_id,
        "product": product,
        "start": policy.initial - units,
        "daily": policy.daily,
        "units": units,
        "now": now,
        "cutoff": now - PERIOD,
    }
    row = _reserve_statement(connection.dialect.name).first(connection, parameters)
    remaining = None if row is None else row[0]
    if remaining is None:
        current = balance(connection, user_id=user_id, product=product, policy=policy, now=now)
        assert current.next_reset_at is not None
        wait = math.ceil((current.next_reset_at - now).total_seconds())
        # Clamped: a concurrent request that began a moment later may have started the period.
        raise QuotaExceeded(product, retry_after=min(max(wait, 1), int(PERIOD.total_seconds())))
    return int(remaining)


async def reserve_with(
    sessions: AppSessions,
    *,
    user_id: uuid.UUID,
    product: Product,
    policy: QuotaPolicy | None,
    now: datetime,
    units: int = 1,
) -> int | None:
    """`reserve` as a write of its own (`AppSessions.write`: batched with other writes on
    SQLite): what is left, `QuotaExceeded` when there is not enough. If the caller stops
    waiting once the reservation is committed, the units are given back."""
    if policy is None:
        return None
    job, undo = _reservation(user_id=user_id, product=product, policy=policy, now=now, units=units)
    outcome = await sessions.write_each(job, undo=undo)
    if isinstance(outcome, QuotaExceeded):
        raise outcome
    return outcome


Outcome = int | QuotaExceeded
"""A reservation's outcome: what it left, or why it took nothing."""


def _reservation(
    *, user_id: uuid.UUID, product: Product, policy: QuotaPolicy, now: datetime, units: int
) -> tuple[Job[Outcome], Callable[[Outcome], Job[None] | None]]:
    """The reservation's write, and what reverses it (for a caller that stopped waiting once it
    was committed). Each statement of `take` is atomic on its own (see
    `AppSessions.write_each`)."""

    def taken(connection: Connection) -> Outcome:
        try:
            remaining = take(
                connection, user_id=user_id, product=product, policy=policy, now=now, units=units
            )
        except QuotaExceeded as exc:
            return exc  # an answer, not a failure: nothing was written
        assert remaining is not None  # a policy was given
        return remaining

    def give_back_if_taken(outcome: Outcome) -> Job[None] | None:
        if isinstance(outcome, QuotaExceeded):
            return None
        return functools.partial(give_back, user_id=user_id, product=product, units=units)

    return taken, give_back_if_taken


class Reservation:
    """A reservation committing while its caller goes on (`reserve_ahead`). Awaiting it waits
    for the commit, and raises `QuotaExceeded` if it took nothing; cancelling the task that
    awaits it gives the units back once they are taken."""

    def __init__(self, outcome: asyncio.Future[Outcome]) -> None:
        self._outcome = outcome

    def __await__(self) -> Generator[Any, None, None]:
        # The write's own future, awaited directly: a task in between (or a callback settling
        # a future of its own) costs the reservation a turn of the event loop, which under
        # load is milliseconds of the stream's first token.
        outcome = yield from self._outcome.__await__()
        if isinstance(outcome, QuotaExceeded):
            raise outcome

    async def refusal(self) -> BaseException | None:
        """Why it took nothing, once it has ended however it ends; None if it took its units."""
        await asyncio.wait([self._outcome])
        if self._outcome.cancelled():
            return asyncio.CancelledError()  # its undo gives the units back once committed
        if (error := self._outcome.exception()) is not None:
            return error
        outcome = self._outcome.result()
        return outcome if isinstance(outcome, QuotaExceeded) else None


async def reserve_ahead(
    sessions: AppSessions,
    balances: Balances,
    *,
    user_id: uuid.UUID,
    product: Product,
    policy: QuotaPolicy | None,
    now: datetime,
    units: int = 1,
) -> Reservation | None:
    """`reserve_with`, done before returning (None), unless the user's last reservation here
    left enough: then it is left to commit while the caller goes on (the provider's request is
    sent meanwhile), and the caller must await the `Reservation` before any output reaches the
    user.

    A reservation is a write (on SQLite a trip to the writer thread and back, on PostgreSQL a
    round trip): ~0.5-1 ms of every stream's first token, spent while the process has nothing
    else to do. A user who has run out, or whom this process has not seen, waits for it, so
    that an empty balance never costs a provider call."""
    if policy is None:
        return None

    def reservation() -> asyncio.Future[Outcome]:
        job, undo = _reservation(
            user_id=user_id, product=product, policy=policy, now=now, units=units
        )
        return sessions.submit_each(job, undo=undo)

    if (reserving := balances.bet(user_id, product, units, reservation)) is not None:
        return Reservation(reserving)
    # Reservations under way may count on what is left: one that this overtook could lose its
    # unit to it, after its provider call was made.
    await balances.settled(user_id, product)
    await Reservation(balances.track(user_id, product, units, reservation))
    return None


class Balances:
    """What this process's reservations last left of recent users' balances, and the
    reservations under way, which count on it: whether the next one is all but sure to succeed
    (`reserve_ahead`).

    Only a hint: another worker, a refund, a top-up or an administrator's change makes it stale,
    and the reservation itself is what lets a request through. It errs low: a refund is not
    counted, and a reservation under way counts as taking its units until it has ended (its
    outcome noted), so concurrent requests never all count on the same last unit."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._left: dict[tuple[uuid.UUID, Product], int] = {}
        self._under_way: dict[tuple[uuid.UUID, Product], dict[asyncio.Future[Outcome], int]] = {}

    def bet(
        self,
        user_id: uuid.UUID,
        product: Product,
        units: int,
        reservation: Callable[[], asyncio.Future[Outcome]],
    ) -> asyncio.Future[Outcome] | None:
        """`reservation` started (`track`), if `units` are left beyond those the reservations
        under way take; else None."""
        under_way = self._under_way.get((user_id, product), {})
        if self._left.get((user_id, product), 0) - sum(under_way.values()) < units:
            return None
        return self.track(user_id, product, units, reservation)

    def track(
        self,
        user_id: uuid.UUID,
        product: Product,
        units: int,
        reservation: Callable[[], asyncio.Future[Outcome]],
    ) -> asyncio.Future[Outcome]:
        """`reservation` started, counted as taking `units` until it ends; what it leaves is
        noted then."""
        key = (user_id, product)
        reserving = reservation()
        self._under_way.setdefault(key, {})[reserving] = units
        reserving.add_done_callback(functools.partial(self._ended, key))
        return reserving

    async def settled(self, user_id: uuid.UUID, product: Product) -> None:
        """Once the reservations under way on the user's balance have ended, however they end."""
        if under_way := self._under_way.get((user_id, product)):
            await asyncio.wait(list(under_way))

    def note(self, user_id: uuid.UUID, product: Product, left: int) -> None:
        """A reservation under way committed, leaving `left`. While others are under way it
        may be heard after one that committed later (on PostgreSQL each has a connection of
        its own): the lower figure is kept."""
        key = (user_id, product)
        known = self._left.pop(key, None)
        if known is None and len(self._left) >= self._capacity:
            del self._left[next(iter(self._left))]  # the user noted the longest ago
        others = len(self._under_way.get(key, ())) > 1
        self._left[key] = min(known, left) if others and known is not None else left

    def left(self, user_id: uuid.UUID, product: Product) -> int | None:
        """What the last reservation here left (None: none is known)."""
        return self._left.get((user_id, product))

    def _ended(self, key: tuple[uuid.UUID, Product], reserving: asyncio.Future[Outcome]) -> None:
        if not reserving.cancelled() and reserving.exception() is None:
            outcome = reserving.result()
            self.note(*key, 0 if isinstance(outcome, QuotaExceeded) else outcome)
        under_way = self._under_way.get(key, {})
        under_way.pop(reserving, None)
        if not under_way:
            self._under_way.pop(key, None)


@functools.cache
def _reserve_statement(dialect: str) -> DriverStatement:
    """The reservation: insert a new balance, or top up a due one and take the units from it,
    only where enough is left. Built once per dialect: it runs before every generation (on
    SQLite's writer thread, on the driver's cursor)."""
    table = cast(Table, Quota.__table__)
    quota = table.c
    now = bindparam("now", type_=UTCDateTime())
    daily, units = bindparam("daily", type_=Integer()), bindparam("units", type_=Integer())
    due = quota.last_reset_at <= bindparam("cutoff", type_=UTCDateTime())
    balance = case((due & (quota.remaining < daily), daily), else_=quota.remaining)
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    return DriverStatement(
        insert(table)
        .values(
            user_id=bindparam("user_id", type_=Uuid()),
            product=bindparam("product", type_=String()),
            remaining=bindparam("start", type_=Integer()),
            last_reset_at=now,
        )
        .on_conflict_do_update(
            index_elements=[quota.user_id, quota.product],
            set_={
                "remaining": balance - units,
                "last_reset_at": case((due, now), else_=quota.last_reset_at),
            },
            where=balance >= units,
        )
        .returning(quota.remaining)
    )


def _start_balance(
    connection: Connection, user_id: uuid.UUID, product: Product, remaining: int, now: datetime
) -> None:
    """A new balance, unless the user already has one for this product."""
    connection.execute(
        insert_if_absent_statement(
            connection,
            Quota,
            user_id=user_id,
            product=product,
            remaining=remaining,
            last_reset_at=now,
        )
    )


async def refund(
    session: AsyncSession, *, user_id: uuid.UUID, product: Product, units: int = 1
) -> None:
    """Give back units reserved for a call that failed or was not charged."""
    await run_job(
        session, functools.partial(give_back, user_id=user_id, product=product, units=units)
    )


def give_back(
    connection: Connection, *, user_id: uuid.UUID, product: Product, units: int = 1
) -> None:
    """`refund` as synchronous work on a connection (an `AppSessions.write` job)."""
    connection.execute(
        update(Quota)
        .where(Quota.user_id == user_id, Quota.product == product)
        .values(remaining=Quota.remaining + units)
    )


async def get_balance(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    product: Product,
    policy: QuotaPolicy | None,
    now: datetime,
) -> Balance:
    """The balance the next request would see (a due top-up counted, nothing written)."""
    return await run_job(
        session,
        functools.partial(balance, user_id=user_id, product=product, policy=policy, now=now),
    )


def balance(
    connection: Connection,
    *,
    user_id: uuid.UUID,
    product: Product,
    policy: QuotaPolicy | None,
    now: datetime,
) -> Balance:
    """`get_balance` as synchronous work on a connection."""
    if policy is None:
        return Balance(None, None, None)
    row = connection.execute(
        select(Quota.remaining, Quota.last_reset_at).where(
            Quota.user_id == user_id, Quota.product == product
        )
    ).first()
    if row is None:
        return Balance(policy.initial, None, None)
    remaining, last_reset_at = row.remaining, row.last_reset_at
    if last_reset_at <= now - PERIOD:
        remaining, last_reset_at = max(remaining, policy.daily), now
    return Balance(remaining, last_reset_at, last_reset_at + PERIOD)


async def grant_initial(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    policies: Mapping[Product, QuotaPolicy | None],
    now: datetime,
) -> None:
    """Create a new user's balances (the Clerk webhook does; first use would otherwise)."""
    for product, policy in policies.items():
        if policy is not None:
            await run_job(
                session,
                functools.partial(
                    _start_balance,
                    user_id=user_id,
                    product=product,
                    remaining=policy.initial,
                    now=now,
                ),
            )
