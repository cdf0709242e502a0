"""Coding challenges over HTTP: the original frontend's contract, the checks every answer must
pass, repair, fallback, and what each outcome costs."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sqlalchemy import func, select

from aihub.challenges.generation import InvalidAnswer, parse_answer
from aihub.challenges.models import Challenge
from aihub.usage.models import UsageRecord
from tests.conftest import MakeApp, Served
from tests.factories import bearer, create_user
from tests.fakes.openai import FakeOpenAI

VALID = {
    "title": "Which data structure gives O(1) average lookup by key?",
    "options": ["A linked list", "A hash map", "A binary heap", "A sorted array"],
    "correct_answer_id": 1,
    "explanation": "Hash maps hash the key to a bucket, so a lookup takes constant time.",
}


def answer(**changes: Any) -> str:
    return json.dumps({**VALID, **changes})


async def generate(served: Served, token: str, difficulty: str = "medium", **headers: str) -> Any:
    return await served.client.post(
        "/api/generate-challenge",
        json={"difficulty": difficulty},
        headers={**bearer(token), **headers},
    )


async def remaining(served: Served, token: str) -> int:
    response = await served.client.get("/api/quota", headers=bearer(token))
    assert response.status_code == 200, response.text
    value: int = response.json()["quota_remaining"]
    return value


async def count(served: Served, model: Any, **where: Any) -> int:
    async with served.app.state.sessions() as session:
        query = select(func.count()).select_from(model).filter_by(**where)
        return int((await session.execute(query)).scalar_one())


async def test_generates_the_challenge_the_original_frontend_reads(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = answer()
    _, token = await create_user(served.client)

    response = await generate(served, token, "hard")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["difficulty"] == "hard"
    assert body["title"] == VALID["title"]
    assert body["options"] == VALID["options"]
    assert body["correct_answer_id"] == 1
    assert isinstance(body["correct_answer_id"], int)
    assert body["explanation"] == VALID["explanation"]
    assert body["is_fallback"] is False
    assert body["id"]
    assert body["timestamp"]
    sent = fake_openai.last_request.json
    assert sent["messages"][0]["role"] == "system"
    assert "design patterns" in sent["messages"][0]["content"]  # the hard guidance
    assert sent["messages"][-1]["content"] == "Generate a hard difficulty coding challenge."
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["temperature"] == 0.7
    assert await remaining(served, token) == 49


async def test_history_is_newest_first_paginated_and_private(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    _, token = await create_user(served.client)
    _, other = await create_user(served.client)
    for title in ("first?", "second?", "third?"):
        fake_openai.text = answer(title=title)
        assert (await generate(served, token)).status_code == 200
    fake_openai.text = answer(title="someone else's?")
    assert (await generate(served, other)).status_code == 200

    page = (await served.client.get("/api/my-history?limit=2", headers=bearer(token))).json()
    assert [c["title"] for c in page["challenges"]] == ["third?", "second?"]
    assert isinstance(page["challenges"][0]["options"], list)
    rest = await served.client.get(
        "/api/my-history", params={"cursor": page["next_cursor"]}, headers=bearer(token)
    )
    assert [c["title"] for c in rest.json()["challenges"]] == ["first?"]
    assert rest.json()["next_cursor"] is None

    mine = page["challenges"][0]["id"]
    assert (await served.client.get(f"/api/challenges/{mine}", headers=bearer(token))).is_success
    theirs = await served.client.get(f"/api/challenges/{mine}", headers=bearer(other))
    assert theirs.status_code == 404


@pytest.mark.parametrize("difficulty", ["", "EASY", "impossible", None, 3])
async def test_any_other_difficulty_is_a_422_with_a_string_detail(
    served: Served, difficulty: Any
) -> None:
    _, token = await create_user(served.client)
    response = await served.client.post(
        "/api/generate-challenge", json={"difficulty": difficulty}, headers=bearer(token)
    )
    assert response.status_code == 422
    assert isinstance(response.json()["detail"], str)
    assert "difficulty" in response.json()["detail"]


async def test_a_new_user_sees_the_starting_balance(served: Served) -> None:
    _, token = await create_user(served.client)
    body = (await served.client.get("/api/quota", headers=bearer(token))).json()
    assert body["quota_remaining"] == 50
    assert body["last_reset_data"] == body["last_reset_date"]
    assert body["next_reset_at"] > body["last_reset_date"]


async def test_requires_a_token(served: Served) -> None:
    for method, path in [
        ("POST", "/api/generate-challenge"),
        ("GET", "/api/my-history"),
        ("GET", "/api/quota"),
    ]:
        response = await served.client.request(method, path, json={"difficulty": "easy"})
        assert response.status_code == 401
        assert isinstance(response.json()["detail"], str)


# --- the checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("Sure! Here is a challenge: ...", "not JSON"),
        ("[1, 2, 3]", "not an object"),
        (answer(title=""), "empty title"),
        (answer(title="   "), "blank title"),
        (json.dumps({k: v for k, v in VALID.items() if k != "title"}), "no title"),
        (answer(options=["a", "b", "c"]), "three options"),
        (answer(options=["a", "b", "c", "d", "e"]), "five options"),
        (answer(options=["a", "b", "c", "A "]), "duplicate options"),
        (answer(options=["a", "b", "", "d"]), "an empty option"),
        (answer(options=["a", "b", 3, "d"]), "an option that is not text"),
        (answer(options="a, b, c, d"), "options not a list"),
        (answer(correct_answer_id=4), "answer id above 3"),
        (answer(correct_answer_id=-1), "negative answer id"),
        (answer(correct_answer_id="1"), "answer id as text"),
        (answer(correct_answer_id=1.0), "answer id as a float"),
        (answer(correct_answer_id=True), "answer id as a boolean"),
        (answer(correct_answer_id=None), "answer id null"),
        (answer(explanation=""), "empty explanation"),
        (json.dumps({k: v for k, v in VALID.items() if k != "explanation"}), "no explanation"),
    ],
)
def test_each_invalid_answer_shape_is_rejected(text: str, why: str) -> None:
    with pytest.raises(InvalidAnswer):
        parse_answer(text)


def test_a_valid_answer_passes_even_in_a_code_fence() -> None:
    assert parse_answer(answer()).correct_answer_id == 1
    fenced = parse_answer(f"```json\n{answer()}\n```")
    assert fenced.options == VALID["options"]


async def test_an_invalid_answer_is_repaired_once_and_charged_once(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    _, token = await create_user(served.client)
    fake_openai.answers = [answer(correct_answer_id=7), answer()]

    response = await generate(served, token)

    assert response.status_code == 200, response.text
    assert response.json()["is_fallback"] is False
    assert response.json()["correct_answer_id"] == 1
    repair = fake_openai.last_request.json["messages"]
    assert repair[-2] == {"role": "assistant", "content": answer(correct_answer_id=7)}
    assert "correct_answer_id" in repair[-1]["content"]
    assert await remaining(served, token) == 49
    assert await count(served, UsageRecord, outcome="invalid") == 1
    assert await count(served, UsageRecord, outcome="succeeded") == 1


async def test_two_invalid_answers_give_the_free_fallback(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    _, token = await create_user(served.client)
    fake_openai.text = answer(options=["same", "same", "same", "same"])

    response = await generate(served, token, "easy")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["is_fallback"] is True
    assert len(body["options"]) == 4
    assert body["options"][body["correct_answer_id"]] == "4"
    assert await remaining(served, token) == 50  # not charged
    assert len(fake_openai.requests) == 2  # one repair attempt, no more
    assert await count(served, UsageRecord, outcome="invalid") == 2
    history = (await served.client.get("/api/my-history", headers=bearer(token))).json()
    assert [c["is_fallback"] for c in history["challenges"]] == [True]


async def test_without_fallback_two_invalid_answers_are_a_502_and_nothing_is_stored(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(challenges_fallback=False) as served:
        _, token = await create_user(served.client)
        fake_openai.text = "not json at all"

        response = await generate(served, token)

        assert response.status_code == 502
        assert response.json()["error"] == "invalid_model_answer"
        assert isinstance(response.json()["detail"], str)
        assert await count(served, Challenge) == 0
        assert await remaining(served, token) == 50


async def test_a_failing_provider_refunds_and_says_so(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    _, token = await create_user(served.client)
    fake_openai.fail_with(500)

    response = await generate(served, token)

    assert response.status_code == 503
    assert response.json()["error"] == "provider_unavailable"
    assert await remaining(served, token) == 50
    assert await count(served, Challenge) == 0
    assert await count(served, UsageRecord, outcome="failed", product="challenges") == 1


async def test_an_answer_that_trickles_past_the_deadline_is_a_503_and_free(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    """Each read comes in time (the provider's timeout is per read): the whole must too."""
    fake_openai.answers = [answer()]
    fake_openai.token_delay = 0.1
    async with make_app(challenges_timeout_seconds=0.4) as served:
        _, token = await create_user(served.client)

        response = await generate(served, token)

        assert response.status_code == 503
        assert response.json()["error"] == "provider_timeout"
        await asyncio.wait_for(fake_openai.disconnected.wait(), timeout=3)
        assert await remaining(served, token) == 50
        assert await count(served, Challenge) == 0


async def test_a_client_that_leaves_stops_the_generation_and_is_not_charged(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.first_token_delay = 5
    _, token = await create_user(served.client)
    request = asyncio.create_task(generate(served, token))
    while fake_openai.stats.started == 0:
        await asyncio.sleep(0.01)

    request.cancel()  # the client goes away

    await asyncio.wait_for(fake_openai.disconnected.wait(), timeout=3)
    for _ in range(50):
        if await count(served, UsageRecord, outcome="cancelled", product="challenges"):
            break
        await asyncio.sleep(0.05)
    assert await count(served, UsageRecord, outcome="cancelled", product="challenges") == 1
    assert await remaining(served, token) == 50


async def test_offline_serves_a_real_challenge(make_app: MakeApp) -> None:
    async with make_app(openai_api_key=None) as served:
        _, token = await create_user(served.client)
        response = await generate(served, token, "easy")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["is_fallback"] is False
        assert len(set(body["options"])) == 4
        assert await remaining(served, token) == 49
