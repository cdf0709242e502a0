"""What the model sees of a chat: the system prompt, a rolling summary of older turns, and a
token-aware window of the most recent ones.

Token counts are estimates (about four characters a token, fixed costs for media, as the original
app's fallbacks): the window only has to stay near its budget, and an estimate costs no call.
Media from earlier turns is sent again only when the new message refers to it ("that image",
"the previous file", a file name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from aihub.providers.base import Message, Part, Role, TextPart

CHARS_PER_TOKEN = 4
MEDIA_TOKENS = {"image": 258, "video": 2630, "audio": 960}
"""About 10 s of video at 263 tokens a second, 30 s of audio at 32 a second."""
DOCUMENT_TOKENS = 1000

_REFERS_TO_MEDIA = re.compile(
    r"\b(that|this|the|previous|last|earlier|above|same)\s+"
    r"(image|picture|photo|screenshot|file|document|pdf|video|clip|audio|recording|attachment)s?\b"
    r"|\.(png|jpe?g|gif|webp|pdf|mp4|mov|mp3|wav|txt|csv|md)\b",
    re.IGNORECASE,
)

SUMMARY_INSTRUCTION = (
    "Summarise the conversation below for your own later reference, in at most {tokens} tokens. "
    "Keep names, facts, decisions, open questions and the user's preferences; drop pleasantries."
)


def estimate_text_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def estimate_media_tokens(mime_type: str) -> int:
    return MEDIA_TOKENS.get(mime_type.split("/", 1)[0], DOCUMENT_TOKENS)


@dataclass(frozen=True, slots=True)
class Turn:
    """A stored message as the window sees it."""

    role: str
    text: str
    media: tuple[Part, ...] = ()
    media_names: tuple[str, ...] = ()
    media_tokens: int = 0

    @property
    def tokens(self) -> int:
        return estimate_text_tokens(self.text) + self.media_tokens


def refers_to_media(text: str) -> bool:
    return _REFERS_TO_MEDIA.search(text) is not None


def system_prompt(base: str, summary: str | None) -> str:
    if not summary:
        return base
    return f"{base}\n\nSummary of the earlier conversation:\n{summary}"


def window(
    history: Sequence[Turn], new: Turn, *, budget: int, include_media: bool
) -> tuple[Message, ...]:
    """The newest turns of `history` that fit in `budget` tokens with `new`, oldest first,
    then `new`. Earlier media goes along only when `include_media` (the new message refers to
    it); otherwise a turn's files are named in its text."""
    remaining = budget - new.tokens
    chosen: list[Message] = []
    media_left = include_media
    for turn in reversed(history):
        with_media = media_left and bool(turn.media)
        cost = turn.tokens if with_media else estimate_text_tokens(_described(turn))
        if cost > remaining and chosen:
            break
        remaining -= cost
        chosen.append(_message(turn, with_media=with_media))
        if with_media:
            media_left = False  # the most recent files only
    chosen.reverse()
    # A conversation must start with the user: a leading assistant turn (its question cut off
    # by the window) is dropped.
    while chosen and chosen[0].role == "assistant":
        chosen.pop(0)
    return (*chosen, _message(new, with_media=True))


def _described(turn: Turn) -> str:
    if not turn.media_names:
        return turn.text
    names = ", ".join(turn.media_names)
    return f"{turn.text}\n[attached: {names}]" if turn.text else f"[attached: {names}]"


def _message(turn: Turn, *, with_media: bool) -> Message:
    role: Role = "assistant" if turn.role == "assistant" else "user"
    text = turn.text if with_media else _described(turn)
    parts: list[Part] = [TextPart(text)] if text else []
    if with_media:
        parts.extend(turn.media)
    if not parts:
        parts = [TextPart("")]
    return Message(role, tuple(parts))


def needs_summary(history: Sequence[Turn], *, after_tokens: int, min_messages: int) -> bool:
    return len(history) >= min_messages and sum(t.tokens for t in history) > after_tokens


def summary_request_text(summary: str | None, turns: Sequence[Turn]) -> str:
    lines = []
    if summary:
        lines.append(f"Earlier summary:\n{summary}\n")
    for turn in turns:
        lines.append(f"{turn.role}: {_described(turn)}")
    return "\n".join(lines)
