"""The usage ledger: one row per provider call made on a user's behalf."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NotRequired, TypedDict, Unpack, cast

from sqlalchemy import Connection, Insert, Table, bindparam, case, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from aihub.core.db import utcnow
from aihub.providers.routing import FailedAttempt
from aihub.usage.models import UsageRecord
from aihub.usage.quotas import Product


class UsageFields(TypedDict):
    """What a caller says of one provider call; `usage_row` adds the id and the time."""

    user_id: uuid.UUID
    product: Product
    provider: str
    model: str
    latency_ms: int
    outcome: str
    input_tokens: NotRequired[int | None]
    output_tokens: NotRequired[int | None]
    images: NotRequired[int]
    error: NotRequired[str | None]


def usage_row(**fields: Unpack[UsageFields]) -> dict[str, Any]:
    """A usage row's values, for `record_usage` or a bulk `insert_usage`."""
    return {
        **fields,
        "id": uuid.uuid4(),
        "input_tokens": fields.get("input_tokens") or 0,
        "output_tokens": fields.get("output_tokens") or 0,
        "images": fields.get("images", 0),
        "latency_ms": max(fields["latency_ms"], 0),
        "error": fields.get("error"),
        "created_at": utcnow(),
    }


def record_usage(session: AsyncSession | Session, **fields: Unpack[UsageFields]) -> UsageRecord:
    """Add a usage row to the session (written with the caller's transaction)."""
    record = UsageRecord(**usage_row(**fields))
    session.add(record)
    return record


def insert_usage(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """Write `usage_row`s with one INSERT, outside the ORM's unit of work (which, for the
    stream products' rows, cost more CPU than the write)."""
    if rows:
        connection.execute(insert(UsageRecord), rows)


def insert_with_usage(
    connection: Connection, table: Table, values: dict[str, Any], rows: list[dict[str, Any]]
) -> None:
    """Write one row of `table` (a stored result) with its `usage_row`s.

    On PostgreSQL a row with one usage row (the usual case) is one statement, the row inserted
    by a WITH of the usage row's INSERT: atomic on its own, so it can be written autocommitted
    (`AppSessions.write_each`), a round trip instead of three. The statement is built once per
    table: built per call, it cost more CPU than the round trips it saves. Otherwise it is two
    INSERTs, each standing on its own."""
    if connection.dialect.name == "postgresql" and len(rows) == 1:
        [row] = rows
        parameters = {f"stored_{key}": value for key, value in values.items()}
        parameters.update({f"usage_{key}": value for key, value in row.items()})
        connection.execute(_insert_with_usage_statement(table), parameters)
    else:
        connection.execute(insert(table), [values])
        insert_usage(connection, rows)


@functools.cache
def _insert_with_usage_statement(table: Table) -> Insert:
    def values(of: Table, prefix: str) -> dict[str, Any]:
        return {c.key: bindparam(f"{prefix}_{c.key}", type_=c.type) for c in of.columns}

    stored = insert(table).values(values(table, "stored")).cte("stored")
    usage = cast(Table, UsageRecord.__table__)
    return insert(usage).values(values(usage, "usage")).add_cte(stored)


def failed_attempt_rows(
    *, user_id: uuid.UUID, product: Product, attempts: Iterable[FailedAttempt]
) -> list[dict[str, Any]]:
    """A usage row for each provider of a fallback chain that failed before answering."""
    return [
        usage_row(
            user_id=user_id,
            product=product,
            provider=attempt.provider,
            model=attempt.model,
            latency_ms=attempt.latency_ms,
            outcome="failed",
            error=attempt.error,
        )
        for attempt in attempts
    ]


def record_failed_attempts(
    session: AsyncSession | Session,
    *,
    user_id: uuid.UUID,
    product: Product,
    attempts: Iterable[FailedAttempt],
) -> None:
    """Add `failed_attempt_rows` to the session."""
    for row in failed_attempt_rows(user_id=user_id, product=product, attempts=attempts):
        session.add(UsageRecord(**row))


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    succeeded: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    images: int = 0


async def usage_totals(
    session: AsyncSession, *, user_id: uuid.UUID, since: datetime
) -> dict[str, UsageTotals]:
    """Per product: calls, outcomes, tokens and images since `since`."""
    succeeded = func.sum(case((UsageRecord.outcome == "succeeded", 1), else_=0))
    failed = func.sum(case((UsageRecord.outcome == "failed", 1), else_=0))
    query = (
        select(
            UsageRecord.product,
            func.count(),
            succeeded,
            failed,
            func.sum(UsageRecord.input_tokens),
            func.sum(UsageRecord.output_tokens),
            func.sum(UsageRecord.images),
        )
        .where(UsageRecord.user_id == user_id, UsageRecord.created_at >= since)
        .group_by(UsageRecord.product)
    )
    rows = (await session.execute(query)).all()
    return {
        product: UsageTotals(*(int(value or 0) for value in values)) for product, *values in rows
    }
