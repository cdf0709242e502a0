"""Bring-your-own-key chat: the caller's history and key, relayed to OpenAI (or the server's
`BYOK_BASE_URL`), the upstream opened before the answer is committed."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aihub.byok.schemas import ChatRequest
from aihub.core.errors import Unprocessable
from aihub.core.sse import StreamEvent
from aihub.providers.base import (
    Finish,
    Message,
    ProviderAuthError,
    ProviderError,
    ProviderNotFound,
    TextDelta,
    TextPart,
    TextRequest,
    Usage,
    unusable_answer,
)
from aihub.providers.openai import OpenAIProvider
from aihub.providers.routing import Candidate, ModelChain, OpenedStream


def to_text_request(
    body: ChatRequest, *, max_history: int, max_chars: int, allowed_models: list[str]
) -> tuple[TextRequest, str]:
    """The model request and model name; `Unprocessable` (422) naming the field otherwise."""
    model = body.model or allowed_models[0]
    if model not in allowed_models:
        raise Unprocessable(f"model: must be one of {', '.join(allowed_models)}")
    for field, text in (
        ("user_message", body.user_message),
        ("developer_message", body.developer_message),
    ):
        if len(text) > max_chars:
            raise Unprocessable(f"{field}: must be at most {max_chars} characters")
    history = [
        Message("user" if item.role == "user" else "assistant", (_text(item.content),))
        for item in body.chat_history
        if item.content and item.content.strip()
    ]
    # The client never trims its history: send the most recent part rather than refuse.
    recent = history[len(history) - max_history :] if max_history else []
    messages = (*recent, Message.user(body.user_message))
    return TextRequest(messages=messages, system=body.developer_message or None), model


def _text(text: str | None) -> TextPart:
    return TextPart(text or "")


class KeyRejected(ProviderAuthError):
    """The caller's own key was refused: theirs to fix, so a 401 rather than a 502."""

    status_code = 401
    default_message = "OpenAI rejected the API key"


class ModelNotFound(ProviderNotFound):
    status_code = 404
    default_message = "OpenAI does not offer this model to this API key"


async def open_reply(
    provider: OpenAIProvider, request: TextRequest, *, model: str, api_key: str
) -> OpenedStream:
    """Open the upstream stream with the caller's key: a rejection (bad key, quota, unknown model)
    raises here, with that status, before any byte of the answer."""
    chain = ModelChain((Candidate(provider.with_api_key(api_key), model),), configured="byok")
    try:
        return await chain.open_stream(request, until="accepted")
    except ProviderAuthError as exc:
        raise KeyRejected(upstream_status=exc.upstream_status, provider="openai") from None
    except ProviderNotFound as exc:
        raise ModelNotFound(upstream_status=exc.upstream_status, provider="openai") from None


async def reply_events(opened: OpenedStream) -> AsyncIterator[StreamEvent]:
    usage: Usage | None = None
    text: list[str] = []
    finish_reason: str | None = None
    try:
        async for event in opened:
            if isinstance(event, TextDelta):
                text.append(event.text)
                yield StreamEvent.delta(event.text)
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, Finish):
                finish_reason = event.reason
        if problem := unusable_answer("".join(text), finish_reason, provider=opened.provider):
            raise problem
    except ProviderError as exc:
        yield StreamEvent.error(exc.code, exc.message)
        return
    finally:
        await opened.aclose()
    yield StreamEvent(
        "done",
        {
            "model": opened.model,
            "usage": {
                "input_tokens": usage.input_tokens if usage else None,
                "output_tokens": usage.output_tokens if usage else None,
            },
        },
    )
