from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from aihub.challenges import service
from aihub.challenges.models import Challenge
from aihub.challenges.schemas import (
    ChallengeCreate,
    ChallengeHistory,
    ChallengeQuotaRead,
    ChallengeRead,
)
from aihub.core.auth import AUTH_ERRORS, CurrentUser
from aihub.core.clock import Now
from aihub.core.config import SettingsDep
from aihub.core.db import SessionDep, Sessions
from aihub.core.errors import error_responses
from aihub.core.sse import unless_disconnected
from aihub.providers.routing import ModelChain, text_chain
from aihub.usage import quotas
from aihub.usage.idempotency import IDEMPOTENCY_ERRORS, IdempotencyKeyHeader, IdempotentRequest

router = APIRouter(tags=["challenges"])

ChallengesChain = Annotated[ModelChain, Depends(text_chain("challenges"))]


@router.post(
    "/api/generate-challenge",
    summary="Generate a coding challenge",
    response_model=ChallengeRead,
    responses=error_responses(
        {
            **AUTH_ERRORS,
            **IDEMPOTENCY_ERRORS,
            429: "Daily quota exceeded (see Retry-After), or the provider is rate limiting",
            502: "The provider failed, or its answers failed the checks (fallback off)",
            503: "The provider is unavailable",
        }
    ),
)
async def generate_challenge(
    http_request: Request,
    body: ChallengeCreate,
    user: CurrentUser,
    settings: SettingsDep,
    sessions: Sessions,
    chain: ChallengesChain,
    now: Now,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Costs one unit of the daily quota, refunded if generation fails or the fallback question
    is served. With `Idempotency-Key`, a retry replays the first answer, charged once."""
    async with IdempotentRequest(
        sessions,
        user_id=user.id,
        scope="challenges.generate",
        key=idempotency_key,
        fingerprint=body.model_dump_json(),
        now=now,
    ) as request:
        if request.replay is not None:
            return _json(request.replay.body, headers={"Idempotent-Replayed": "true"})

        # A client that leaves stops the generation (and is not charged for it).
        challenge = await unless_disconnected(
            http_request,
            service.generate_challenge(
                sessions,
                chain=chain,
                user_id=user.id,
                difficulty=body.difficulty,
                options=service.GenerationSettings(
                    policy=quotas.policy_for(settings, "challenges"),
                    temperature=settings.challenges_temperature,
                    fallback=settings.challenges_fallback,
                    timeout_seconds=settings.challenges_timeout_seconds,
                ),
                now=now,
                on_saved=request.saver(_body),
            ),
        )
    return _json(_body(challenge))


def _body(challenge: Challenge) -> bytes:
    return ChallengeRead.of(challenge).model_dump_json().encode()


def _json(body: bytes, *, headers: dict[str, str] | None = None) -> Response:
    return Response(body, media_type="application/json", headers=headers)


@router.get(
    "/api/my-history",
    summary="My challenges, newest first",
    responses=error_responses({**AUTH_ERRORS, 422: "Invalid limit or cursor"}),
)
async def list_my_challenges(
    user: CurrentUser,
    session: SessionDep,
    # The original client does not page: by default, as many as one page can hold.
    limit: Annotated[int, Query(ge=1, le=500)] = 500,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> ChallengeHistory:
    challenges, next_cursor = await service.list_challenges(
        session, user_id=user.id, limit=limit, cursor=cursor
    )
    return ChallengeHistory(
        challenges=[ChallengeRead.of(c) for c in challenges], next_cursor=next_cursor
    )


@router.get(
    "/api/challenges/{challenge_id}",
    summary="One of my challenges",
    responses=error_responses({**AUTH_ERRORS, 404: "No such challenge of yours", 422: "Not an id"}),
)
async def read_challenge(
    user: CurrentUser, session: SessionDep, challenge_id: uuid.UUID
) -> ChallengeRead:
    return ChallengeRead.of(
        await service.get_challenge(session, user_id=user.id, challenge_id=challenge_id)
    )


@router.get(
    "/api/quota",
    summary="My challenge quota",
    responses=error_responses(AUTH_ERRORS),
)
async def read_quota(
    user: CurrentUser, session: SessionDep, settings: SettingsDep, now: Now
) -> ChallengeQuotaRead:
    """What the next challenge can draw on: a new user sees the starting balance."""
    policy = quotas.policy_for(settings, "challenges")
    balance = await quotas.get_balance(
        session, user_id=user.id, product="challenges", policy=policy, now=now
    )
    last_reset: datetime = balance.last_reset_at or now
    return ChallengeQuotaRead(
        quota_remaining=balance.remaining,
        last_reset_date=last_reset,
        last_reset_data=last_reset,
        next_reset_at=balance.next_reset_at or last_reset + quotas.PERIOD,
        daily_quota=policy.daily if policy else None,
    )
