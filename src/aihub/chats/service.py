"""Chats: conversations, their messages, and a reply streamed from the model.

The client sends its whole history with every message; only its last (user) message is taken,
and the model sees the server's own history (a forged history changes nothing). The user's
message is stored before the model is called; the reply when it ends, or marked incomplete when
the client leaves or the provider fails mid-way.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
from sqlalchemy import Connection, bindparam, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from aihub.chats import context
from aihub.chats.models import Chat, ChatMessage, ChatMessageFile
from aihub.core.db import AppSessions, utcnow
from aihub.core.errors import Conflict, NotFound, Unprocessable
from aihub.core.pagination import page_newest_first
from aihub.core.sse import StopReason, StreamEvent, stop_reason
from aihub.providers.base import (
    Citation,
    FileRefPart,
    Finish,
    MediaPart,
    Message,
    Part,
    ProviderError,
    TextDelta,
    TextProvider,
    TextRequest,
    Usage,
    unusable_answer,
)
from aihub.providers.routing import ModelChain, OpenedStream
from aihub.storage import files
from aihub.storage.base import Storage
from aihub.storage.models import StoredFile
from aihub.usage import quotas
from aihub.usage.service import (
    failed_attempt_rows,
    insert_usage,
    record_failed_attempts,
    record_usage,
    usage_row,
)

logger = logging.getLogger("aihub.chats")

PROVIDER_COPY_MARGIN = timedelta(hours=1)
"""A provider's copy of a file is reused while it has at least this long to live."""

DEFAULT_SYSTEM_PROMPT = (
    "You are Raven, a helpful, knowledgeable assistant. Answer clearly and accurately, use "
    "Markdown where it helps, and say so when you are not sure."
)


class ChatNotFound(NotFound):
    code = "chat_not_found"
    default_message = "No such chat"


class MediaNotAccepted(Unprocessable):
    code = "media_not_accepted"


@dataclass(frozen=True, slots=True)
class ChatOptions:
    policy: quotas.QuotaPolicy | None
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    context_tokens: int = 6000
    summary_after_tokens: int = 3500
    summary_min_messages: int = 10
    keep_recent_messages: int = 5
    summary_tokens: int = 400
    max_upload_bytes: int = 20 * 1024 * 1024
    inline_max_bytes: int = 4 * 1024 * 1024


def parse_chat_id(value: str | None) -> uuid.UUID | None:
    if value is None or not value.strip():
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise ChatNotFound() from None


