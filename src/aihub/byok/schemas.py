"""The original frontend's body. Nothing is stripped or truncated: what does not fit is a 422
naming the field, and the key is a `SecretStr` (its repr is masked; no error repeats it)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from aihub.core.text import Text

_KEY = re.compile(r"sk-[A-Za-z0-9_-]{16,256}")


class HistoryItem(BaseModel):
    """An earlier message as the client keeps it (`id`, `timestamp` and other keys ignored)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["user", "ai", "assistant"]
    content: Text | None = Field(default="")
    """No length of its own: the client sends back every reply it was given, however long, and
    never trims the history (a limit here would refuse every later message of that chat); the
    request's size limit bounds it."""


class ChatRequest(BaseModel):
    developer_message: Text = Field(
        default="", description="Sent to the model as the system message"
    )
    user_message: Text = Field(description="The new message")
    chat_history: list[HistoryItem] = Field(
        default_factory=list,
        max_length=10_000,
        description="Earlier messages, oldest first; only the most recent `BYOK_MAX_HISTORY` "
        "non-empty ones are sent",
    )
    model: Text | None = Field(default=None, description="One of `BYOK_ALLOWED_MODELS`")
    api_key: SecretStr = Field(description="The caller's own OpenAI API key (never stored)")

    @field_validator("api_key")
    @classmethod
    def _looks_like_a_key(cls, value: SecretStr) -> SecretStr:
        if not _KEY.fullmatch(value.get_secret_value()):
            raise ValueError("must be an OpenAI API key (sk-...)")
        return value

    @field_validator("user_message")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value
