from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from aihub.core.db import Base, TimestampMixin, utcnow


class ImageJob(TimestampMixin, Base):
    """A batch of images from one prompt. Its id is a capability: whoever holds it may stream
    the job's progress (the original frontend's `EventSource` sends no token)."""

    __tablename__ = "image_job"
    __table_args__ = (
        Index("ix_image_job_user_id_created_at", "user_id", "created_at"),
        Index("ix_image_job_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    prompt: Mapped[str] = mapped_column(Text)
    num_images: Mapped[int]
    model: Mapped[str] = mapped_column(String(300))
    """The model chain the job runs on (`provider:model[,...]`)."""
    status: Mapped[str] = mapped_column(String(16), default="queued")
    """queued -> running -> done; or canceled. A running job whose worker stopped beating is
    queued work again."""
    worker_id: Mapped[str | None] = mapped_column(String(64))
    heartbeat_at: Mapped[datetime | None]
    claims: Mapped[int] = mapped_column(default=0)
    """How many times a worker has claimed the job."""
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    succeeded: Mapped[int] = mapped_column(default=0)
    failed: Mapped[int] = mapped_column(default=0)
    ttfi_ms: Mapped[int | None]
    """From the job's creation to its first succeeded image."""
    total_ms: Mapped[int | None]
    """From the job's creation to its last image."""
    last_event_id: Mapped[int] = mapped_column(default=0)


class JobImage(Base):
    __tablename__ = "image_job_image"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("image_job.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    """pending -> running -> succeeded | failed."""
    seed: Mapped[int]
    attempts: Mapped[int] = mapped_column(default=0)
    url: Mapped[str | None] = mapped_column(Text)
    """What the original frontend displays: the provider's URL, or a `data:` URI."""
    storage_key: Mapped[str | None] = mapped_column(String(300))
    """aihub's own copy (provider URLs expire)."""
    mime_type: Mapped[str | None] = mapped_column(String(100))
    provider: Mapped[str | None] = mapped_column(String(40))
    model: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEvent(Base):
    """The job's stream, event by event, so that any instance can replay it from any point
    (`Last-Event-ID`) and a late subscriber gets everything, `done` included."""

    __tablename__ = "image_job_event"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("image_job.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(16))
    """progress | done | error."""
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
