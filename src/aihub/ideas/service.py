"""Business ideas: one prompt, streamed, stored whole or marked incomplete."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import cast

import anyio
from sqlalchemy import Connection, Table
from sqlalchemy.ext.asyncio import AsyncSession

from aihub.core.db import AppSessions, utcnow
from aihub.core.errors import AppError, NotFound
from aihub.core.pagination import page_newest_first
from aihub.core.sse import STOP_REASONS, StreamEvent, stop_reason
from aihub.ideas.models import Idea
from aihub.ideas.resume import LiveIdea, LiveIdeas
from aihub.providers.base import (
    Finish,
    Message,
    ProviderError,
    TextDelta,
    TextRequest,
    Usage,
    unusable_answer,
)
from aihub.providers.routing import FailedAttempt, ModelChain, OpenedStream
from aihub.usage import quotas
from aihub.usage.quotas import Balances, QuotaPolicy
from aihub.usage.service import (
    failed_attempt_rows,
    insert_usage,
    insert_with_usage,
    record_failed_attempts,
    record_usage,
    usage_row,
)
from aihub.users.models import User

logger = logging.getLogger("aihub.ideas")

_IDEAS = cast(Table, Idea.__table__)
_IDEA_COLUMNS = tuple(_IDEAS.columns)


@dataclass
class IdeaStream:
    events: AsyncIterator[StreamEvent]
    provider: str
    model: str
    live: LiveIdea


async def start_idea(
    sessions: AppSessions,
    *,
    chain: ModelChain,
    user: User,
    prompt: str,
    policy: QuotaPolicy | None,
    balances: Balances,
    now: datetime,
    live_ideas: LiveIdeas,
) -> IdeaStream:
    """Reserve a unit of the quota and open the provider stream; errors before its first output
    raise here, as HTTP errors, and give the unit back.

    For a user whose last reservation here left enough, the reservation commits while the
    provider's request is on its way (`quotas.reserve_ahead`); nothing reaches them before it
    has, and if it is refused, the stream is closed and the refusal is the answer."""
    requested_at = utcnow()
    started = time.perf_counter()
    reserving = await quotas.reserve_ahead(
        sessions, balances, user_id=user.id, product="ideas", policy=policy, now=now
    )
    opened: OpenedStream | None = None
    try:
        # Open once the provider takes the request: a reasoning model may think for a long while
        # before its first token, and the client (and any proxy) should not wait in silence.
        opened = await chain.open_stream(
            TextRequest(messages=(Message.user(prompt),)), until="accepted"
        )
        if reserving is not None:
            await reserving
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            # None: it took its units (or was done before `reserve_ahead` returned).
            refusal = None if reserving is None else await reserving.refusal()
            if opened is not None:
                await opened.aclose()
            async with sessions.begin() as session:
                if refusal is None:
                    await quotas.refund(session, user_id=user.id, product="ideas")
                if isinstance(exc, ProviderError):
                    record_failed_attempts(
                        session, user_id=user.id, product="ideas", attempts=exc.attempts
                    )
                else:  # the client left, the reservation was refused, or something broke
                    if opened is not None:
                        record_failed_attempts(
                            session, user_id=user.id, product="ideas", attempts=opened.failed
                        )
                    record_usage(
                        session,
                        user_id=user.id,
                        product="ideas",
                        provider=opened.provider if opened else chain.primary.provider.name,
                        model=opened.model if opened else chain.primary.model,
                        latency_ms=_ms_since(started),
                        outcome="cancelled",
                        error=exc.code if isinstance(exc, AppError) else None,
                    )
        if (
            refusal is not None
            and refusal is not exc
            and not isinstance(exc, asyncio.CancelledError)
        ):
            raise refusal from exc  # what the user would have heard before the provider's word
        raise
    live = LiveIdea(uuid.uuid4(), user.id, f"{opened.provider}:{opened.model}")
    # The stored `Idea` is built when the idea ends (`_save`): an ORM object's construction
    # took 0.19 ms here, before the first token, on a path that runs cold once per stream.
    draft = _Draft(live, requested_at, opened.provider, opened.model)
    events = _idea_events(sessions, opened, draft, started=started, live_ideas=live_ideas)
    return IdeaStream(events, opened.provider, opened.model, live)


def _ms_since(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


@dataclass
class _Draft:
    """An idea being written (its text is `live`'s): what `_save` stores once it ends."""

    live: LiveIdea
    created_at: datetime
    provider: str
    model: str
    usage: Usage | None = None
    finish_reason: str | None = None

    def usage_read(self) -> dict[str, int | None]:
        usage = self.usage
        return {
            "input_tokens": usage.input_tokens if usage else None,
            "output_tokens": usage.output_tokens if usage else None,
        }


async def _idea_events(
    sessions: AppSessions,
    opened: OpenedStream,
    draft: _Draft,
    *,
    started: float,
    live_ideas: LiveIdeas,
) -> AsyncIterator[StreamEvent]:
    """The idea's events, stored when they end however they end; its `LiveIdea` (in
    `live_ideas` while the idea is written) lets a client that comes back follow it."""
    live = draft.live
    live_ideas.add(live)
    failure: ProviderError | None = None
    finished = saved = False
    ids, written = f"{live.id}:", 0
    try:
        try:
            async for event in opened:
                if isinstance(event, TextDelta):
                    text = event.text
                    live.parts.append(text)
                    live.grew()
                    written += len(text)
                    yield StreamEvent("delta", text, f"{ids}{written}")
                elif isinstance(event, Usage):
                    draft.usage = event
                elif isinstance(event, Finish):
                    draft.finish_reason = event.reason
            finished = True
            text = "".join(live.parts)
            failure = unusable_answer(text, draft.finish_reason, provider=opened.provider)
        except ProviderError as exc:
            failure = exc
        await opened.aclose()
        usage = StreamEvent("usage", draft.usage_read())
        if failure is None:
            # The text is whole: let the client have all of it now, not after the write below
            # (which, on a busy embedded database, can take a good fraction of a second).
            yield usage
        saving = asyncio.ensure_future(
            _save(
                sessions,
                draft,
                error=failure.code if failure else None,
                started=started,
                failed=opened.failed,
            )
        )
        try:
            await asyncio.shield(saving)
        except asyncio.CancelledError:
            # The client left while the idea was being stored: store it all the same, once.
            await saving
            saved = True
            raise
        except Exception:  # it cannot be stored: say so, rather than end as if it were
            saved = True
            logger.exception("could not store an idea", extra={"idea_id": str(live.id)})
            ending = [StreamEvent.error("not_stored", NOT_STORED, partial=bool(live.parts))]
        else:
            saved = True
            ending = _ending(saving.result(), failure, usage)
        live.end(ending)
        for last in ending:
            if last is not usage:  # this client has it already
                yield last
    except BaseException as exc:
        if not saved:
            # Keep what was produced: the client went away (the stream was cancelled or closed),
            # or something broke that is not the provider's doing.
            error = None if finished else stop_reason(exc)
            with anyio.CancelScope(shield=True):
                await opened.aclose()
                await _save(sessions, draft, error=error, started=started, failed=opened.failed)
        raise
    finally:
        if not live.ended:  # stopped: whoever follows it learns so
            live.end([StreamEvent.error("client_disconnected", CUT_SHORT)])
        live_ideas.remove(live)


CUT_SHORT = "The idea was cut short: its page was away for too long. Ask for a new one."
NOT_STORED = "The idea could not be stored, so it is not in your history; please try again later"


def _ending(idea: Idea, failure: ProviderError | None, usage: StreamEvent) -> list[StreamEvent]:
    """The events after a stored idea's text: `usage` and `done`, or the failure's `error`."""
    if failure is None:
        return [usage, StreamEvent("done", _done(idea))]
    # With no text there is no idea to point to (`_save` stores none).
    partial = bool(idea.content.strip())
    stored = {"idea_id": str(idea.id)} if partial else {}
    return [StreamEvent.error(failure.code, failure.message, **stored, partial=partial)]


@dataclass
class ResumedIdea:
    events: AsyncIterator[StreamEvent]
    sent: str
    """The text the client already has, as it counted it."""
    label: str
    """`provider:model`."""


async def resume_idea(
    sessions: AppSessions,
    live_ideas: LiveIdeas,
    *,
    user: User,
    idea_id: uuid.UUID,
    position: int,
    measure: Callable[[str], str],
) -> ResumedIdea | None:
    """The rest of one of the user's ideas after the client's first `position` characters
    (counted by `measure`): followed live while it is being written here, else from the stored
    idea; None if there is no such idea of theirs."""
    live = live_ideas.get(idea_id, user_id=user.id)
    if live is not None:
        text = "".join(measure(part) for part in live.parts)
        position = min(position, len(text))
        return ResumedIdea(live.follow(position, measure=measure), text[:position], live.label)
    async with sessions() as session:
        idea = await session.get(Idea, idea_id)
    if idea is None or idea.user_id != user.id:
        return None
    text = measure(idea.content)
    position = min(position, len(text))
    return ResumedIdea(
        _replayed(idea, text, position), text[:position], f"{idea.provider}:{idea.model}"
    )


async def _replayed(idea: Idea, text: str, position: int) -> AsyncIterator[StreamEvent]:
    if len(text) > position:
        yield StreamEvent.delta(text[position:], id=f"{idea.id}:{len(text)}")
    if idea.status == "complete":
        usage = {"input_tokens": idea.input_tokens, "output_tokens": idea.output_tokens}
        yield StreamEvent("usage", usage)
        yield StreamEvent("done", _done(idea))
    elif idea.error == "client_disconnected":
        yield StreamEvent.error(idea.error, CUT_SHORT, idea_id=str(idea.id), partial=True)
    else:
        code, message = idea.error or "incomplete", f"The idea was cut short ({idea.error})"
        yield StreamEvent.error(code, message, idea_id=str(idea.id), partial=True)


def _done(idea: Idea) -> dict[str, object]:
    return {
        "idea_id": str(idea.id),
        "status": idea.status,
        "provider": idea.provider,
        "model": idea.model,
        "usage": {"input_tokens": idea.input_tokens, "output_tokens": idea.output_tokens},
        "finish_reason": idea.finish_reason,
    }


async def _save(
    sessions: AppSessions,
    draft: _Draft,
    *,
    error: str | None,
    started: float,
    failed: list[FailedAttempt],
) -> Idea:
    """Store the idea with its usage row; a provider's failure gives the unit back (a client
    that left keeps its charge: the tokens were spent on its behalf). A stream that ended
    before any text (the provider failed or the client left while it was still thinking)
    stores no idea, only its usage, and gives the unit back, as a failure to open does."""
    usage = draft.usage_read()
    idea = Idea(
        id=draft.live.id,
        user_id=draft.live.user_id,
        created_at=draft.created_at,
        provider=draft.provider,
        model=draft.model,
        content="".join(draft.live.parts),
        status="incomplete" if error else "complete",
        input_tokens=usage["input_tokens"],
        output_tokens=usage["output_tokens"],
        finish_reason=draft.finish_reason,
        error=error,
        completed_at=utcnow(),
    )
    # The provider failed, or the server stopped (`interrupted`): either way not the user's
    # doing, so the unit comes back; a client that left keeps its charge.
    provider_failed = error is not None and error not in STOP_REASONS
    server_stopped = error == "interrupted"
    nothing = error is not None and not idea.content.strip()
    refund = provider_failed or server_stopped or nothing

    usage_rows = [
        *failed_attempt_rows(user_id=idea.user_id, product="ideas", attempts=failed),
        usage_row(
            user_id=idea.user_id,
            product="ideas",
            provider=idea.provider,
            model=idea.model,
            latency_ms=_ms_since(started),
            outcome="failed" if provider_failed else "cancelled" if error else "succeeded",
            input_tokens=idea.input_tokens,
            output_tokens=idea.output_tokens,
            error=error,
        ),
    ]
    values = {column.key: getattr(idea, column.key) for column in _IDEA_COLUMNS}

    def write(connection: Connection) -> None:
        # INSERTs, not `session.add`: the ORM's unit of work cost more CPU than the write, and
        # this runs after every idea (`bench/stream_overhead.py`).
        if nothing:
            insert_usage(connection, usage_rows)
        else:
            insert_with_usage(connection, _IDEAS, values, usage_rows)
        if refund:
            quotas.give_back(connection, user_id=idea.user_id, product="ideas")

    if refund:
        await sessions.write(write)  # one transaction: the unit given back with the idea
    else:
        await sessions.write_each(write)  # the idea and its usage: each stands on its own
    if error and not nothing:
        logger.info("idea stored incomplete", extra={"idea_id": str(idea.id), "error": error})
    return idea


async def list_ideas(
    session: AsyncSession, *, user: User, limit: int, cursor: str | None
) -> tuple[list[Idea], str | None]:
    return await page_newest_first(
        session, Idea, where=Idea.user_id == user.id, limit=limit, cursor=cursor
    )


async def get_idea(session: AsyncSession, *, user: User, idea_id: uuid.UUID) -> Idea:
    idea = await session.get(Idea, idea_id)
    if idea is None or idea.user_id != user.id:
        raise NotFound("Idea not found")
    return idea
