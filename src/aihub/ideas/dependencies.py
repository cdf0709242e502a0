from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from aihub.core.auth import bearer_scheme, get_current_plan, get_current_user
from aihub.core.clock import Clock
from aihub.core.config import Settings
from aihub.core.db import AppSessions
from aihub.core.errors import use_error_renderer
from aihub.core.sse import STREAM_HEADERS, markdown_error_body
from aihub.ideas.resume import LiveIdeas
from aihub.providers.routing import ModelChain
from aihub.usage.quotas import Balances, QuotaPolicy, policy_for
from aihub.users.models import User


@dataclass(frozen=True, slots=True)
class Ideas:
    """What the idea stream works with, built once with the app and given to it as one
    dependency: FastAPI's solving of a dependency cost more than any of these took to find."""

    settings: Settings
    sessions: AppSessions
    chain: ModelChain
    live: LiveIdeas
    """The ideas this process is writing."""
    clock: Clock
    policy: QuotaPolicy | None
    """The daily quota; None: unlimited."""
    balances: Balances
    """What the last reservations here left (`quotas.reserve_ahead`)."""

    @classmethod
    def of(
        cls, settings: Settings, *, sessions: AppSessions, chain: ModelChain, clock: Clock
    ) -> Ideas:
        policy = policy_for(settings, "ideas")
        return cls(settings, sessions, chain, LiveIdeas(), clock, policy, Balances())


StreamFormat = Literal["markdown", "json"]
"""The stream's wire format (`?format`)."""


@dataclass(frozen=True, slots=True)
class IdeaCaller:
    """Who asks for an idea stream (`CurrentUser`, `CurrentPlan`), how (`?format`,
    `Last-Event-ID`), and what it works with, as one dependency that FastAPI solves nothing
    for: its solving cost more than what it found. Each dependency level (the bearer scheme was
    one) and each declared parameter (two, usually absent) is generic work on every stream's
    first token: 0.2-0.3 ms of it, cold, for these three (`bench/README.md`). The route
    documents them itself (`STREAM_OPENAPI`)."""

    user: User
    plan: str | None
    ideas: Ideas
    format: StreamFormat
    last_event_id: str | None
    """The last event id the client saw: the rest of that idea, at no charge."""


async def get_idea_caller(request: Request) -> IdeaCaller:
    """The caller, with errors rendered for the stream's client (`markdown_errors`) from before
    the token is checked, and the token checked before `?format` (as FastAPI would order a
    dependency and a parameter)."""
    await markdown_errors(request)
    user = await get_current_user(request, await bearer_scheme(request))
    plan = await get_current_plan(request, user)
    ideas: Ideas = request.app.state.ideas
    return IdeaCaller(
        user, plan, ideas, _stream_format(request), request.headers.get("last-event-id")
    )


def _stream_format(request: Request) -> StreamFormat:
    match value := request.query_params.get("format", "markdown"):
        case "markdown" | "json":
            return value
    try:  # the error pydantic gives, where FastAPI would have put it
        return _FORMAT.validate_python(value)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**error, "loc": ("query", "format")} for error in exc.errors()]
        ) from None


_FORMAT: TypeAdapter[StreamFormat] = TypeAdapter(StreamFormat)

STREAM_OPENAPI: dict[str, Any] = {
    "security": [{bearer_scheme.scheme_name: []}],
    "parameters": [
        {
            "name": "format",
            "in": "query",
            "required": False,
            "description": "Wire format of the stream",
            "schema": {
                "title": "Format",
                "type": "string",
                "enum": list(get_args(StreamFormat)),
                "default": "markdown",
            },
        },
        {
            "name": "last-event-id",
            "in": "header",
            "required": False,
            "description": "The last event id seen: the rest of that idea, at no charge",
            "schema": {"title": "Last-Event-Id", "type": "string"},
        },
    ],
}
"""What FastAPI would document for the caller's inputs, had it solved them."""


IdeaCallerDep = Annotated[IdeaCaller, Depends(get_idea_caller)]


def render_markdown_error(
    status_code: int, code: str, detail: str, headers: Mapping[str, str]
) -> Response:
    """An error the original ideas client shows instead of retrying: one Markdown line, as SSE.

    fetch-event-source retries forever on any content type but `text/event-stream`.
    """
    return Response(
        markdown_error_body(detail),
        status_code=status_code,
        media_type="text/event-stream",
        headers={**STREAM_HEADERS, **headers},
    )


async def markdown_errors(request: Request) -> None:
    """Errors on the default (Markdown) stream render as event-stream text."""
    if request.query_params.get("format", "markdown") != "json":
        use_error_renderer(request, render_markdown_error)
