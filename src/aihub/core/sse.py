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
import contextlib
import json
import logging
import re
import time
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Mapping,
)
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, get_args

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from aihub.core import metrics
from aihub.core.errors import AppError
from aihub.core.middleware import SEND_BODY

T = TypeVar("T")

logger = logging.getLogger("aihub.streams")

STREAM_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}

EventKind = Literal["delta", "progress", "usage", "done", "error", "meta"]


@dataclass(slots=True)
class StreamEvent:
    """Not frozen (nothing changes one): one is built for every chunk of every stream, and a
    frozen dataclass costs three times as much to build."""

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
    """Markdown as SSE data lines that the original client renders byte for byte.

    The client appends each event's data to its buffer. An event's data is its data lines joined
    by `\\n`, except that leading empty lines are dropped, so no event may *start* with a newline
    (the model's `\\n\\n` before a heading is a token of its own). The encoder therefore holds
    back the last character of each delta (and any newlines after it) and sends it at the head
    of the next event: the concatenation is exactly the model's text, each character one delta
    late.

    Except the first: while nothing has been sent, a delta that is one character (the `#` of a
    heading) is sent whole, so that the first token is not a delta late. Should the next delta
    then start with a newline, that event starts with one space (`data:  ` then `data: ...`),
    which ends the first line with a space, as the original app's framing did before every line
    break; CommonMark ignores it (the character is never a space, tab or backslash, so it makes
    or undoes no hard line break). The other exceptions: newlines before the first character
    of the whole text are not sent (they do not change the rendered Markdown), and line breaks
    are normalised to `\\n` (a `\\r` would end an SSE line). `?format=json` carries the text
    exactly.

    The encoder follows fenced code blocks, so that a stream that fails inside one closes it
    before its error line, which then reads as text.

    With `ids`, every event with text ends with `id: <ids>:<n>`, `n` being how many characters
    of the (normalised) text the client then has: the client sends the last one back as
    `Last-Event-ID` when it reconnects, and `resuming(ids, text)` frames the rest from there.
    """

    media_type: str = "text/event-stream"
    ids: str | None = None
    _held: str = ""
    _padded: bool = False
    """Whether `_held` starts with a space of the encoder's own (see above), not the text's."""
    _seen: int = 0
    """Characters of the normalised text taken in so far."""
    _started: bool = False
    """Whether any text has been sent: a newline before it needs no line to end."""
    _line: str = ""
    """The start of the text's current line (enough to tell a code fence)."""
    _fence: str | None = None
    """The fence of the code block the text is in, if it is in one."""

    @classmethod
    def resuming(cls, ids: str, sent: str) -> MarkdownEventEncoder:
        """An encoder that goes on after `sent`, the normalised text a client already has."""
        encoder = cls(ids=ids, _seen=len(sent), _started=bool(sent.lstrip("\n")))
        encoder._follow(sent)
        return encoder

    @staticmethod
    def normalised(text: str) -> str:
        """`text` as the encoder counts it (line breaks as `\n`)."""
        return _normalise(text)

    def encode(self, event: StreamEvent) -> bytes:
        if event.kind == "delta":
            text = str(event.data)
            if self._started and "\n" not in text and "\r" not in text and "\n" not in self._held:
                return self._within_line(text)
            return self._frame(text)
        if event.kind == "usage":
            return self._frame("", hold=False)  # the text is complete
        if event.kind == "done":
            return self._frame("", hold=False) + b"event: done\ndata:\n\n"
        if event.kind == "error":
            message = str(event.data.get("message", "The stream failed"))
            lead = "\n\n" if self._started or self._held else ""
            if self._fence:  # close the code block, so that the error reads as text
                lead = ("\n" if self._line else "") + self._fence + "\n\n"
            return self._frame(f"{lead}**Error:** {message}\n", hold=False, event="error")
        return b""

    def keepalive(self) -> bytes | None:
        return b": keep-alive\n\n"

    def _within_line(self, text: str) -> bytes:
        """`_frame` for the usual delta: text within one line, after text already sent (what
        is held has no line break either). One data line: the held character and all of the
        text but its last character, which is held in turn."""
        if len(self._line) < _LINE_HEAD:
            self._line = (self._line + text)[:_LINE_HEAD]
        self._seen += len(text)
        pending = self._held + text
        self._held = pending[-1:]
        if len(pending) < 2:
            return b""
        if self.ids is None:
            return f"data: {pending[:-1]}\n\n".encode()
        return f"data: {pending[:-1]}\nid: {self.ids}:{self._seen - 1}\n\n".encode()

    def _frame(self, text: str, *, hold: bool = True, event: str | None = None) -> bytes:
        text = _normalise(text)
        self._follow(text)
        if event is None:
            self._seen += len(text)
        pending = self._held + text
        if not self._started:
            pending = pending.lstrip("\n")
        elif pending.startswith("\n"):  # only after a first character sent whole
            pending = " " + pending
            self._padded = True
        if not hold:
            cut = len(pending)
        else:
            cut = max(len(pending.rstrip("\n")) - 1, 0)
            if not self._started and len(pending) == 1 and pending not in _NOT_FIRST:
                cut = 1
        self._held = pending[cut:]
        if not cut:
            return b""
        self._padded = self._padded and not cut
        self._started = True
        if self.ids is None or event is not None:
            return _markdown_event(pending[:cut], event)
        delivered = self._seen - len(self._held) + self._padded
        return _markdown_event(pending[:cut], id=f"{self.ids}:{delivered}")

    def _follow(self, text: str) -> None:
        """Follow the text's lines in and out of fenced code blocks."""
        *ended, current = (self._line + text).split("\n")
        for line in ended:
            self._fence = _fence_after(line, self._fence)
        self._line = current[:_LINE_HEAD]


