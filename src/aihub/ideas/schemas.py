from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class IdeaRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    content: str
    status: Literal["complete", "incomplete"]
    provider: str
    model: str
    input_tokens: int | None
    output_tokens: int | None
    finish_reason: str | None
    error: str | None
    created_at: datetime
    completed_at: datetime


class IdeaPage(BaseModel):
    items: list[IdeaRead]
    next_cursor: str | None
    """Pass as `cursor` to get the next (older) page; null on the last page."""
