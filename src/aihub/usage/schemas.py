from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from aihub.usage.quotas import Product


class QuotaRead(BaseModel):
    unlimited: bool
    remaining: int | None = Field(description="What the next request can draw on; null: unlimited")
    daily: int | None = Field(description="The balance is topped up to at least this every 24 h")
    initial: int | None = Field(description="A new user's balance")
    last_reset_at: datetime | None
    next_reset_at: datetime | None


class UsageTotalsRead(BaseModel):
    requests: int = Field(description="Provider calls made for you")
    succeeded: int
    failed: int
    input_tokens: int
    output_tokens: int
    images: int


class ProductUsageRead(BaseModel):
    product: Product
    quota: QuotaRead
    usage: UsageTotalsRead


class UsageRead(BaseModel):
    since: datetime = Field(description="Usage is counted from here")
    products: list[ProductUsageRead]
