"""`Idempotency-Key` on the generate endpoints: replayed, charged once, never run twice."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from sqlalchemy import func, select

from aihub.challenges.models import Challenge
from aihub.usage.models import IdempotencyKey
from tests.clocks import FakeClock
from tests.conftest import MakeApp, Served
from tests.factories import bearer, create_user
from tests.fakes.openai import FakeOpenAI

VALID = json.dumps(
    {
        "title": "Which HTTP status means 'Too Many Requests'?",
        "options": ["404", "409", "429", "503"],
        "correct_answer_id": 2,
        "explanation": "RFC 6585 defines 429 for rate limiting.",
    }
)


async def generate(served: Served, token: str, key: str | None, difficulty: str = "easy") -> Any:
    headers = bearer(token) | ({"Idempotency-Key": key} if key is not None else {})
    return await served.client.post(
        "/api/generate-challenge", json={"difficulty": difficulty}, headers=headers
    )


async def remaining(served: Served, token: str) -> int:
    value: int = (await served.client.get("/api/quota", headers=bearer(token))).json()[
        "quota_remaining"
    ]
    return value


async def challenges(served: Served) -> int:
    async with served.app.state.sessions() as session:
        return int((await session.execute(select(func.count()).select_from(Challenge))).scalar())


async def test_the_same_key_replays_the_first_answer_and_charges_once(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = VALID
    _, token = await create_user(served.client)

    first = await generate(served, token, "key-1")
    again = await generate(served, token, "key-1")

    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert len(fake_openai.requests) == 1
    assert await remaining(served, token) == 49
    assert await challenges(served) == 1
    assert (await generate(served, token, "key-2")).json()["id"] != first.json()["id"]
    assert await remaining(served, token) == 48


async def test_a_concurrent_duplicate_gets_409(served: Served, fake_openai: FakeOpenAI) -> None:
    fake_openai.text = VALID
    fake_openai.first_token_delay = 0.5
    _, token = await create_user(served.client)

    first, second = await asyncio.gather(
        generate(served, token, "same"), generate(served, token, "same")
    )

    statuses = sorted([first.status_code, second.status_code])
    assert statuses == [200, 409]
    conflict = first if first.status_code == 409 else second
    assert conflict.json()["error"] == "idempotency_in_progress"
    assert conflict.headers["retry-after"] == "1"
    assert len(fake_openai.requests) == 1
    assert await remaining(served, token) == 49


async def test_the_same_key_with_another_body_is_a_422(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = VALID
    _, token = await create_user(served.client)
    assert (await generate(served, token, "k", "easy")).status_code == 200

    changed = await generate(served, token, "k", "hard")

    assert changed.status_code == 422
    assert changed.json()["error"] == "idempotency_key_reused"
    assert isinstance(changed.json()["detail"], str)
    assert len(fake_openai.requests) == 1


async def test_a_failed_request_frees_its_key_for_the_retry(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = VALID
    fake_openai.fail_with(503, times=1)
    _, token = await create_user(served.client)

    assert (await generate(served, token, "retry-me")).status_code == 503
    retried = await generate(served, token, "retry-me")

    assert retried.status_code == 200
    assert "idempotent-replayed" not in retried.headers
    assert await remaining(served, token) == 49


async def test_keys_belong_to_their_user(served: Served, fake_openai: FakeOpenAI) -> None:
    fake_openai.text = VALID
    _, mine = await create_user(served.client)
    _, theirs = await create_user(served.client)

    a = await generate(served, mine, "shared")
    b = await generate(served, theirs, "shared")

    assert a.json()["id"] != b.json()["id"]
    assert "idempotent-replayed" not in b.headers


async def test_a_key_left_by_a_crashed_request_is_taken_over_and_old_keys_expire(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = VALID
    clock = FakeClock()
    async with make_app(clock=clock) as served:
        user_id, token = await create_user(served.client)
        async with served.app.state.sessions.begin() as session:
            session.add(
                IdempotencyKey(
                    user_id=uuid.UUID(user_id),
                    scope="challenges.generate",
                    key="orphan",
                    request_hash="0" * 64,
                    created_at=clock.now,
                )
            )
        assert (await generate(served, token, "orphan")).status_code == 422  # still fresh
        clock.advance(minutes=11)
        assert (await generate(served, token, "orphan")).status_code == 200

        first = await generate(served, token, "daily")
        clock.advance(hours=25)
        later = await generate(served, token, "daily")
        assert later.json()["id"] != first.json()["id"]


async def test_invalid_keys_are_refused(served: Served) -> None:
    _, token = await create_user(served.client)
    for key in [b"", b"x" * 256, b"has space", "ünïcode".encode()]:
        response = await served.client.post(
            "/api/generate-challenge",
            json={"difficulty": "easy"},
            headers=[(b"authorization", f"Bearer {token}".encode()), (b"idempotency-key", key)],
        )
        assert response.status_code == 422, key
        assert "Idempotency-Key" in response.json()["detail"]
