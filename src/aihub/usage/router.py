from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from aihub.core.auth import AUTH_ERRORS, CurrentUser
from aihub.core.clock import Now
from aihub.core.config import SettingsDep
from aihub.core.db import SessionDep
from aihub.core.errors import error_responses
from aihub.usage import quotas, service
from aihub.usage.schemas import ProductUsageRead, QuotaRead, UsageRead, UsageTotalsRead

router = APIRouter(tags=["usage"])


@router.get(
    "/api/usage",
    summary="My quotas and usage, per product",
    responses=error_responses({**AUTH_ERRORS, 422: "Invalid number of days"}),
)
async def read_usage(
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    now: Now,
    days: Annotated[int, Query(ge=1, le=365, description="Count usage over this many days")] = 30,
) -> UsageRead:
    since = now - timedelta(days=days)
    totals = await service.usage_totals(session, user_id=user.id, since=since)
    products = []
    for product, policy in quotas.quota_policies(settings).items():
        balance = await quotas.get_balance(
            session, user_id=user.id, product=product, policy=policy, now=now
        )
        used = totals.get(product, service.UsageTotals())
        products.append(
            ProductUsageRead(
                product=product,
                quota=QuotaRead(
                    unlimited=policy is None,
                    remaining=balance.remaining,
                    daily=policy.daily if policy else None,
                    initial=policy.initial if policy else None,
                    last_reset_at=balance.last_reset_at,
                    next_reset_at=balance.next_reset_at,
                ),
                usage=UsageTotalsRead(**asdict(used)),
            )
        )
    return UsageRead(since=since, products=products)
