from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from aihub.core.db import Base, IdMixin, TimestampMixin, utcnow


class User(IdMixin, TimestampMixin, Base):
    """A person: a Clerk user (`clerk_id`), a local account (`LocalCredential`), or both."""

    __tablename__ = "user"

    clerk_id: Mapped[str | None] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    name: Mapped[str | None] = mapped_column(String(200))
    plan: Mapped[str | None] = mapped_column(String(100))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class LocalCredential(Base):
    """Email and bcrypt hash of a local account."""

    __tablename__ = "local_credential"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("user.id", ondelete="CASCADE"), primary_key=True
    )
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Declared so that the unit of work inserts the user before its credential.
    user: Mapped[User] = relationship(lazy="raise")


class WebhookDelivery(Base):
    """A webhook delivery already applied, by its `svix-id`: a redelivery changes nothing."""

    __tablename__ = "webhook_delivery"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    event_type: Mapped[str] = mapped_column(String(100))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class DeletedClerkUser(Base):
    """A Clerk user deleted by Clerk's webhook: neither a still-valid token nor a late event
    brings them back. Only the Clerk id is kept."""

    __tablename__ = "deleted_clerk_user"

    clerk_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(default=utcnow)
