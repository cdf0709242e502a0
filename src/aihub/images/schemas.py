from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aihub.core.text import Text


class ImageJobCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Text = Field(
        min_length=1, max_length=500, description="What to draw (1-500 characters)"
    )
    num_images: int = Field(
        default=1, ge=1, description="Images to generate, 1 to IMAGES_MAX_PER_JOB (default 8)"
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value


class ImageJobCreated(BaseModel):
    job_id: str = Field(description="The job's id; whoever holds it can stream its progress")
    status: str
    num_images: int
    stream_url: str = Field(description="Where the job's progress streams (Server-Sent Events)")
    stream_token: str | None = Field(
        default=None,
        description="With IMAGES_STREAM_REQUIRES_AUTH: a short-lived token for this job's "
        "stream only (`?token=`), for an EventSource that cannot send a header",
    )
    stream_token_expires_at: datetime | None = None


class JobImageRead(BaseModel):
    index: int
    status: Literal["pending", "running", "succeeded", "failed"]
    url: str | None = Field(description="The provider's URL (it may expire) or a data: URI")
    file_url: str | None = Field(
        description="aihub's own copy: a signed link that works without a token until it expires"
    )
    error: str | None
    mime_type: str | None
    provider: str | None
    started_at: datetime | None
    finished_at: datetime | None


class ImageJobRead(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "canceled"]
    prompt: str
    num_images: int
    model: str
    succeeded: int
    failed: int
    ttfi_ms: int | None = Field(description="From creation to the first image, in milliseconds")
    total_ms: int | None = Field(description="From creation to the last image, in milliseconds")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    images: list[JobImageRead]


class ImageJobList(BaseModel):
    jobs: list[ImageJobRead]
    next_cursor: str | None
