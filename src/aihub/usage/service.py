"""The usage ledger: one row per provider call made on a user's behalf."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from aihub.core.db import utcnow
from aihub.providers.routing import FailedAttempt
from aihub.usage.models import UsageRecord
from aihub.usage.quotas import Product


def record_usage(
    session: AsyncSession | Session,
    *,
    user_id: uuid.UUID,
    product: Product,
    provider: str,
    model: str,
    latency_ms: int,
    outcome: str,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    images: int = 0,
    error: str | None = None,
) -> UsageRecord:
    """Add a usage row to the session (written with the caller's transaction)."""
    record = UsageRecord(
        id=uuid.uuid4(),
        user_id=user_id,
        product=product,
        provider=provider,
        model=model,
        input_tokens=input_tokens or 0,
        output_tokens=output_tokens or 0,
        images=images,
        latency_ms=max(latency_ms, 0),
        outcome=outcome,
        error=error,
        created_at=utcnow(),
    )
    session.add(record)
    return record


def record_failed_attempts(
    session: AsyncSession | Session,
    *,
    user_id: uuid.UUID,
    product: Product,
    attempts: Iterable[FailedAttempt],
) -> None:
    """A usage row for each provider of a fallback chain that failed before answering."""
    for attempt in attempts:
        record_usage(
            session,
            user_id=user_id,
            product=product,
            provider=attempt.provider,
            model=attempt.model,
            latency_ms=attempt.latency_ms,
            outcome="failed",
            error=attempt.error,
        )


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
