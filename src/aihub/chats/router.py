from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from aihub.chats import service
from aihub.chats.models import Chat
from aihub.chats.schemas import (
    AttachmentRead,
    ChatChanged,
    ChatCreate,
    ChatCreated,
    ChatRead,
    ChatRename,
    ChatRequest,
    MessageRead,
)
from aihub.core.auth import AUTH_ERRORS, CurrentUser
from aihub.core.clock import Now
from aihub.core.config import Settings, SettingsDep
from aihub.core.db import SessionDep, Sessions
from aihub.core.errors import Unprocessable, error_responses
from aihub.core.sse import NDJSONEncoder, StreamEvent, stream_response, unless_disconnected
from aihub.providers.routing import ModelChain, text_chain
from aihub.storage import files
from aihub.storage.dependencies import SignerDep, StorageDep, public_base_url
from aihub.usage import quotas
from aihub.users.models import User

router = APIRouter(tags=["chats"])

ChatChain = Annotated[ModelChain, Depends(text_chain("chats"))]
_CHAT_ERRORS = error_responses({**AUTH_ERRORS, 404: "No such chat of yours"})


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _chat_read(chat: Chat, user: User) -> ChatRead:
    return ChatRead(
        chatId=str(chat.id),
        userId=user.clerk_id or str(user.id),
        title=chat.title,
        createdAt=_iso(chat.created_at),
        updatedAt=_iso(chat.updated_at),
    )


def _json(body: Any, *, next_cursor: str | None = None, status_code: int = 200) -> Response:
    headers = {"X-Next-Cursor": next_cursor} if next_cursor else None
    return Response(orjson.dumps(body), status_code, headers, media_type="application/json")


