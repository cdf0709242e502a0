from __future__ import annotations

import uuid

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from aihub.core.db import Base, IdMixin, TimestampMixin


class Challenge(IdMixin, TimestampMixin, Base):
    """A multiple-choice coding question; only ever stored once it passed every check."""

    __tablename__ = "challenge"
    __table_args__ = (Index("ix_challenge_user_id_created_at", "user_id", "created_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    difficulty: Mapped[str] = mapped_column(String(10))
    title: Mapped[str] = mapped_column(Text)
    options: Mapped[list[str]] = mapped_column(JSON)
    correct_answer_id: Mapped[int]
    explanation: Mapped[str] = mapped_column(Text)
    is_fallback: Mapped[bool] = mapped_column(default=False)
    """The built-in question, served when the model's answers failed the checks (not charged)."""
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