def title_from(text: str, filenames: Sequence[str] = ()) -> str:
    """A short title from a chat's first message: its first line, cut at a word near 60
    characters."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"(\*\*|__|`)", "", line.lstrip("#> \t"))
    line = re.sub(r"\s+", " ", line).strip()
    if not line:
        return filenames[0][:60] if filenames else "New chat"
    if len(line) <= 60:
        return line
    cut = line[:60].rsplit(" ", 1)[0] or line[:60]
    return cut.rstrip(",.;:-") + "…"


# --- conversations -----------------------------------------------------------------------------


async def create_chat(
    session: AsyncSession, *, user_id: uuid.UUID, title: str | None, now: datetime
) -> Chat:
    chat = Chat(id=uuid.uuid4(), user_id=user_id, title=title, created_at=now, updated_at=now)
    session.add(chat)
    await session.flush()
    return chat


async def get_chat(session: AsyncSession, *, user_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
    chat = await session.get(Chat, chat_id, populate_existing=True)
    if chat is None or chat.user_id != user_id:
        raise ChatNotFound()
    return chat


async def list_chats(
    session: AsyncSession, *, user_id: uuid.UUID, limit: int, cursor: str | None
) -> tuple[list[Chat], str | None]:
    """Own chats, most recent activity first."""
    return await page_newest_first(
        session, Chat, where=Chat.user_id == user_id, limit=limit, cursor=cursor, at="updated_at"
    )


@dataclass(frozen=True, slots=True)
class MessagePage:
    messages: list[ChatMessage]
    """Oldest first."""
    attachments: dict[uuid.UUID, list[StoredFile]]
    next_cursor: str | None
    """Where the page of older messages starts."""


async def list_messages(
    session: AsyncSession, *, chat: Chat, limit: int, cursor: str | None
) -> MessagePage:
    """The newest `limit` messages (before `cursor`), returned oldest first."""
    newest, next_cursor = await page_newest_first(
        session, ChatMessage, where=ChatMessage.chat_id == chat.id, limit=limit, cursor=cursor
    )
    newest.reverse()
    return MessagePage(newest, await attachments_of(session, [m.id for m in newest]), next_cursor)


_ATTACHMENTS = (
    select(ChatMessageFile.message_id, StoredFile)
    .join(StoredFile, StoredFile.id == ChatMessageFile.file_id)
    .where(ChatMessageFile.message_id.in_(bindparam("message_ids", expanding=True)))
    .order_by(ChatMessageFile.message_id, ChatMessageFile.position)
)
"""Built once, its ids given at each execution: built for each reply, the statement's `IN`
left a dozen objects in reference cycles (SQLAlchemy's copy of its parameter), freed only by
the garbage collector."""


async def attachments_of(
    session: AsyncSession, message_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[StoredFile]]:
    found: dict[uuid.UUID, list[StoredFile]] = {message_id: [] for message_id in message_ids}
    if not message_ids:
        return found
    rows = await session.execute(_ATTACHMENTS, {"message_ids": list(message_ids)})
    for message_id, stored in rows:
        found[message_id].append(stored)
    return found


async def rename_chat(
    session: AsyncSession, *, user_id: uuid.UUID, chat_id: uuid.UUID, title: str
) -> Chat:
    chat = await get_chat(session, user_id=user_id, chat_id=chat_id)
    chat.title = title
    await session.flush()
    return chat


@dataclass(frozen=True)
class DeletedChat:
    title: str | None
    keys: list[str]
    """The storage keys to remove (after the commit)."""


async def delete_chat(
    session: AsyncSession, *, user_id: uuid.UUID, chat_id: uuid.UUID
) -> DeletedChat:
    """Delete the chat, its messages and the files attached to them (unless another chat uses
    them too)."""
    chat = await get_chat(session, user_id=user_id, chat_id=chat_id)
    in_chat = (
        select(ChatMessageFile.file_id)
        .join(ChatMessage, ChatMessage.id == ChatMessageFile.message_id)
        .where(ChatMessage.chat_id == chat.id)
    )
    elsewhere = (
        select(ChatMessageFile.file_id)
        .join(ChatMessage, ChatMessage.id == ChatMessageFile.message_id)
        .where(ChatMessage.chat_id != chat.id)
    )
    attached = in_chat.except_(elsewhere)
    stored = list(
        (await session.scalars(select(StoredFile).where(StoredFile.id.in_(attached)))).all()
    )
    keys = [f.key for f in stored]
    for stored_file in stored:
        await session.delete(stored_file)
    await session.delete(chat)
    await session.flush()
    return DeletedChat(chat.title, keys)


# --- a reply -------------------------------------------------------------------------------------


class ReplyInProgress(Conflict):
    code = "reply_in_progress"
    default_message = "A reply to this chat is still being written; wait for it to finish"


class Replying:
    """The chats this process is answering, each by the request task answering it: a second
    message to a chat while its reply is being written (a double submit) is refused, rather than
    charged and answered twice in one history. A task that ended, however it ended, holds
    nothing. Several instances do not see each other's."""

    def __init__(self) -> None:
        self._tasks: dict[uuid.UUID, asyncio.Task[Any]] = {}

    def claim(self, chat_id: uuid.UUID) -> None:
        task = asyncio.current_task()
        assert task is not None
        holder = self._tasks.get(chat_id)
        if holder is not None and holder is not task and not holder.done():
            raise ReplyInProgress()
        self._tasks[chat_id] = task
        task.add_done_callback(functools.partial(self._release, chat_id))

    def _release(self, chat_id: uuid.UUID, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(chat_id) is task:
            del self._tasks[chat_id]


@dataclass
class IncomingMessage:
    text: str
    references: list[str]


@dataclass
class Reply:
    chat_id: uuid.UUID
    created: bool
    provider: str
    model: str
    events: AsyncIterator[StreamEvent]


@dataclass
class _Attached:
    file: StoredFile
    data: bytes


async def start_reply(
    sessions: AppSessions,
    *,
    storage: Storage,
    chain: ModelChain,
    user_id: uuid.UUID,
    chat_id: uuid.UUID | None,
    message: IncomingMessage,
    search: bool,
    options: ChatOptions,
    now: datetime,
    opening: Callable[[Awaitable[OpenedStream]], Awaitable[OpenedStream]],
    after_reply: Callable[[uuid.UUID], None] | None = None,
    clock: Callable[[], datetime] = utcnow,
    replying: Replying | None = None,
) -> Reply:
    """Store the user's message (charging one unit), open the model's reply, and return its
    events. `opening` wraps the provider's opening (to cancel it if the client leaves);
    `replying`, when given, refuses a chat already being answered (run the reply's events in
    the same task)."""
    started = time.perf_counter()
    if not message.text.strip() and not message.references:
        raise Unprocessable("messages: the last message has neither text nor files")
    if chat_id is not None and replying is not None:
        replying.claim(chat_id)
    provider = chain.primary.provider
    async with sessions() as session:
        chat = await get_chat(session, user_id=user_id, chat_id=chat_id) if chat_id else None
        stored = [
            await files.file_by_reference(session, user_id=user_id, reference=reference)
            for reference in message.references
        ]
    _check_accepted(provider, stored)
    attached = [
        _Attached(f, await files.check_upload(storage, f, max_bytes=options.max_upload_bytes))
        for f in stored
    ]

    created = chat is None
    title = title_from(message.text, [a.file.filename for a in attached])
    chat_id = uuid.uuid4() if chat is None else chat.id
    user_message = ChatMessage(
        id=uuid.uuid4(), chat_id=chat_id, role="user", content=message.text, created_at=now
    )
    user_message.id = await sessions.write(
        functools.partial(
            _store_message,
            message=user_message,
            user_id=user_id,
            created=created,
            title=title if chat is None or chat.title is None else None,
            attached=[(a.file.id, len(a.data)) for a in attached],
            policy=options.policy,
        ),
        undo=lambda _: functools.partial(quotas.give_back, user_id=user_id, product="chats"),
    )

    try:
        request = await _request(
            sessions, storage, provider, chat_id, user_message, attached, search, options, created
        )
        opened = await opening(chain.open_stream(request, until="accepted"))
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            async with sessions.begin() as session:
                await quotas.refund(session, user_id=user_id, product="chats")
                if isinstance(exc, ProviderError):
                    record_failed_attempts(
                        session, user_id=user_id, product="chats", attempts=exc.attempts
                    )
        raise
    record = _Recorder(sessions, user_id, chat_id, opened, started, after_reply, clock)
    return Reply(chat_id, created, opened.provider, opened.model, record.events(created))


def _store_message(
    connection: Connection,
    *,
    message: ChatMessage,
    user_id: uuid.UUID,
    created: bool,
    title: str | None,
    attached: Sequence[tuple[uuid.UUID, int]],
    policy: quotas.QuotaPolicy | None,
) -> uuid.UUID:
    """The user's message, charged one unit, in one transaction (an `AppSessions.write` job: on
    SQLite one trip to the writer thread, batched with other writes, instead of a trip per
    statement); its id. `created`: the chat is created with the message, named `title`;
    otherwise a `title` names a chat created empty (the original client creates it first), unless
    someone named it meanwhile. `attached`: the checked files (id, size).

    A retry is not a second message: when the chat ends with the same message, unanswered (the
    provider failed, or the client left, before the reply's first output), that message is
    answered now, charged again (the failed attempt gave its unit back)."""
    now = message.created_at
    if created:
        values = {"user_id": user_id, "title": title, "created_at": now, "updated_at": now}
        connection.execute(insert(Chat).values(id=message.chat_id, **values))
    elif title is not None:
        connection.execute(
            update(Chat).where(Chat.id == message.chat_id, Chat.title.is_(None)).values(title=title)
        )
    quotas.take(connection, user_id=user_id, product="chats", policy=policy, now=now)
    if not created and (unanswered := _unanswered(connection, message, attached)) is not None:
        connection.execute(update(Chat).where(Chat.id == message.chat_id).values(updated_at=now))
        return unanswered
    connection.execute(
        insert(ChatMessage).values(
            id=message.id,
            chat_id=message.chat_id,
            role=message.role,
            content=message.content,
            created_at=now,
        )
    )
    for position, (file_id, size) in enumerate(attached):
        link = {"message_id": message.id, "position": position, "file_id": file_id}
        connection.execute(insert(ChatMessageFile).values(link))
        connection.execute(
            update(StoredFile)
            .where(StoredFile.id == file_id)
            .values(
                size=size, checked_at=now, attached_at=func.coalesce(StoredFile.attached_at, now)
            )
        )
    if not created:
        connection.execute(update(Chat).where(Chat.id == message.chat_id).values(updated_at=now))
    return message.id


def _unanswered(
    connection: Connection, message: ChatMessage, attached: Sequence[tuple[uuid.UUID, int]]
) -> uuid.UUID | None:
    """The id of the chat's last message if it is `message` again (same text, same files) and
    has no reply."""
    last = connection.execute(
        select(ChatMessage.id, ChatMessage.role, ChatMessage.content)
        .where(ChatMessage.chat_id == message.chat_id)
        .order_by(ChatMessage.created_at.desc(), ChatMessage.id.desc())
        .limit(1)
    ).first()
    if last is None or last.role != "user" or last.content != message.content:
        return None
    files = connection.scalars(
        select(ChatMessageFile.file_id)
        .where(ChatMessageFile.message_id == last.id)
        .order_by(ChatMessageFile.position)
    ).all()
    return last.id if list(files) == [file_id for file_id, _ in attached] else None


def _store_reply(
    connection: Connection,
    *,
    reply: dict[str, Any] | None,
    refund: bool,
    user_id: uuid.UUID,
    usage_rows: list[dict[str, Any]],
    chat_id: uuid.UUID,
    now: datetime,
) -> None:
    """The model's reply (None: nothing came) with its usage rows, in one transaction (an
    `AppSessions.write` job); `refund`: the user gets the unit back (nothing came, or the
    provider failed), as for ideas."""
    if reply is not None:
        connection.execute(insert(ChatMessage).values(reply))
    if refund:
        quotas.give_back(connection, user_id=user_id, product="chats")
    insert_usage(connection, usage_rows)
    connection.execute(update(Chat).where(Chat.id == chat_id).values(updated_at=now))


def _check_accepted(provider: TextProvider, stored: Sequence[StoredFile]) -> None:
    for item in stored:
        if not provider.accepts(item.content_type):
            raise MediaNotAccepted(
                f"The chat model ({provider.name}) cannot read {item.content_type} files"
            )


async def _request(
    sessions: async_sessionmaker[AsyncSession],
    storage: Storage,
    provider: TextProvider,
    chat_id: uuid.UUID,
    new: ChatMessage,
    attached: Sequence[_Attached],
    search: bool,
    options: ChatOptions,
    created: bool,
) -> TextRequest:
    """The model's request: the chat's summary, the stored turns that fit, the new message. A
    chat this request created has nothing before its new message, so nothing is read."""
    summary: str | None = None
    history: list[ChatMessage] = []
    earlier: dict[uuid.UUID, list[StoredFile]] = {}
    if not created:
        async with sessions() as session:
            chat = await session.get(Chat, chat_id, populate_existing=True)
            assert chat is not None
            summary = chat.summary
            history = await _history(session, chat, before=new)
            earlier = await attachments_of(session, [m.id for m in history])
    include_media = context.refers_to_media(new.content)
    turns: list[context.Turn] = []
    last_with_media = next((m.id for m in reversed(history) if earlier.get(m.id)), None)
    for item in history:
        media: tuple[Part, ...] = ()
        stored = earlier.get(item.id, [])
        if include_media and item.id == last_with_media:
            parts = [await _part(provider, storage, f, None, options, sessions) for f in stored]
            media = tuple(part for part in parts if part is not None)
        turns.append(
            context.Turn(
                item.role,
                item.content,
                media,
                tuple(f.filename for f in stored),
                sum(context.estimate_media_tokens(f.content_type) for f in stored),
            )
        )
    checked = [await _part(provider, storage, a.file, a.data, options, sessions) for a in attached]
    new_parts = tuple(part for part in checked if part is not None)  # its bytes were just checked
    new_turn = context.Turn(
        "user",
        new.content,
        new_parts,
        tuple(a.file.filename for a in attached),
        sum(context.estimate_media_tokens(a.file.content_type) for a in attached),
    )
    messages = context.window(
        turns, new_turn, budget=options.context_tokens, include_media=include_media
    )
    return TextRequest(
        messages=messages,
        system=context.system_prompt(options.system_prompt, summary),
        grounding=search,
    )


async def _history(session: AsyncSession, chat: Chat, *, before: ChatMessage) -> list[ChatMessage]:
    """The chat's messages not yet folded into its summary, oldest first, without `before`."""
    query = select(ChatMessage).where(ChatMessage.chat_id == chat.id, ChatMessage.id != before.id)
    if chat.summary_until is not None:
        query = query.where(ChatMessage.created_at > chat.summary_until)
    query = query.order_by(ChatMessage.created_at, ChatMessage.id)
    return list((await session.scalars(query)).all())


async def _part(
    provider: TextProvider,
    storage: Storage,
    stored: StoredFile,
    data: bytes | None,
    options: ChatOptions,
    sessions: async_sessionmaker[AsyncSession],
) -> Part | None:
    """A file as the provider takes it: inline bytes, or (large files, where the provider has a
    file API) a reference to the provider's own copy, uploaded once and reused until it
    expires. None: an earlier message's file whose bytes changed since they were checked."""
    size = len(data) if data is not None else (stored.size or 0)
    upload = getattr(provider, "upload_file", None)
    if upload is not None and size > options.inline_max_bytes:
        fresh_until = utcnow() + PROVIDER_COPY_MARGIN
        if (
            stored.provider_uri
            and stored.provider_uri_expires_at is not None
            and stored.provider_uri_expires_at > fresh_until
        ):
            return FileRefPart(stored.provider_uri, stored.content_type)
        if data is None and (data := await _still_as_checked(storage, stored)) is None:
            return None
        part: FileRefPart = await upload(data, stored.content_type, display_name=stored.filename)
        expires_at = getattr(part, "expires_at", None)
        async with sessions.begin() as session:
            await session.execute(
                update(StoredFile)
                .where(StoredFile.id == stored.id)
                .values(provider_uri=part.uri, provider_uri_expires_at=expires_at)
            )
        return part
    if data is None and (data := await _still_as_checked(storage, stored)) is None:
        return None
    return MediaPart(data, stored.content_type)


async def _still_as_checked(storage: Storage, stored: StoredFile) -> bytes | None:
    """An earlier message's file, read again: None (and a warning) if its bytes are no longer
    the ones checked when it was sent, so the chat goes on without it."""
    data = (await storage.get(stored.key)).data
    if files.still_as_checked(stored, data):
        return data
    logger.warning(
        "a chat file changed after it was checked; left out", extra={"file": str(stored.id)}
    )
    return None


NOT_STORED = "The reply could not be stored, so the chat does not keep it; please send again"


@dataclass
class _Recorder:
    """Relays the model's events and stores the reply when the stream ends, however it ends."""

    sessions: AppSessions
    user_id: uuid.UUID
    chat_id: uuid.UUID
    opened: OpenedStream
    started: float
    after_reply: Callable[[uuid.UUID], None] | None
    clock: Callable[[], datetime]
    text: list[str] = field(default_factory=list)
    citations: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage | None = None

    async def events(self, created: bool) -> AsyncIterator[StreamEvent]:
        if created:
            yield StreamEvent("meta", {"chat_id": str(self.chat_id)})
        error: ProviderError | None = None
        finished = False
        finish_reason: str | None = None
        stopped: StopReason | None = None
        try:
            async for event in self.opened:
                if isinstance(event, TextDelta):
                    self.text.append(event.text)
                    yield StreamEvent.delta(event.text)
                elif isinstance(event, Citation):
                    self.citations.append({"url": event.url, "title": event.title})
                elif isinstance(event, Usage):
                    self.usage = event
                elif isinstance(event, Finish):
                    finish_reason = event.reason
            finished = True
            text = "".join(self.text)
            error = unusable_answer(text, finish_reason, provider=self.opened.provider)
        except ProviderError as exc:
            error = exc
        except BaseException as exc:
            stopped = stop_reason(exc)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                await self.opened.aclose()  # a client that left stops the spend
                stored, message_id = await self._save(finished, error, stopped)
        if error is not None:
            yield StreamEvent(
                "error",
                {"code": error.code, "message": error.message, "retryable": error.retryable},
            )
            return
        if not stored:  # the reply is not kept: the client must not take it for one that is
            yield StreamEvent(
                "error", {"code": "not_stored", "message": NOT_STORED, "retryable": True}
            )
            return
        yield StreamEvent(
            "done",
            {
                "chat_id": str(self.chat_id),
                "message_id": str(message_id) if message_id else None,
                "usage": {
                    "input_tokens": self.usage.input_tokens if self.usage else None,
                    "output_tokens": self.usage.output_tokens if self.usage else None,
                },
                "citations": self.citations,
            },
        )

    async def _save(
        self, finished: bool, error: ProviderError | None, stopped: StopReason | None
    ) -> tuple[bool, uuid.UUID | None]:
        """Whether the reply and its usage were stored; the reply's id if there is one."""
        text = "".join(self.text)
        latency_ms = round((time.perf_counter() - self.started) * 1000)
        message_id: uuid.UUID | None = None
        now = self.clock()
        usage = self.usage
        reply: dict[str, Any] | None = None
        complete = finished and error is None
        if text.strip() or complete:
            message_id = uuid.uuid4()
            reply = {
                "id": message_id,
                "created_at": now,
                "chat_id": self.chat_id,
                "role": "assistant",
                "content": text,
                "status": "complete" if complete else "incomplete",
                "provider": self.opened.provider,
                "model": self.opened.model,
                "input_tokens": usage.input_tokens if usage else None,
                "output_tokens": usage.output_tokens if usage else None,
                "citations": self.citations or None,
                "error": error.code if error else stopped,
            }
        rows = failed_attempt_rows(
            user_id=self.user_id, product="chats", attempts=self.opened.failed
        )
        rows.append(
            usage_row(
                user_id=self.user_id,
                product="chats",
                provider=self.opened.provider,
                model=self.opened.model,
                latency_ms=latency_ms,
                outcome="failed" if error else "cancelled" if stopped else "succeeded",
                input_tokens=usage.input_tokens if usage else None,
                output_tokens=usage.output_tokens if usage else None,
                error=error.code if error else None,
            )
        )
        try:
            await self.sessions.write(
                functools.partial(
                    _store_reply,
                    reply=reply,
                    refund=reply is None or error is not None or stopped == "interrupted",
                    user_id=self.user_id,
                    usage_rows=rows,
                    chat_id=self.chat_id,
                    now=now,
                )
            )
        except Exception:
            logger.exception("could not store a chat reply", extra={"chat_id": str(self.chat_id)})
            return False, None
        if complete and self.after_reply is not None:
            self.after_reply(self.chat_id)
        return True, message_id


# --- the rolling summary --------------------------------------------------------------------------


async def summarize_if_due(
    sessions: async_sessionmaker[AsyncSession],
    *,
    chain: ModelChain,
    chat_id: uuid.UUID,
    options: ChatOptions,
) -> bool:
    """Fold the older turns of a chat that outgrew its window into its rolling summary, keeping
    the last few verbatim. Whether it did."""
    async with sessions() as session:
        chat = await session.get(Chat, chat_id)
        if chat is None:
            return False
        query = select(ChatMessage).where(ChatMessage.chat_id == chat_id)
        if chat.summary_until is not None:
            query = query.where(ChatMessage.created_at > chat.summary_until)
        history = list((await session.scalars(query.order_by(ChatMessage.created_at))).all())
        names = await attachments_of(session, [m.id for m in history])
    turns = [
        context.Turn(
            m.role,
            m.content,
            (),
            tuple(f.filename for f in names.get(m.id, [])),
            sum(context.estimate_media_tokens(f.content_type) for f in names.get(m.id, [])),
        )
        for m in history
    ]
    if not context.needs_summary(
        turns, after_tokens=options.summary_after_tokens, min_messages=options.summary_min_messages
    ):
        return False
    cut = len(history) - options.keep_recent_messages
    while 0 < cut < len(history) and history[cut].role != "user":
        # The kept turns must start with a question: an answer kept without its question would
        # be dropped from the window, and seen nowhere. Its question's pair is folded too.
        cut += 1
    fold = history[:cut]
    if not fold:
        return False
    text = context.summary_request_text(chat.summary, turns[: len(fold)])
    request = TextRequest(
        messages=(Message.user(text),),
        system=context.SUMMARY_INSTRUCTION.format(tokens=options.summary_tokens),
        max_output_tokens=options.summary_tokens * 2,
    )
    started = time.perf_counter()
    opened = await chain.open_stream(request)
    parts: list[str] = []
    usage: Usage | None = None
    try:
        async for event in opened:
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, Usage):
                usage = event
    finally:
        await opened.aclose()
    summary = "".join(parts).strip()
    if not summary:
        return False
    async with sessions.begin() as session:
        changed = await session.execute(
            update(Chat)
            .where(Chat.id == chat_id, _same(Chat.summary_until, chat.summary_until))
            .values(summary=summary, summary_until=fold[-1].created_at)
        )
        record_usage(
            session,
            user_id=chat.user_id,
            product="chats",
            provider=opened.provider,
            model=opened.model,
            latency_ms=round((time.perf_counter() - started) * 1000),
            outcome="succeeded",
            input_tokens=usage.input_tokens if usage else None,
            output_tokens=usage.output_tokens if usage else None,
            error="summary",
        )
    return bool(getattr(changed, "rowcount", 0))


def _same(column: Any, value: datetime | None) -> Any:
    return column.is_(None) if value is None else column == value


class Summaries:
    """Summaries run after a reply, in the background (the reply's stream does not wait)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("chat summary failed: %s", type(task.exception()).__name__)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
