from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from aihub.byok import service
from aihub.byok.schemas import ChatRequest
from aihub.core.config import Settings, SettingsDep
from aihub.core.errors import error_responses
from aihub.core.ratelimit import RateLimit, configured, rate_limit
from aihub.core.sse import JSONEventEncoder, TextEncoder, stream_response, unless_disconnected
from aihub.providers.openai import OpenAIProvider

router = APIRouter(tags=["byok"])


def _byok_limit(settings: Settings) -> RateLimit | None:
    return configured(settings.byok_rate_limit)


async def get_byok_provider(request: Request) -> OpenAIProvider:
    provider: OpenAIProvider | None = request.app.state.providers.byok
    assert provider is not None, "the route is only mounted with BYOK_ENABLED"
    return provider


ByokProvider = Annotated[OpenAIProvider, Depends(get_byok_provider)]

_DESCRIPTION = """Relays a chat to OpenAI (or the server's `BYOK_BASE_URL`) with the caller's
own API key, which is used for this request only: never logged, stored or echoed.

The reply streams as `text/plain`, appended verbatim by the original client; if it is cut short,
one last line says so. With `Accept: text/event-stream` it streams as SSE instead: `delta`
`{"text"}` events, then `done` `{"model", "usage"}` or `error` `{"code", "message"}`.

An upstream rejection (bad key 401, exhausted quota 429, unknown model 404) is answered with that
status before any byte of the reply. Rate limited per client (`BYOK_RATE_LIMIT`)."""


@router.post(
    "/api/chat",
    summary="Chat with your own OpenAI key",
    description=_DESCRIPTION,
    dependencies=[Depends(rate_limit("byok", _byok_limit))],
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}, "text/event-stream": {}}},
        **error_responses(
            {
                401: "OpenAI refused the key",
                404: "OpenAI does not know the model",
                422: "Invalid body (the detail names the field)",
                429: "Rate limited here (see Retry-After), or by OpenAI",
                502: "OpenAI failed",
                503: "OpenAI is unavailable",
            }
        ),
    },
)
async def chat(
    body: ChatRequest, request: Request, settings: SettingsDep, provider: ByokProvider
) -> Response:
    started_at = time.perf_counter()
    text_request, model = service.to_text_request(
        body,
        max_history=settings.byok_max_history,
        max_chars=settings.byok_max_message_chars,
        allowed_models=settings.byok_allowed_models,
    )
    opened = await unless_disconnected(
        request,
        service.open_reply(
            provider, text_request, model=model, api_key=body.api_key.get_secret_value()
        ),
    )
    wants_sse = "text/event-stream" in request.headers.get("accept", "")
    return stream_response(
        service.reply_events(opened),
        JSONEventEncoder() if wants_sse else TextEncoder(),
        product="byok",
        provider=opened.provider,
        started_at=started_at,
        keepalive_seconds=settings.sse_keepalive_seconds,
        headers={"X-AIHub-Provider": f"{opened.provider}:{opened.model}"},
    )
