"""The streaming core: one internal event model, one encoder per wire format.

The five original frontends parse five different things, so a product produces `StreamEvent`s and
picks the encoder its client understands:

- `MarkdownEventEncoder`: the business-ideas client (fetch-event-source appending every event's
  data to a Markdown buffer);
- `JSONEventEncoder`: named SSE events with JSON data (`delta`, `progress`, `usage`, `done`,
  `error`), with ids;
- `NDJSONEncoder`: one ASCII JSON object per line (the chats client);
- `TextEncoder`: the bare text (the bring-your-own-key client).

`stream_response` sends any of them with the headers every stream needs, keep-alives where the
client tolerates them, and a disconnect watcher that cancels the producer (closing the upstream
request) the moment the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Send

from aihub.core import metrics
from aihub.core.errors import AppError

T = TypeVar("T")

STREAM_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}

EventKind = Literal["delta", "progress", "usage", "done", "error", "meta"]


@dataclass(frozen=True, slots=True)
class StreamEvent:
    kind: EventKind
    data: Any = None
    """`str` for a delta; a JSON-able dict for every other kind."""
    id: str | None = None

    @classmethod
    def delta(cls, text: str, *, id: str | None = None) -> StreamEvent:
        return cls("delta", text, id)

    @classmethod
    def error(cls, code: str, message: str, **extra: Any) -> StreamEvent:
        return cls("error", {"code": code, "message": message, **extra})


class Encoder(Protocol):
    media_type: str

    def encode(self, event: StreamEvent) -> bytes: ...

    def keepalive(self) -> bytes | None:
        """Bytes the client ignores, sent after a silence; None where the client has none."""


# --- business ideas: Markdown over SSE -----------------------------------------------------


@dataclass
class MarkdownEventEncoder:
    """Markdown as SSE data lines that survive fetch-event-source byte for byte.

    The client appends each event's data to its buffer. An event's data is its data lines joined
    by `\\n`, except that leading empty lines are dropped, so no event may *start* with a newline.
    The encoder therefore holds back the last visible character of each delta (and any newlines
    after it) and sends it at the head of the next event, so the concatenation is exactly the
    model's text. The cost: that character reaches the client one delta later. The exceptions:
    newlines before the first visible character of the whole text cannot be represented (they
    do not change the rendered Markdown), and line breaks are normalised to `\\n` (a `\\r`
    would end an SSE line).
    """

    media_type: str = "text/event-stream"
    _held: str = ""

    def encode(self, event: StreamEvent) -> bytes:
        if event.kind == "delta":
            return self._frame(str(event.data))
        if event.kind == "usage":
            return self._flush()  # the text is complete: nothing is left to hold back for
        if event.kind == "done":
            return self._flush() + b"event: done\ndata:\n\n"
        if event.kind == "error":
            message = str(event.data.get("message", "The stream failed"))
            text = ("\n\n" if self._held else "") + f"**Error:** {message}\n"
            self._held += _normalise(text)
            return self._flush(event="error")
        return b""

    def keepalive(self) -> bytes | None:
        return b": keep-alive\n\n"

    def _frame(self, text: str) -> bytes:
        pending = self._held + _normalise(text)
        cut = len(pending.rstrip("\n")) - 1
        if cut <= 0:
            self._held = pending
            return b""
        self._held = pending[cut:]
        return _markdown_event(pending[:cut])

    def _flush(self, event: str | None = None) -> bytes:
        held, self._held = self._held, ""
        if not held:
            return b""
        return _markdown_event(held, event)


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _markdown_event(text: str, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "".join(f"data: {line}\n" for line in text.split("\n")) + "\n").encode()


def markdown_error_body(message: str) -> bytes:
    return _markdown_event(f"**Error:** {message}", "error")


# --- named JSON events -----------------------------------------------------------------------


@dataclass
class JSONEventEncoder:
    """`event: <kind>` / `id: <id>` / `data: <json>`; a delta's data is `{"text": ...}`."""

    media_type: str = "text/event-stream"
    event_names: Mapping[str, str] = field(default_factory=dict)
    keepalive_event: str | None = None
    """Send keep-alives as this named event (`data: {}`) instead of an SSE comment."""

    def encode(self, event: StreamEvent) -> bytes:
        data = {"text": event.data} if event.kind == "delta" else event.data
        name = self.event_names.get(event.kind, event.kind)
        head = f"event: {name}\n" + (f"id: {event.id}\n" if event.id is not None else "")
        return head.encode() + b"data: " + orjson.dumps(data) + b"\n\n"

    def keepalive(self) -> bytes | None:
        if self.keepalive_event:
            return f"event: {self.keepalive_event}\ndata: {{}}\n\n".encode()
        return b": keep-alive\n\n"


