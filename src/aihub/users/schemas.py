"""Request and response bodies of the account routes."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from aihub.core.text import Text
from aihub.users.service import EMAIL_MAX_LENGTH, check_password, normalize_email


class AccountCreate(BaseModel):
    email: Text = Field(max_length=EMAIL_MAX_LENGTH + 64, examples=["ada@example.com"])
    password: Text = Field(max_length=1024, examples=["correct-horse-battery"])

    @field_validator("email")
    @classmethod
    def _valid_email(cls, value: str) -> str:
        return normalize_email(value)

    @field_validator("password")
    @classmethod
    def _valid_password(cls, value: str) -> str:
        return check_password(value)


class LoginRequest(BaseModel):
    """The image-jobs frontend's login body."""

    email: Text = Field(max_length=EMAIL_MAX_LENGTH + 64, examples=["ada@example.com"])
    password: Text = Field(min_length=1, max_length=1024, examples=["correct-horse-battery"])


class UserSummary(BaseModel):
    id: str
    email: str | None


class TokenRead(BaseModel):
    """What the image-jobs frontend reads (`token`, `user.id`, `user.email`), and a bit more."""

    token: str
    token_type: Literal["bearer"] = "bearer"
    expires_at: datetime
    user: UserSummary


class UserRead(BaseModel):
    id: str
    email: str | None
    name: str | None
    plan: str | None
    clerk_id: str | None


class JwksRead(BaseModel):
    keys: list[dict[str, str]]


class WebhookReceipt(BaseModel):
    status: Literal["processed", "duplicate", "ignored"]
