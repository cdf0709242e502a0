"""What the model is asked for, and the checks its answer must pass before anyone sees it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from aihub.core.errors import describe_validation_errors

Difficulty = Literal["easy", "medium", "hard"]

_GUIDANCE: dict[Difficulty, str] = {
    "easy": "Focus on basic syntax, simple operations, or common programming concepts.",
    "medium": "Cover intermediate concepts like data structures, algorithms, or language features.",
    "hard": "Include advanced topics, design patterns, optimization techniques, or complex "
    "algorithms.",
}

SYSTEM_PROMPT = """You are an expert creator of coding challenges.
Write one multiple-choice question about programming at the requested difficulty.
{guidance}

Answer with one JSON object of exactly this shape:
{{"title": "the question", "options": ["four", "distinct", "answer", "options"],
"correct_answer_id": 0, "explanation": "why the correct answer is correct"}}

Make every option plausible, exactly one of them correct; `correct_answer_id` is the index (0-3)
of the correct option in `options`."""

ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "options": {"type": "array", "items": {"type": "string"}, "minItems": 4, "maxItems": 4},
        "correct_answer_id": {"type": "integer", "minimum": 0, "maximum": 3},
        "explanation": {"type": "string"},
    },
    "required": ["title", "options", "correct_answer_id", "explanation"],
    "additionalProperties": False,
}


def system_prompt(difficulty: Difficulty) -> str:
    return SYSTEM_PROMPT.format(guidance=_GUIDANCE[difficulty])


def user_prompt(difficulty: Difficulty) -> str:
    return f"Generate a {difficulty} difficulty coding challenge."


def repair_prompt(problem: str) -> str:
    return (
        f"That answer cannot be used: {problem}. Answer again with only the corrected JSON "
        "object: four distinct, non-empty options and `correct_answer_id` between 0 and 3."
    )


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
Option = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class GeneratedChallenge(BaseModel):
    """A model's answer that passed: strict types, so `"2"`, `2.0` or `true` is no answer id."""

    model_config = ConfigDict(strict=True)

    title: Text
    options: list[Option] = Field(min_length=4, max_length=4)
    correct_answer_id: int = Field(ge=0, le=3)
    explanation: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=8000)
    ]

    @field_validator("options")
    @classmethod
    def _distinct(cls, options: list[str]) -> list[str]:
        if len({option.casefold() for option in options}) != len(options):
            raise ValueError("the options must be distinct")
        return options


class InvalidAnswer(ValueError):
    """The model's answer failed the checks; the message says why (for the repair prompt)."""


def parse_answer(text: str) -> GeneratedChallenge:
    try:
        data = orjson.loads(_without_code_fence(text))
    except orjson.JSONDecodeError:
        raise InvalidAnswer("it is not a JSON object") from None
    if not isinstance(data, dict):
        raise InvalidAnswer("it is not a JSON object")
    try:
        return GeneratedChallenge.model_validate(data)
    except ValidationError as exc:
        raise InvalidAnswer(describe_validation_errors(exc.errors())) from None


def _without_code_fence(text: str) -> str:
    """Models sometimes wrap JSON in a Markdown code fence even when asked not to."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```"):
        stripped = stripped[3:-3].strip()
        if stripped.startswith("json"):
            stripped = stripped[4:]
    return stripped


FALLBACK = GeneratedChallenge(
    title="What is the output of this Python code?\n\nitems = [1, 2, 3]\nitems.append(4)\n"
    "print(len(items))",
    options=["3", "4", "5", "An error is raised"],
    correct_answer_id=1,
    explanation="append adds one element to the end of the list, so it holds four items and "
    "len returns 4.",
)
"""The seed's fallback: a basic list operation."""