# --- NDJSON and plain text -------------------------------------------------------------------


@dataclass
class NDJSONEncoder:
    """One ASCII JSON object per `\\n`-terminated line; `map_event` decides each line."""

    map_event: Callable[[StreamEvent], dict[str, Any] | None]
    media_type: str = "application/x-ndjson"

    def encode(self, event: StreamEvent) -> bytes:
        obj = self.map_event(event)
        if obj is None:
            return b""
        return (json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n").encode()

    def keepalive(self) -> bytes | None:
        return None


@dataclass
class TextEncoder:
    """The text itself; an error appends one readable line, so a cut answer never looks whole."""

    media_type: str = "text/plain; charset=utf-8"

    def encode(self, event: StreamEvent) -> bytes:
        if event.kind == "delta":
            return str(event.data).encode()
        if event.kind == "error":
            message = event.data.get("message", "The stream failed")
            return f"\n\n[The reply was cut short: {message}]\n".encode()
        return b""

    def keepalive(self) -> bytes | None:
        return None


# --- the response ------------------------------------------------------------------------------


class ClientDisconnected(AppError):
    """The client left before the stream began (nginx's 499: nobody reads this answer)."""

    status_code = 499
    code = "client_disconnected"
    default_message = "The client closed the request"


async def unless_disconnected(request: Request, opening: Awaitable[T]) -> T:
    """Await `opening` (a provider's first output), cancelling it if the client leaves first.

    Before the first byte nothing else watches the connection, and with slow-thinking models
    most of a request's cost is spent before it: a client that goes away must stop it.
    `opening` runs in the caller's own task (under load every hop to another task costs a whole
    turn of a busy event loop); a watcher task cancels it when the client disconnects.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await opening
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientDisconnected() from None
        raise
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def stream_response(
    events: AsyncIterable[StreamEvent],
    encoder: Encoder,
    *,
    product: str,
    provider: str | None = None,
    started_at: float | None = None,
    keepalive_seconds: float = 15.0,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """Stream `events` through `encoder`.

    A client that goes away cancels the producer at its current `await`: its `finally` and
    `except` blocks run (shield any database work there with `anyio.CancelScope(shield=True)`).
    """
    keepalive = encoder.keepalive()
    body = _encoded(events, encoder, product, provider, started_at or time.perf_counter())
    return _EventStream(
        body,
        headers={**STREAM_HEADERS, **(headers or {})},
        media_type=encoder.media_type,
        ping=keepalive_seconds if keepalive is not None else 0,
        ping_message_factory=(lambda: _Raw(keepalive)) if keepalive is not None else None,
        sep="\n",
    )


class _EventStream(EventSourceResponse):
    """sse-starlette's response without a cancel scope around every send.

    It opens an anyio `move_on_after` scope per message even with no send timeout; at a few
    hundred concurrent streams that was a quarter of the process's CPU (bench/stream_overhead.py).
    A client that stops reading is still noticed: the disconnect listener cancels the stream.
    """

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


class _Raw(ServerSentEvent):
    """A keep-alive whose bytes are given as they are."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self._raw = raw

    def encode(self) -> bytes:
        return self._raw


async def _encoded(
    events: AsyncIterable[StreamEvent],
    encoder: Encoder,
    product: str,
    provider: str | None,
    started_at: float,
) -> AsyncIterator[bytes]:
    gauge = metrics.active_streams.labels(product)
    gauge.inc()
    first = True
    try:
        async for event in events:
            chunk = encoder.encode(event)
            if not chunk:
                continue
            if first and event.kind == "delta":
                first = False
                metrics.time_to_first_token.labels(product, provider or "unknown").observe(
                    time.perf_counter() - started_at
                )
            yield chunk
    finally:
        gauge.dec()
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
