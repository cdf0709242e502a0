from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Request
from starlette.responses import Response

from aihub.core.errors import use_error_renderer
from aihub.core.sse import STREAM_HEADERS, markdown_error_body
from aihub.ideas.resume import LiveIdeas, get_live_ideas
from aihub.providers.routing import ModelChain, text_chain

IdeasChain = Annotated[ModelChain, Depends(text_chain("ideas"))]
LiveIdeasDep = Annotated[LiveIdeas, Depends(get_live_ideas)]


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
