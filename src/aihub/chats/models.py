from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from aihub.core.db import Base, IdMixin, TimestampMixin, utcnow


class Chat(IdMixin, TimestampMixin, Base):
    __tablename__ = "chat"
    __table_args__ = (Index("ix_chat_user_id_updated_at", "user_id", "updated_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    """Last activity: the list is ordered by it."""
    summary: Mapped[str | None] = mapped_column(Text)
    """A rolling summary of the turns before `summary_until`, which the model sees instead."""
    summary_until: Mapped[datetime | None]


class ChatMessage(IdMixin, TimestampMixin, Base):
    __tablename__ = "chat_message"
    __table_args__ = (Index("ix_chat_message_chat_id_created_at", "chat_id", "created_at"),)

    chat_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chat.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    """user | assistant."""
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), default="complete")
    """complete | incomplete (the client left, or the provider failed, mid-reply)."""
    provider: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(200))
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    citations: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)


class ChatMessageFile(Base):
    """A file attached to a message, in order."""

    __tablename__ = "chat_message_file"

    message_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("chat_message.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    file_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("stored_file.id", ondelete="CASCADE"), index=True
    )
