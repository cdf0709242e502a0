"""How the original browser clients read streams, re-implemented to test against.

`fetch_event_source_messages` follows @microsoft/fetch-event-source's parse.ts: lines end at
`\\r`, `\\n` or `\\r\\n`; one space after the colon is dropped; data lines join with `\\n` except
that an event's leading empty data lines are dropped (`data = data ? data + "\\n" + value :
value`); comments and lines without a colon are ignored; a blank line dispatches the event.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx


@dataclass
class Message:
    event: str = ""
    data: str = ""
    id: str = ""


def fetch_event_source_messages(raw: str) -> list[Message]:
    messages: list[Message] = []
    current = Message()
    for line in re.split(r"\r\n|\r|\n", raw):
        if line == "":
            messages.append(current)
            current = Message()
            continue
        field, colon, value = line.partition(":")
        if not colon or not field:
            continue
        value = value.removeprefix(" ")
        if field == "data":
            current.data = f"{current.data}\n{value}" if current.data else value
        elif field == "event":
            current.event = value
        elif field == "id":
            current.id = value
    # The stream's closing yields nothing for an unterminated event (parse.ts dispatches only
    # on a blank line), and the blank line after the last event adds one empty message.
    return [m for m in messages if m.data or m.event or m.id]


def markdown_buffer(raw: str) -> str:
    """What the ideas frontend renders: every message's data appended, whatever its name."""
    return "".join(m.data for m in fetch_event_source_messages(raw))


@dataclass
class NamedEvent:
    event: str
    data: object
    id: str | None


def event_source_events(raw: str) -> list[NamedEvent]:
    """Standard EventSource parsing of JSON-data events (data lines joined with `\\n`)."""
    parser = EventSourceParser()
    return [e for line in re.split(r"\r\n|\r|\n", raw) if (e := parser.feed(line)) is not None]


async def aiter_event_source(response: httpx.Response) -> AsyncIterator[NamedEvent]:
    """`event_source_events` as the bytes arrive: each event as soon as its blank line does."""
    parser = EventSourceParser()
    async for line in response.aiter_lines():
        event = parser.feed(line)
        if event is not None:
            yield event


class EventSourceParser:
    """EventSource's line parsing: a blank line dispatches the event (if it has data); `id` is
    the event's own (None when it sent none)."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> NamedEvent | None:
        if line == "":
            event = None
            if self._data:
                event = NamedEvent(self._name, json.loads("\n".join(self._data)), self._id)
            self._name, self._data, self._id = "message", [], None
            return event
        field, colon, value = line.partition(":")
        if not colon or not field:
            return None
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._name = value
        elif field == "id":
            self._id = value
        return None
