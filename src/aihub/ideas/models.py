from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from aihub.core.db import Base, IdMixin, TimestampMixin


class Idea(IdMixin, TimestampMixin, Base):
    """A generated business idea; `status` is "complete" or "incomplete" (cut short)."""

    __tablename__ = "idea"
    __table_args__ = (Index("ix_idea_user_id_created_at", "user_id", "created_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    content: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int | None]
    output_tokens: Mapped[int | None]
    finish_reason: Mapped[str | None] = mapped_column(String(40))
    error: Mapped[str | None] = mapped_column(String(80))
    """Why an incomplete idea stopped: the provider's error code, or a `core.sse.stop_reason`
    ("client_disconnected", "interrupted" when the server stopped, "internal_error")."""
    completed_at: Mapped[datetime]
