from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import Response

from aihub.core.auth import AUTH_ERRORS, CurrentUser, require_plan
from aihub.core.db import SessionDep
from aihub.core.errors import error_responses
from aihub.core.sse import (
    JSONEventEncoder,
    Linger,
    MarkdownEventEncoder,
    stream_response,
    unless_disconnected,
)
from aihub.ideas import resume, service
from aihub.ideas.dependencies import IdeaCallerDep
from aihub.ideas.schemas import IdeaPage, IdeaRead

router = APIRouter(tags=["ideas"])

_STREAM_DESCRIPTION = """Streams a new business idea in Markdown.

By default the stream is framed for the original frontend (`@microsoft/fetch-event-source`
appending each event's data): the concatenated data renders as the model's text (each delta's
last character is held back until the next one, because an event cannot start with a newline; a
first delta of one character is sent at once; the README's "Streams" lists the invisible
differences: a space before a line break, newlines before the first text, `\r`), and it ends with
`event: done` carrying empty data. Errors, before or during the stream, arrive as
`text/event-stream` with one readable Markdown line.

Every event with text carries an id, `<idea id>:<characters the client has>`. A request that
sends one back as `Last-Event-ID` (the original client does when its tab is shown again) gets the
rest of that idea instead of a new one, at no charge: followed live while it is still being
written (an idea goes on for `IDEAS_RESUME_SECONDS` after its client left), else from the stored
idea, ending with an error line if it was cut short.

`?format=json` gives named events instead: `delta` `{"text"}`, then `usage`
`{"input_tokens", "output_tokens"}` and `done` with the stored idea's
id, usage and provider, or `error` `{"code", "message"}`; errors before the stream are JSON.
"""

_STREAM_ERRORS = {
    **AUTH_ERRORS,
    403: "The caller's plan does not include business ideas",
    422: "Invalid query parameter",
    429: "Daily quota exceeded (see Retry-After), or the provider is rate limiting",
    502: "The provider failed",
    503: "The provider or the auth keys are unavailable",
}


def _stream_error_responses() -> dict[int | str, dict[str, Any]]:
    """Errors arrive as JSON with `?format=json`, as one Markdown line of SSE otherwise."""
    responses = error_responses(_STREAM_ERRORS)
    for response in responses.values():
        response["content"] = {
            "text/event-stream": {"example": "event: error\ndata: **Error:** ...\n\n"}
        }
    return responses


@router.get(
    "/api",
    summary="Stream a business idea",
    description=_STREAM_DESCRIPTION,
    response_class=Response,
    responses={200: {"content": {"text/event-stream": {}}}, **_stream_error_responses()},
)
async def stream_idea(
    request: Request,
    caller: IdeaCallerDep,
    format: Annotated[
        Literal["markdown", "json"], Query(description="Wire format of the stream")
    ] = "markdown",
    last_event_id: Annotated[
        str | None,
        Header(description="The last event id seen: the rest of that idea, at no charge"),
    ] = None,
) -> Response:
    started_at = time.perf_counter()
    user, plan, ideas = caller.user, caller.plan, caller.ideas
    settings = ideas.settings
    require_plan(plan, settings.ideas_required_plan or None)
    if (resuming := resume.parse_last_event_id(last_event_id)) is not None:
        idea_id, position = resuming
        measure = str if format == "json" else MarkdownEventEncoder.normalised
        resumed = await service.resume_idea(
            ideas.sessions,
            ideas.live,
            user=user,
            idea_id=idea_id,
            position=position,
            measure=measure,
        )
        if resumed is not None:
            return stream_response(
                resumed.events,
                JSONEventEncoder()
                if format == "json"
                else MarkdownEventEncoder.resuming(str(idea_id), resumed.sent),
                product="ideas",
                started_at=started_at,
                keepalive_seconds=settings.sse_keepalive_seconds,
                headers={"X-AIHub-Provider": resumed.label},
            )
    stream = await unless_disconnected(
        request,
        service.start_idea(
            ideas.sessions,
            chain=ideas.chain,
            user=user,
            prompt=settings.ideas_prompt,
            policy=ideas.policy,
            balances=ideas.balances,
            now=ideas.clock(),
            live_ideas=ideas.live,
        ),
    )
    live = stream.live
    encoder = JSONEventEncoder() if format == "json" else MarkdownEventEncoder(ids=str(live.id))
    return stream_response(
        stream.events,
        encoder,
        product="ideas",
        provider=stream.provider,
        started_at=started_at,
        keepalive_seconds=settings.sse_keepalive_seconds,
        headers={"X-AIHub-Provider": f"{stream.provider}:{stream.model}"},
        linger=Linger(settings.ideas_resume_seconds, live.resumed, lambda: bool(live.parts))
        if settings.ideas_resume_seconds
        else None,
    )


@router.get(
    "/api/ideas",
    summary="List my ideas, newest first",
    response_model=IdeaPage,
    responses=error_responses({**AUTH_ERRORS, 422: "Invalid limit or cursor"}),
)
async def list_ideas(
    user: CurrentUser,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> IdeaPage:
    ideas, next_cursor = await service.list_ideas(session, user=user, limit=limit, cursor=cursor)
    return IdeaPage(
        items=[IdeaRead.model_validate(idea) for idea in ideas], next_cursor=next_cursor
    )


@router.get(
    "/api/ideas/{idea_id}",
    summary="Get one of my ideas",
    response_model=IdeaRead,
    responses=error_responses({**AUTH_ERRORS, 404: "No such idea of yours", 422: "Not an id"}),
)
async def get_idea(user: CurrentUser, session: SessionDep, idea_id: uuid.UUID) -> IdeaRead:
    return IdeaRead.model_validate(await service.get_idea(session, user=user, idea_id=idea_id))
