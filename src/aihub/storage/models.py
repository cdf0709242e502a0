from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from aihub.core.db import Base, IdMixin, TimestampMixin


class StoredFile(IdMixin, TimestampMixin, Base):
    """A file a user uploaded (through a signed URL, so its bytes may never pass through aihub):
    checked the first time it is used, removed with its chat or its user, or when nothing ever
    used it."""

    __tablename__ = "stored_file"
    __table_args__ = (Index("ix_stored_file_user_id_created_at", "user_id", "created_at"),)

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(400), unique=True)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    declared_size: Mapped[int | None]
    size: Mapped[int | None]
    """Known once the upload has been checked."""
    checked_at: Mapped[datetime | None]
    attached_at: Mapped[datetime | None]
    """When a message first used it (never-attached files are removed after a while)."""
    provider_uri: Mapped[str | None] = mapped_column(String(500))
    """The provider's own copy (Gemini's file API), reused until `provider_uri_expires_at`."""
    provider_uri_expires_at: Mapped[datetime | None]
