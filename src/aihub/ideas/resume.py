"""Ideas a reconnecting client picks up where it was, instead of being charged for a new one.

The original client (fetch-event-source) drops its request whenever its tab is hidden and sends
it again when the tab is shown, with the last event id it saw as `Last-Event-ID`; it appends
whatever comes to the idea it already shows. Every event with text therefore carries
`<idea id>:<characters the client has>`, and a request that sends one back gets the rest of that
idea: from the stream still writing it (which goes on for `IDEAS_RESUME_SECONDS` after its client
left, waiting for this), or from the stored idea. Either way nothing is charged and the provider
is not called again. Ideas being written are known to this process only: a client sent to
another instance is answered from the database, once the idea is stored there.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from aihub.core.sse import StreamEvent


def parse_last_event_id(value: str | None) -> tuple[uuid.UUID, int] | None:
    """`(idea id, characters the client has)` from a `Last-Event-ID` this API sent; None for
    anything else."""
    if not value or len(value) > 60:
        return None
    idea, _, count = value.partition(":")
    try:
        position = int(count)
        return (uuid.UUID(idea), position) if position >= 0 and count.isdigit() else None
    except ValueError:
        return None


@dataclass(eq=False)
class LiveIdea:
    """An idea being written, shared by the stream writing it and any that follow it."""

    id: uuid.UUID
    user_id: uuid.UUID
    label: str
    """`provider:model`."""
    parts: list[str] = field(default_factory=list)
    """The text so far, as the provider's deltas (the writing stream's own list)."""
    resumed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a request follows this idea: its first stream then writes it to the end."""
    ending: list[StreamEvent] = field(default_factory=list)
    """The events after the text (`usage` and `done`, or `error`), once there are any."""
    ended: bool = False
    _grown: asyncio.Event = field(default_factory=asyncio.Event)
    _followers: int = 0

    def grew(self) -> None:
        """More text, or the end: wake the followers (nothing to do when there are none)."""
        if self._followers:
            grown, self._grown = self._grown, asyncio.Event()
            grown.set()

    def end(self, events: list[StreamEvent]) -> None:
        self.ending, self.ended = events, True
        self._grown.set()  # for good: a follower that comes later finds `ended`

    async def follow(
        self, position: int, *, measure: Callable[[str], str] = str
    ) -> AsyncIterator[StreamEvent]:
        """The text after its first `position` characters, as it comes, then the ending;
        `measure` gives each delta as the client counted it (the Markdown framing counts its
        line breaks normalised)."""
        self.resumed.set()
        self._followers += 1
        taken, length = 0, 0  # the parts read so far, and their length as the client counts it
        try:
            while True:
                grown = self._grown
                new = "".join(measure(part) for part in self.parts[taken:])
                taken, length = len(self.parts), length + len(new)
                if length > position:
                    fresh = new[max(position - (length - len(new)), 0) :]
                    yield StreamEvent.delta(fresh, id=f"{self.id}:{length}")
                    position = length
                if self.ended:
                    for event in self.ending:
                        yield event
                    return
                await grown.wait()
        finally:
            self._followers -= 1


class LiveIdeas:
    """The ideas this process is writing, by id."""

    def __init__(self) -> None:
        self._ideas: dict[uuid.UUID, LiveIdea] = {}

    def add(self, idea: LiveIdea) -> None:
        self._ideas[idea.id] = idea

    def remove(self, idea: LiveIdea) -> None:
        self._ideas.pop(idea.id, None)

    def get(self, idea_id: uuid.UUID, *, user_id: uuid.UUID) -> LiveIdea | None:
        idea = self._ideas.get(idea_id)
        return idea if idea is not None and idea.user_id == user_id else None
