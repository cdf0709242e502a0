from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from aihub.challenges.generation import Difficulty
from aihub.challenges.models import Challenge


class ChallengeCreate(BaseModel):
    difficulty: Difficulty


class ChallengeRead(BaseModel):
    id: str
    difficulty: Difficulty
    title: str
    options: list[str] = Field(description="Four answers")
    correct_answer_id: int = Field(ge=0, le=3, description="Index of the correct option")
    explanation: str
    timestamp: datetime = Field(description="When it was generated")
    is_fallback: bool = Field(
        description="The built-in question, given (free) when the model's answers failed the checks"
    )

    @classmethod
    def of(cls, challenge: Challenge) -> ChallengeRead:
        return cls(
            id=str(challenge.id),
            difficulty=challenge.difficulty,
            title=challenge.title,
            options=list(challenge.options),
            correct_answer_id=challenge.correct_answer_id,
            explanation=challenge.explanation,
            timestamp=challenge.created_at,
            is_fallback=challenge.is_fallback,
        )


class ChallengeHistory(BaseModel):
    challenges: list[ChallengeRead] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page")


class ChallengeQuotaRead(BaseModel):
    quota_remaining: int | None = Field(description="Challenges left; null: unlimited")
    last_reset_date: datetime
    last_reset_data: datetime = Field(
        description="The same as `last_reset_date`: the name the original frontend reads"
    )
    next_reset_at: datetime = Field(description="When the balance is next topped up")
    daily_quota: int | None = Field(description="The balance is topped up to at least this")
