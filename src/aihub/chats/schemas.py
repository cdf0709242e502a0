"""The original Raven frontend's shapes: camelCase, string ids, bare arrays."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from aihub.core.text import Text, plain_text

MAX_MESSAGE_CHARS = 100_000
"""The longest text part of a new chat message."""


class ChatRead(BaseModel):
    chatId: str
    userId: str
    title: str | None
    createdAt: str
    updatedAt: str


class ChatCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    user_id: str | None = Field(default=None, description="Ignored: the token decides the owner")
    title: Text | None = Field(default=None, max_length=200)


class ChatCreated(BaseModel):
    chat_id: str
    title: str | None


class ChatRename(BaseModel):
    title: Text = Field(min_length=1, max_length=200)

    @field_validator("title")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value.strip()


class ChatChanged(BaseModel):
    message: str
    chat_id: str
    title: str | None = None


class AttachmentRead(BaseModel):
    file_id: str
    filename: str
    media_type: str
    media_url: str


class MessageRead(BaseModel):
    messageId: str
    role: Literal["user", "assistant"]
    content: str
    media_url: str | None
    media_type: str | None
    status: str
    createdAt: str
    attachments: list[AttachmentRead]
    citations: list[dict[str, str | None]] | None = None


class IncomingPart(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    text: str = Field(default="")
    """Unbounded here: an earlier turn is the client's copy of a reply (however long the model
    made it), sent with every later message and never trimmed. The new message's text is
    bounded (`MAX_MESSAGE_CHARS`), the request by its size limit."""
    type: str | None = Field(default=None, max_length=100)
    mimeType: str | None = Field(
        default=None, max_length=100, validation_alias=AliasChoices("mimeType", "mime_type")
    )


class IncomingTurn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(max_length=20)
    parts: list[IncomingPart] = Field(default_factory=list, max_length=200)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    messages: list[IncomingTurn] = Field(min_length=1, max_length=10_000)
    chatId: str | None = Field(
        default=None, max_length=64, validation_alias=AliasChoices("chatId", "chat_id")
    )
    search: bool = Field(default=False, description="Ground the answer in Google Search (Gemini)")

    @model_validator(mode="after")
    def _new_message_fits(self) -> ChatRequest:
        """Only the last turn is read (the rest is the client's copy of the history), so only
        its text is checked."""
        for part in self.messages[-1].parts:
            if len(part.text) > MAX_MESSAGE_CHARS:
                raise ValueError(f"the new message is longer than {MAX_MESSAGE_CHARS} characters")
            plain_text(part.text)
        return self
