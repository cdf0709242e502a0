from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from aihub.core.db import Base, IdMixin, TimestampMixin, utcnow


class Quota(Base):
    """A user's balance for one product; absent until first used (the policy says the start)."""

    __tablename__ = "quota"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), primary_key=True
    )
    product: Mapped[str] = mapped_column(String(20), primary_key=True)
    remaining: Mapped[int]
    last_reset_at: Mapped[datetime]
    """When the balance was last topped up (or, for a new row, created)."""


class UsageRecord(IdMixin, TimestampMixin, Base):
    """One provider call on a user's behalf: what it cost and how it ended."""

    __tablename__ = "usage_record"
    __table_args__ = (Index("ix_usage_record_user_id_created_at", "user_id", "created_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    product: Mapped[str] = mapped_column(String(20))
    provider: Mapped[str] = mapped_column(String(40))
    model: Mapped[str] = mapped_column(String(200))
    input_tokens: Mapped[int] = mapped_column(default=0)
    output_tokens: Mapped[int] = mapped_column(default=0)
    images: Mapped[int] = mapped_column(default=0)
    latency_ms: Mapped[int]
    outcome: Mapped[str] = mapped_column(String(20))
    """"succeeded", "failed", "invalid" (an answer that did not pass the product's checks) or
    "cancelled" (the client left)."""
    error: Mapped[str | None] = mapped_column(String(80))


class IdempotencyKey(Base):
    """A client's `Idempotency-Key` on one endpoint: claimed, then completed with the answer."""

    __tablename__ = "idempotency_key"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), primary_key=True
    )
    scope: Mapped[str] = mapped_column(String(60), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None]
    """None while the first request is still running."""
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