_NOT_FIRST = " \t\\"
"""What is never sent whole as the first character: a space after it would make (or, after a
backslash, undo) a hard line break."""

_LINE_HEAD = 80
_FENCE = re.compile(r"[ \t>]*(`{3,}|~{3,})(.*)")
"""A code fence, also in a list item or a block quote."""


def _fence_after(line: str, fence: str | None) -> str | None:
    """The code block's fence after `line`: opened, closed, or as it was."""
    if (match := _FENCE.match(line)) is None:
        return fence
    run, rest = match.groups()
    if fence is None:
        return None if run[0] == "`" and "`" in rest else run  # inline code, not a fence
    closes = run[0] == fence[0] and len(run) >= len(fence) and not rest.strip()
    return None if closes else fence


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _markdown_event(text: str, event: str | None = None, id: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    # The id after the data: fetch-event-source takes an id as soon as it reads the line, and
    # the text only at the blank line, so a connection cut in between must not count the text
    # as had.
    tail = f"id: {id}\n\n" if id else "\n"
    return (head + "".join(f"data: {line}\n" for line in text.split("\n")) + tail).encode()


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


CLIENT_LEFT = "aihub: the client left"
"""The message a stream's task is cancelled with when its client disconnects."""

INTERRUPTED = "The server stopped before the reply was complete; please try again"
BROKE = "Something went wrong on the server before the reply was complete; please try again"


StopReason = Literal["client_disconnected", "interrupted", "internal_error"]
STOP_REASONS: tuple[StopReason, ...] = get_args(StopReason)


def stop_reason(exc: BaseException) -> StopReason:
    """Why a stream stopped early, when the provider did not fail it: `client_disconnected` (the
    disconnect watchers cancel with `CLIENT_LEFT`; a response that could not be sent closes its
    stream), `interrupted` (cancelled by anyone else: the server is stopping), or
    `internal_error`."""
    if isinstance(exc, GeneratorExit):
        return "client_disconnected"
    if isinstance(exc, asyncio.CancelledError):
        return "client_disconnected" if CLIENT_LEFT in exc.args else "interrupted"
    return "internal_error"


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
        task.cancel(CLIENT_LEFT)

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


@dataclass(frozen=True)
class Linger:
    """How long a stream whose client left goes on, waiting for `resumed` (another request that
    follows it from where the client was) before it stops as if nobody ever would."""

    seconds: float
    resumed: asyncio.Event
    worth: Callable[[], bool] = lambda: True
    """Whether the client has anything to come back for (a stream that sent no text yet is
    asked for afresh, not resumed)."""


def stream_response(
    events: AsyncIterable[StreamEvent],
    encoder: Encoder,
    *,
    product: str,
    provider: str | None = None,
    started_at: float | None = None,
    keepalive_seconds: float = 15.0,
    headers: Mapping[str, str] | None = None,
    say_interrupted: bool = True,
    linger: Linger | None = None,
) -> Response:
    """Stream `events` through `encoder`.

    A client that goes away cancels the producer at its current `await`: its `finally` and
    `except` blocks run (shield any database work there with `anyio.CancelScope(shield=True)`),
    and `stop_reason` tells them why. So does a server that stops before the stream ends; the
    client is then sent an `error` event (unless not `say_interrupted`) and a clean end, since a
    stream that is just cut off looks complete to some clients (the ideas client's Markdown).
    With `linger`, a client that leaves stops the producer only if no other request resumes
    the stream within `linger.seconds`; once one has, the producer runs to its end.
    """
    return EventStream(
        events,
        encoder,
        headers={**STREAM_HEADERS, **(headers or {})},
        product=product,
        provider=provider or "unknown",
        started_at=started_at or time.perf_counter(),
        keepalive_seconds=keepalive_seconds,
        say_interrupted=say_interrupted,
        linger=linger,
    )


class EventStream(Response):
    """A stream of events, each encoded and sent the moment it is ready.

    The response starts, and its first delta goes out, from the request's own task; the rest
    from a task of its own. A task resumes its whole chain of awaits for every chunk it waits
    for, and a request's task runs through every middleware and routing layer (~20 frames)
    before it reaches the response: a task that starts here waits in a chain of a few frames, at
    a fraction of the cost per chunk. It starts after the first delta because a new task runs
    only at the event loop's next turn, and under load a turn is milliseconds of a stream's
    first token (`bench/stream_overhead.py`).

    One watcher task per stream listens for the client's disconnect (which cancels the producer
    at its current `await`, closing the upstream request) and sends the encoder's keep-alive
    after `keepalive_seconds` without a chunk. A generic SSE response (sse-starlette's) spawned
    four tasks per stream and wrapped every send, which at a few hundred concurrent streams cost
    milliseconds of every stream's first token.
    """

    def __init__(
        self,
        events: AsyncIterable[StreamEvent],
        encoder: Encoder,
        *,
        headers: Mapping[str, str],
        product: str,
        provider: str,
        started_at: float,
        keepalive_seconds: float,
        say_interrupted: bool = True,
        linger: Linger | None = None,
    ) -> None:
        self.status_code = 200
        self.media_type = encoder.media_type
        self.background = None
        self.init_headers(headers)
        self._events = aiter(events)
        self._encoder = encoder
        self._product = product
        self._provider = provider
        self._started_at = started_at
        self._linger = linger
        self._say_interrupted = say_interrupted
        """Whether a stream the server stops (not its client) says so before it ends."""
        keepalive = encoder.keepalive()
        self._keepalive = keepalive if keepalive_seconds > 0 else None
        self._keepalive_seconds = keepalive_seconds
        self._last_sent = 0.0
        self._started = False
        self._finished = False
        self._client_left = False
        self._sender: asyncio.Task[Any] | None = None
        """The task sending the events: the one a client that leaves cancels."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(self._watch(receive, send))
        gauge = metrics.active_streams.labels(self._product)
        gauge.inc()
        send_body = scope.get(SEND_BODY, send)
        self._sender = asyncio.current_task()
        try:
            if await self._send(send, send_body, first_delta_only=True):
                self._sender = loop.create_task(self._send(send, send_body))
                await self._sender
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._client_left and current is not None and not current.cancelling():
                return  # the client left as the sending task was about to start
            raise
        finally:
            self._finished = True
            gauge.dec()
            watcher.cancel()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _send(self, send: Send, send_body: Send, *, first_delta_only: bool = False) -> bool:
        """Send the events, up to the first delta with `first_delta_only`, else to the end;
        whether there are more to send."""
        task = asyncio.current_task()
        assert task is not None
        try:
            if not self._started:
                start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                await send(start)
                self._started = True
            encode, loop = self._encoder.encode, asyncio.get_running_loop()
            async for event in self._events:
                chunk = encode(event)
                if not chunk:
                    continue
                self._last_sent = loop.time()
                await send_body({"type": "http.response.body", "body": chunk, "more_body": True})
                if first_delta_only and event.kind == "delta":
                    metrics.time_to_first_token.labels(self._product, self._provider).observe(
                        time.perf_counter() - self._started_at
                    )
                    return True
            self._finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self._client_left:
                # The server is stopping (uvicorn cancels what outlives its graceful timeout):
                # end the reply visibly, then let the task end as if it had finished.
                if self._finished or not self._started:
                    raise
                await self._end_with(send, "interrupted", INTERRUPTED, say=self._say_interrupted)
            if task.uncancel() == 0:
                return False
            raise
        except OSError:
            return False  # the client's connection broke mid-send: it has left
        except Exception:
            if not self._started:
                raise  # the app's error handler answers it
            # A bug, or a database that went away: the client must not take it for a whole reply.
            logger.exception("a stream failed after its response began")
            await self._end_with(send, "internal_error", BROKE)
        return False

    async def _end_with(self, send: Send, code: str, message: str, *, say: bool = True) -> None:
        self._finished = True
        try:
            if say:
                last = self._encoder.encode(StreamEvent.error(code, message))
                await send({"type": "http.response.body", "body": last, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the client is gone too

    async def _watch(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        self._last_sent = loop.time()
        while True:
            if self._keepalive is None:
                message = await receive()
            else:
                wait = self._last_sent + self._keepalive_seconds - loop.time()
                try:
                    async with asyncio.timeout(max(wait, 0.001)):
                        message = await receive()
                except TimeoutError:
                    if loop.time() - self._last_sent >= self._keepalive_seconds * 0.999:
                        self._last_sent = loop.time()
                        if not self._finished:
                            await send(
                                {
                                    "type": "http.response.body",
                                    "body": self._keepalive,
                                    "more_body": True,
                                }
                            )
                    continue
            if message["type"] == "http.disconnect":
                if not self._finished:
                    self._client_left = True
                    if not await self._resumed() and self._sender is not None:
                        self._sender.cancel(CLIENT_LEFT)
                return

    async def _resumed(self) -> bool:
        """Whether, with a `Linger`, another request took the stream up in time (what the
        producer still sends here goes nowhere: the server drops it)."""
        if self._linger is None or not self._linger.worth():
            return False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._linger.seconds):
                await self._linger.resumed.wait()
        return self._linger.resumed.is_set() or self._finished
