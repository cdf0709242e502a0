"""Coding challenges: reserve a unit, ask the model, check the answer (repairing it once), and
store only a challenge that passed; a failure refunds, and so does the built-in fallback."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

import anyio
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aihub.challenges.generation import (
    ANSWER_SCHEMA,
    FALLBACK,
    Difficulty,
    GeneratedChallenge,
    InvalidAnswer,
    parse_answer,
    repair_prompt,
    system_prompt,
    user_prompt,
)
from aihub.challenges.models import Challenge
from aihub.core.db import AppSessions
from aihub.core.errors import NotFound
from aihub.core.pagination import page_newest_first
from aihub.providers.base import (
    Message,
    ProviderError,
    ProviderUnavailable,
    TextDelta,
    TextRequest,
    Usage,
)
from aihub.providers.routing import FailedAttempt, ModelChain
from aihub.usage import quotas
from aihub.usage.quotas import QuotaPolicy
from aihub.usage.service import record_usage


class InvalidModelAnswer(ProviderError):
    code = "invalid_model_answer"
    default_message = (
        "The model did not produce a valid challenge, even after a second attempt; try again"
    )
    fallback = False


@dataclass(frozen=True, slots=True)
class GenerationSettings:
    policy: QuotaPolicy | None
    temperature: float | None
    fallback: bool
    timeout_seconds: float = 120.0


class GenerationTimedOut(ProviderUnavailable):
    code = "provider_timeout"
    default_message = "The model did not finish its answer in time; try again"


@dataclass(slots=True)
class _Call:
    """One provider call, for the usage ledger."""

    provider: str
    model: str
    started: float
    latency_ms: int = 0
    usage: Usage | None = None
    outcome: str = "succeeded"
    error: str | None = None


OnSaved = Callable[[AsyncSession, Challenge], Awaitable[None]]


async def generate_challenge(
    sessions: AppSessions,
    *,
    chain: ModelChain,
    user_id: uuid.UUID,
    difficulty: Difficulty,
    options: GenerationSettings,
    now: datetime,
    on_saved: OnSaved | None = None,
) -> Challenge:
    """A new, checked challenge; `on_saved` runs in the transaction that stores it."""
    await quotas.reserve_with(
        sessions, user_id=user_id, product="challenges", policy=options.policy, now=now
    )
    calls: list[_Call] = []
    try:
        try:
            async with asyncio.timeout(options.timeout_seconds):
                answer = await _answer(chain, difficulty, options.temperature, calls)
        except TimeoutError:
            raise GenerationTimedOut(provider=chain.primary.provider.name) from None
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            error = exc.code if isinstance(exc, ProviderError) else "cancelled"
            await _settle(sessions, user_id, calls, refund=True, error=error)
        raise
    if answer is None and not options.fallback:
        await _settle(sessions, user_id, calls, refund=True)
        raise InvalidModelAnswer()
    challenge = Challenge(
        id=uuid.uuid4(),
        user_id=user_id,
        difficulty=difficulty,
        is_fallback=answer is None,
        provider=calls[-1].provider,
        model=calls[-1].model,
        created_at=now,
        **(answer or FALLBACK).model_dump(),
    )
    await _settle(
        sessions, user_id, calls, refund=answer is None, challenge=challenge, on_saved=on_saved
    )
    return challenge


async def _answer(
    chain: ModelChain, difficulty: Difficulty, temperature: float | None, calls: list[_Call]
) -> GeneratedChallenge | None:
    """The model's checked answer, after at most one repair; None when both failed."""
    request = TextRequest(
        messages=(Message.user(user_prompt(difficulty)),),
        system=system_prompt(difficulty),
        temperature=temperature,
        json_schema=ANSWER_SCHEMA,
    )
    text = await _ask(chain, request, calls)
    try:
        return parse_answer(text)
    except InvalidAnswer as problem:
        calls[-1].outcome = "invalid"
        repair = (Message.assistant(text), Message.user(repair_prompt(str(problem))))
        text = await _ask(chain, _with_messages(request, repair), calls)
    try:
        return parse_answer(text)
    except InvalidAnswer:
        calls[-1].outcome = "invalid"
        return None


def _with_messages(request: TextRequest, more: tuple[Message, ...]) -> TextRequest:
    return TextRequest(
        messages=request.messages + more,
        system=request.system,
        temperature=request.temperature,
        json_schema=request.json_schema,
    )


async def _ask(chain: ModelChain, request: TextRequest, calls: list[_Call]) -> str:
    """The model's whole answer; every provider call it took is added to `calls`."""
    call = _Call(chain.primary.provider.name, chain.primary.model, time.perf_counter())
    parts: list[str] = []
    try:
        try:
            opened = await chain.open_stream(request)
        except ProviderError as exc:
            calls.extend(_failed(exc.attempts))
            raise
        calls.extend(_failed(opened.failed))
        calls.append(call)
        call.provider, call.model = opened.provider, opened.model
        try:
            async for event in opened:
                if isinstance(event, TextDelta):
                    parts.append(event.text)
                elif isinstance(event, Usage):
                    call.usage = event
        finally:
            await opened.aclose()
    except ProviderError as exc:
        call.outcome, call.error = "failed", exc.code
        raise
    except BaseException:
        call.outcome = "cancelled"
        if not any(c is call for c in calls):
            calls.append(call)
        raise
    finally:
        call.latency_ms = round((time.perf_counter() - call.started) * 1000)
    return "".join(parts)


def _failed(attempts: list[FailedAttempt]) -> list[_Call]:
    return [
        _Call(a.provider, a.model, 0.0, a.latency_ms, outcome="failed", error=a.error)
        for a in attempts
    ]


async def _settle(
    sessions: async_sessionmaker[AsyncSession],
    user_id: uuid.UUID,
    calls: list[_Call],
    *,
    refund: bool,
    error: str | None = None,
    challenge: Challenge | None = None,
    on_saved: OnSaved | None = None,
) -> None:
    """One transaction: the usage rows, the refund, and the challenge with what goes with it."""
    async with sessions.begin() as session:
        for call in calls:
            record_usage(
                session,
                user_id=user_id,
                product="challenges",
                provider=call.provider,
                model=call.model,
                latency_ms=call.latency_ms,
                outcome=call.outcome,
                input_tokens=call.usage.input_tokens if call.usage else None,
                output_tokens=call.usage.output_tokens if call.usage else None,
                error=call.error or (error if call.outcome != "succeeded" else None),
            )
        if refund:
            await quotas.refund(session, user_id=user_id, product="challenges")
        if challenge is not None:
            session.add(challenge)
            await session.flush()
            if on_saved is not None:
                await on_saved(session, challenge)


async def list_challenges(
    session: AsyncSession, *, user_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[Challenge], str | None]:
    return await page_newest_first(
        session, Challenge, where=Challenge.user_id == user_id, limit=limit, cursor=cursor
    )


async def get_challenge(
    session: AsyncSession, *, user_id: uuid.UUID, challenge_id: uuid.UUID
) -> Challenge:
    challenge = await session.get(Challenge, challenge_id)
    if challenge is None or challenge.user_id != user_id:
        raise NotFound("Challenge not found")
    return challenge