@router.get(
    "/api/chats",
    summary="My chats, most recent activity first (a bare array)",
    response_model=list[ChatRead],
    responses={
        **error_responses(AUTH_ERRORS),
        200: {"description": "Chats; `X-Next-Cursor` names the next page when there is one"},
    },
)
async def list_chats(
    user: CurrentUser,
    session: SessionDep,
    # The original client does not page: by default, as many as one page can hold.
    limit: Annotated[int, Query(ge=1, le=500)] = 500,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    chats, next_cursor = await service.list_chats(
        session, user_id=user.id, limit=limit, cursor=cursor
    )
    return _json([_chat_read(c, user).model_dump() for c in chats], next_cursor=next_cursor)


@router.post(
    "/api/chats/create",
    summary="Start a chat",
    response_model=ChatCreated,
    responses=error_responses(AUTH_ERRORS),
)
async def create_chat(
    body: ChatCreate, user: CurrentUser, session: SessionDep, now: Now
) -> ChatCreated:
    """The token decides the owner (`user_id` is ignored). The chat exists at once."""
    title = body.title.strip() if body.title and body.title.strip() else None
    chat = await service.create_chat(session, user_id=user.id, title=title, now=now)
    return ChatCreated(chat_id=str(chat.id), title=chat.title)


@router.get(
    "/api/chats/{chat_id}",
    summary="A chat's messages, oldest first (a bare array)",
    response_model=list[MessageRead],
    responses=_CHAT_ERRORS,
)
async def read_chat(
    request: Request,
    chat_id: str,
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    signer: SignerDep,
    now: Now,
    # The original client does not page: by default, as many as one page can hold.
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """The newest `limit` messages; `X-Next-Cursor` (as `cursor`) gives the older ones.
    `media_url` is a fresh signed link the browser can load."""
    chat = await service.get_chat(session, user_id=user.id, chat_id=_chat_id(chat_id))
    page = await service.list_messages(session, chat=chat, limit=limit, cursor=cursor)
    links = files.FileLinks(storage, signer, public_base_url(request, settings))
    expires_at = now + timedelta(seconds=settings.storage_url_ttl_seconds)
    body = []
    for message in page.messages:
        attachments = [
            AttachmentRead(
                file_id=str(f.id),
                filename=f.filename,
                media_type=f.content_type,
                media_url=links.download_url(f, expires_at),
            )
            for f in page.attachments.get(message.id, [])
        ]
        first = attachments[0] if attachments else None
        body.append(
            MessageRead(
                messageId=str(message.id),
                role="assistant" if message.role == "assistant" else "user",
                content=message.content,
                media_url=first.media_url if first else None,
                media_type=first.media_type if first else None,
                status=message.status,
                createdAt=_iso(message.created_at),
                attachments=attachments,
                citations=message.citations,
            ).model_dump()
        )
    return _json(body, next_cursor=page.next_cursor)


def _chat_id(value: str) -> uuid.UUID:
    chat_id = service.parse_chat_id(value)
    if chat_id is None:
        raise service.ChatNotFound()
    return chat_id


@router.patch(
    "/api/chats/{chat_id}",
    summary="Rename a chat",
    response_model=ChatChanged,
    responses=_CHAT_ERRORS,
)
async def rename_chat(
    chat_id: str, body: ChatRename, user: CurrentUser, session: SessionDep
) -> ChatChanged:
    chat = await service.rename_chat(
        session, user_id=user.id, chat_id=_chat_id(chat_id), title=body.title.strip()
    )
    return ChatChanged(message="Chat renamed", chat_id=str(chat.id), title=chat.title)


@router.delete(
    "/api/chats/{chat_id}",
    summary="Delete a chat, its messages and their files",
    response_model=ChatChanged,
    responses=_CHAT_ERRORS,
)
async def delete_chat(
    chat_id: str, user: CurrentUser, sessions: Sessions, storage: StorageDep
) -> ChatChanged:
    """Answers with a JSON body (the original frontend expects one), never 204."""
    parsed = _chat_id(chat_id)
    async with sessions.begin() as session:
        deleted = await service.delete_chat(session, user_id=user.id, chat_id=parsed)
    await files.delete_stored(storage, deleted.keys)
    return ChatChanged(message="Chat deleted", chat_id=str(parsed), title=deleted.title)


# --- the reply -----------------------------------------------------------------------------------

_CHAT_DESCRIPTION = """Send the conversation (the original client sends all of it); only the last
user message is taken, and the model sees the chat's stored history.

The reply streams as NDJSON by default, one ASCII JSON object per line, as the original client
reads it: `{"chat_id"}` first when the chat was just created, then `{"response": "<delta>"}`
lines, and `{"done": true, "message_id", ...}` or `{"error": "..."}` last. With
`Accept: text/event-stream`: `data: {"type": "chunk", "content"}` events, then
`{"type": "done", "message_id", "usage", "citations"}` or
`{"type": "error", "error": {"code", "message", "retryable"}}`.

Media parts carry, in `text`, the `gcs_url` of an upload (`POST /api/upload-url`); the file's
real type comes from its upload record. `"search": true` grounds the answer in Google Search
(Gemini), with the sources as `citations`. Costs one unit of the chat quota."""


def _ndjson_line(event: StreamEvent) -> dict[str, Any] | None:
    if event.kind == "delta":
        return {"response": event.data}
    if event.kind == "meta":
        return dict(event.data)
    if event.kind == "error":
        return {"error": event.data["message"], "code": event.data["code"]}
    if event.kind == "done":
        return {"done": True, **event.data}
    return None


class TypedEventEncoder:
    """The README's SSE format: unnamed events whose JSON data carries a `type`."""

    media_type = "text/event-stream"

    def encode(self, event: StreamEvent) -> bytes:
        if event.kind == "delta":
            data: dict[str, Any] = {"type": "chunk", "content": event.data}
        elif event.kind == "meta":
            data = {"type": "chat", **event.data}
        elif event.kind == "done":
            data = {"type": "done", **event.data}
        elif event.kind == "error":
            data = {"type": "error", "error": event.data}
        else:
            return b""
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def keepalive(self) -> bytes | None:
        return b": keep-alive\n\n"


def chat_options(settings: Settings, system_prompt: str) -> service.ChatOptions:
    return service.ChatOptions(
        policy=quotas.policy_for(settings, "chats"),
        system_prompt=system_prompt,
        context_tokens=settings.chat_context_tokens,
        summary_after_tokens=settings.chat_summary_after_tokens,
        summary_min_messages=settings.chat_summary_min_messages,
        keep_recent_messages=settings.chat_keep_recent_messages,
        summary_tokens=settings.chat_summary_tokens,
        max_upload_bytes=settings.upload_max_bytes,
        inline_max_bytes=settings.gemini_inline_max_bytes,
    )


def load_system_prompt(settings: Settings) -> str:
    """`CHAT_SYSTEM_PROMPT`, else the file `CHAT_SYSTEM_PROMPT_FILE`, else the default (read once,
    at start-up)."""
    if settings.chat_system_prompt:
        return settings.chat_system_prompt
    if settings.chat_system_prompt_file:
        return Path(settings.chat_system_prompt_file).read_text(encoding="utf-8").strip()
    return service.DEFAULT_SYSTEM_PROMPT


def _incoming(body: ChatRequest, max_chars: int, max_parts: int) -> service.IncomingMessage:
    last = body.messages[-1]
    if last.role != "user":
        raise Unprocessable("messages: the last message must be the user's")
    texts: list[str] = []
    references: list[str] = []
    for part in last.parts:
        kind = (part.type or "text").lower()
        if kind != "text" or part.mimeType or _is_reference(part.text):
            references.append(part.text.strip())
        elif part.text:
            texts.append(part.text)
    text = "\n".join(texts)
    if len(text) > max_chars:
        raise Unprocessable(f"messages: the last message is longer than {max_chars} characters")
    if len(references) > max_parts:
        raise Unprocessable(f"messages: at most {max_parts} files a message")
    return service.IncomingMessage(text, references)


def _is_reference(text: str) -> bool:
    stripped = text.strip()
    return (
        stripped.startswith(("http://", "https://"))
        and " " not in stripped
        and files.reference_id(stripped) is not None
    )


@router.post(
    "/chat",
    summary="Send a message and stream the reply",
    description=_CHAT_DESCRIPTION,
    response_class=Response,
    responses={
        200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}}},
        **error_responses(
            {
                **AUTH_ERRORS,
                404: "No such chat or file of yours",
                409: "A reply to this chat is still being written (a double submit)",
                422: "Invalid message, or a file the model cannot read",
                429: "Chat quota exceeded (see Retry-After), or the provider is rate limiting",
                502: "The provider failed",
                503: "The provider is unavailable",
            }
        ),
    },
)
async def chat(
    request: Request,
    body: ChatRequest,
    user: CurrentUser,
    settings: SettingsDep,
    sessions: Sessions,
    storage: StorageDep,
    chain: ChatChain,
    now: Now,
) -> Response:
    incoming = _incoming(body, settings.chat_max_message_chars, settings.chat_max_media_parts)
    options = chat_options(settings, request.app.state.chat_system_prompt)
    summaries: service.Summaries = request.app.state.chat_summaries
    summary_chain: ModelChain = request.app.state.chat_summary_chain

    def after_reply(chat_id: uuid.UUID) -> None:
        summaries.spawn(
            service.summarize_if_due(
                sessions, chain=summary_chain, chat_id=chat_id, options=options
            )
        )

    reply = await service.start_reply(
        sessions,
        storage=storage,
        chain=chain,
        user_id=user.id,
        chat_id=service.parse_chat_id(body.chatId),
        message=incoming,
        search=body.search,
        options=options,
        now=now,
        opening=lambda opening: unless_disconnected(request, opening),
        after_reply=after_reply,
        clock=request.app.state.clock,
        replying=request.app.state.chat_replying,
    )
    wants_sse = "text/event-stream" in request.headers.get("accept", "")
    encoder = TypedEventEncoder() if wants_sse else NDJSONEncoder(_ndjson_line)
    return stream_response(
        reply.events,
        encoder,
        product="chats",
        provider=reply.provider,
        keepalive_seconds=settings.sse_keepalive_seconds,
        headers={
            "X-AIHub-Provider": f"{reply.provider}:{reply.model}",
            "X-Chat-Id": str(reply.chat_id),
        },
    )
