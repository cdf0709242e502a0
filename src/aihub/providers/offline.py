"""The `offline` provider: deterministic text at a realistic pace, and real PNG images.

It lets every product run with no keys at all. Output depends only on the request, so tests and
demos are repeatable; it is always labelled `offline` wherever a provider is named.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from aihub.providers.base import (
    Finish,
    GeneratedImage,
    ImageProvider,
    ImageRequest,
    TextDelta,
    TextEvent,
    TextPart,
    TextProvider,
    TextRequest,
    Usage,
)

_IDEAS = [
    (
        "Agent Ledger",
        "bookkeeping agents for freelancers",
        "Freelancers lose hours every month reconciling invoices, receipts and bank feeds.",
    ),
    (
        "ShiftPilot",
        "scheduling agents for small clinics",
        "Clinics juggle staff rotas, patient bookings and last-minute cancellations by hand.",
    ),
    (
        "GrantScout",
        "grant-writing agents for non-profits",
        "Small non-profits miss funding because finding and drafting applications takes weeks.",
    ),
    (
        "FleetWhisper",
        "maintenance agents for delivery fleets",
        "Vans break down because service records live in spreadsheets nobody reads.",
    ),
]


_CHALLENGES = {
    "easy": [
        (
            "What does `len([1, [2, 3], 4])` return in Python?",
            ["2", "3", "4", "An error is raised"],
            1,
            "The list has three elements; the nested list counts as one.",
        ),
        (
            "Which keyword defines a function in Python?",
            ["func", "define", "def", "lambda"],
            2,
            "`def` starts a function definition; `lambda` makes an anonymous expression.",
        ),
    ],
    "medium": [
        (
            "What is the average time complexity of looking up a key in a Python dict?",
            ["O(1)", "O(log n)", "O(n)", "O(n log n)"],
            0,
            "A dict is a hash table: the key's hash leads straight to its slot.",
        ),
        (
            "Which structure serves a breadth-first search best?",
            ["A stack", "A queue", "A heap", "A set"],
            1,
            "BFS visits nodes in the order they were discovered: first in, first out.",
        ),
    ],
    "hard": [
        (
            "Which pattern lets you add behaviour to an object without changing its class?",
            ["Singleton", "Decorator", "Factory method", "Template method"],
            1,
            "A decorator wraps the object and adds behaviour while keeping its interface.",
        ),
        (
            "What is the worst-case time of quicksort with a naive first-element pivot?",
            ["O(n)", "O(n log n)", "O(n^2)", "O(2^n)"],
            2,
            "On sorted input every partition is maximally unbalanced: n levels of O(n) work.",
        ),
    ],
}


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(parts).encode()).digest()[:8], "big")


def _prompt_text(request: TextRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return " ".join(p.text for p in message.parts if isinstance(p, TextPart))
    return ""


def _business_idea(rng: random.Random) -> str:
    name, pitch, problem = rng.choice(_IDEAS)
    price = rng.choice([19, 29, 49, 99])
    return (
        f"# {name}\n\n"
        f"*Autonomous {pitch}.*\n\n"
        "## The problem\n\n"
        f"{problem}\n\n"
        "## The solution\n\n"
        f"- An AI agent that handles the routine work end to end\n"
        "- A human stays in the loop for anything unusual\n"
        "- Works with the tools the customer already uses\n\n"
        "## Business model\n\n"
        f"- Subscription from ${price} a month\n"
        "- A free tier that shows the value in the first week\n\n"
        "## Why now\n\n"
        "Agents can now use tools reliably, and the customers have never had time for this.\n"
    )


def _reply(prompt: str) -> str:
    quoted = prompt.strip().replace("\n", " ")
    if len(quoted) > 120:
        quoted = quoted[:117] + "..."
    return (
        "This answer comes from aihub's **offline** provider: no model was called.\n\n"
        f"You wrote: \u201c{quoted}\u201d\n\n"
        "Set a provider key (for example `OPENAI_API_KEY` or `GEMINI_API_KEY`) to get real "
        "answers.\n"
    )


def offline_text(request: TextRequest, model: str) -> str:
    prompt = _prompt_text(request)
    rng = random.Random(_seed(model, request.system or "", prompt))  # noqa: S311 - not crypto
    challenge = re.search(r"(easy|medium|hard) difficulty coding challenge", prompt, re.IGNORECASE)
    if request.json_schema is not None and challenge:
        title, options, answer, why = rng.choice(_CHALLENGES[challenge.group(1).lower()])
        return orjson.dumps(
            {"title": title, "options": options, "correct_answer_id": answer, "explanation": why}
        ).decode()
    if request.json_schema is not None:
        return orjson.dumps(_value_for(request.json_schema, rng, "value")).decode()
    if re.search(r"business idea", prompt, re.IGNORECASE):
        return _business_idea(rng)
    return _reply(prompt)


def _value_for(schema: dict[str, Any], rng: random.Random, name: str) -> Any:
    """A deterministic value of a (small subset of) JSON Schema."""
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if kind == "object":
        properties: dict[str, dict[str, Any]] = schema.get("properties", {})
        return {key: _value_for(sub, rng, key) for key, sub in properties.items()}
    if kind == "array":
        count = schema.get("minItems", 1)
        item = schema.get("items", {"type": "string"})
        return [_value_for(item, rng, f"{name} {i + 1}") for i in range(count)]
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return False
    return f"Offline {name.replace('_', ' ')}"


def tokenize(text: str) -> list[str]:
    """Split like a tokenizer would: words with their leading space, newlines on their own."""
    return re.findall(r"\n+|[^\S\n]*[^\s]+", text) or [text]


class OfflineProvider(TextProvider, ImageProvider):
    name = "offline"

    def __init__(self, *, token_delay: float = 0.02) -> None:
        self.token_delay = token_delay

    async def stream_text(self, request: TextRequest, *, model: str) -> AsyncIterator[TextEvent]:
        text = offline_text(request, model)
        tokens = tokenize(text)
        for index, token in enumerate(tokens):
            if index and self.token_delay:
                await asyncio.sleep(self.token_delay)
            yield TextDelta(token)
        prompt_tokens = len(tokenize(_prompt_text(request)))
        yield Usage(input_tokens=prompt_tokens, output_tokens=len(tokens))
        yield Finish("stop")

    async def generate_image(self, request: ImageRequest, *, model: str) -> GeneratedImage:
        if self.token_delay:
            await asyncio.sleep(self.token_delay * 10)
        data = gradient_png(_seed(model, request.prompt, str(request.seed)), size=256)
        return GeneratedImage(url=None, data=data, mime_type="image/png")


def gradient_png(seed: int, *, size: int = 256) -> bytes:
    """A real PNG: a two-colour diagonal gradient chosen by `seed`."""
    rng = random.Random(seed)  # noqa: S311 - colours, not crypto
    start = [rng.randrange(256) for _ in range(3)]
    end = [rng.randrange(256) for _ in range(3)]
    steps = 2 * size - 1
    # One colour per diagonal; each row is a window onto that strip, so this stays cheap.
    strip = bytes(
        round(a + (b - a) * i / (steps - 1))
        for i in range(steps)
        for a, b in zip(start, end, strict=True)
    )
    rows = b"".join(b"\x00" + strip[3 * y : 3 * (y + size)] for y in range(size))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows, 6))
        + chunk(b"IEND", b"")
    )
