"""Quotas under concurrency and over time, and the usage ledger, through the products' HTTP API."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import event, func, select, text, update
from sqlalchemy.exc import IntegrityError

import aihub.main  # noqa: F401 - every model on Base.metadata
from aihub.core.db import Base, DriverStatement, _sqlite_pragmas
from aihub.ideas.models import Idea
from aihub.usage import quotas
from aihub.usage.models import Quota, UsageRecord
from aihub.usage.quotas import QuotaExceeded, QuotaPolicy
from aihub.users.models import User
from tests.clocks import FakeClock
from tests.conftest import MakeApp, Served
from tests.factories import bearer, create_user
from tests.fakes.openai import FakeOpenAI
from tests.sse_clients import markdown_buffer

VALID = json.dumps(
    {
        "title": "What does `[] or 'x'` evaluate to in Python?",
        "options": ["[]", "'x'", "True", "None"],
        "correct_answer_id": 1,
        "explanation": "`or` returns its first truthy operand, and an empty list is falsy.",
    }
)


async def generate(served: Served, token: str) -> Any:
    return await served.client.post(
        "/api/generate-challenge", json={"difficulty": "easy"}, headers=bearer(token)
    )


async def quota(served: Served, token: str) -> dict[str, Any]:
    response = await served.client.get("/api/quota", headers=bearer(token))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def stored_balance(served: Served, user_id: str, product: str) -> int:
    async with served.app.state.sessions() as session:
        rows = await session.scalars(select(Quota).where(Quota.product == product))
        return int(next(row.remaining for row in rows if str(row.user_id) == user_id))


async def test_sixty_concurrent_requests_against_ten_units_give_exactly_ten(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = VALID
    fake_openai.token_delay = 0.002
    async with make_app(challenges_initial_quota=10) as served:
        user_id, token = await create_user(served.client)

        responses = await asyncio.gather(*(generate(served, token) for _ in range(60)))

        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == 10, statuses
        assert statuses.count(429) == 50, statuses
        refused = next(r for r in responses if r.status_code == 429)
        assert refused.json()["error"] == "quota_exceeded"
        assert "Daily quota exceeded" in refused.json()["detail"]
        assert 0 < int(refused.headers["retry-after"]) <= 24 * 3600
        assert await stored_balance(served, user_id, "challenges") == 0
        assert (await quota(served, token))["quota_remaining"] == 0
        assert len(fake_openai.requests) == 10  # a refused request never reaches the provider


async def test_top_ups_every_24_hours_never_lower_a_balance(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = VALID
    clock = FakeClock()
    start = clock.now
    async with make_app(clock=clock) as served:
        low_id, low = await create_user(served.client)
        high_id, high = await create_user(served.client)
        assert (await quota(served, low))["quota_remaining"] == 50

        for _ in range(47):
            assert (await generate(served, low)).status_code == 200
        for _ in range(5):
            assert (await generate(served, high)).status_code == 200
        assert (await quota(served, low))["quota_remaining"] == 3
        assert (await quota(served, high))["quota_remaining"] == 45

        clock.advance(hours=23, minutes=59)
        assert (await quota(served, low))["quota_remaining"] == 3  # not yet
        assert (await generate(served, low)).status_code == 200
        assert await stored_balance(served, low_id, "challenges") == 2

        clock.advance(minutes=1)  # 24 hours after the first use
        assert (await quota(served, low))["quota_remaining"] == 10
        assert (await quota(served, high))["quota_remaining"] == 45
        assert (await generate(served, low)).status_code == 200
        assert (await generate(served, high)).status_code == 200
        assert await stored_balance(served, low_id, "challenges") == 9
        assert await stored_balance(served, high_id, "challenges") == 44

        body = await quota(served, low)
        assert datetime.fromisoformat(body["last_reset_date"]) == clock.now
        assert body["last_reset_data"] == body["last_reset_date"]
        next_reset = datetime.fromisoformat(body["next_reset_at"])
        assert (next_reset - start).total_seconds() == 48 * 3600


async def test_an_exhausted_balance_says_when_it_comes_back(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.text = VALID
    clock = FakeClock()
    async with make_app(clock=clock, challenges_initial_quota=1) as served:
        _, token = await create_user(served.client)
        assert (await generate(served, token)).status_code == 200
        clock.advance(hours=20)

        refused = await generate(served, token)

        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(4 * 3600)
        assert refused.headers["content-type"] == "application/json"
        clock.advance(hours=4)
        assert (await generate(served, token)).status_code == 200


async def test_ideas_draw_on_their_own_quota_and_refuse_in_the_stream_s_format(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(ideas_daily_quota=1) as served:
        _, token = await create_user(served.client)
        sse = {"Accept": "text/event-stream", **bearer(token)}
        first = await served.client.get("/api", headers=sse)
        assert first.status_code == 200

        refused = await served.client.get("/api", headers=sse)
        assert refused.status_code == 429
        assert refused.headers["content-type"].startswith("text/event-stream")
        assert "Daily quota exceeded" in markdown_buffer(refused.text)
        assert "retry-after" in refused.headers

        as_json = await served.client.get("/api?format=json", headers=sse)
        assert as_json.status_code == 429
        assert as_json.json()["error"] == "quota_exceeded"
        assert (await quota(served, token))["quota_remaining"] == 50  # challenges untouched
        assert len(fake_openai.requests) == 1  # the refusals never reached the provider


async def test_a_provider_failure_gives_the_idea_back(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(ideas_daily_quota=1) as served:
        user_id, token = await create_user(served.client)
        sse = {"Accept": "text/event-stream", **bearer(token)}
        fake_openai.fail_with(503, times=1)
        assert (await served.client.get("/api", headers=sse)).status_code == 503
        fake_openai.fail_mid_stream(5)
        failed = await served.client.get("/api?format=json", headers=sse)
        assert "event: error" in failed.text
        fake_openai.reset()

        assert (await served.client.get("/api", headers=sse)).status_code == 200
        assert await stored_balance(served, user_id, "ideas") == 0


async def set_balance(served: Served, product: str, remaining: int) -> None:
    """As another worker spending the user's units (or an administrator) would."""
    await served.app.state.sessions.write(
        lambda connection: connection.execute(
            update(Quota).where(Quota.product == product).values(remaining=remaining)
        )
    )


async def a_user_with_one_idea(served: Served, **params: str) -> tuple[str, dict[str, str]]:
    """A new user who has streamed one idea (so that this process knows what their reservation
    left): their id and the headers of their idea streams."""
    user_id, token = await create_user(served.client)
    sse = {"Accept": "text/event-stream", **bearer(token)}
    assert (await served.client.get("/api", params=params, headers=sse)).status_code == 200
    return user_id, sse


async def test_with_units_left_the_provider_is_called_while_the_unit_is_reserved(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    """Once a reservation here left units, the next stream's request goes to the provider while
    its reservation commits; nothing reaches the client before it has."""
    async with make_app(ideas_daily_quota=5) as served:
        user_id, sse = await a_user_with_one_idea(served)  # 4 left
        answered = asyncio.Event()

        async def stream() -> tuple[int, str]:
            async with served.client.stream("GET", "/api", headers=sse) as response:
                answered.set()
                return response.status_code, (await response.aread()).decode()

        async with served.app.state.sessions.begin() as session:
            # The quota row stays locked (SQLite: the database) until this transaction ends.
            await session.execute(
                update(Quota).where(Quota.product == "ideas").values(remaining=Quota.remaining)
            )
            streaming = asyncio.create_task(stream())
            async with asyncio.timeout(5):
                while len(fake_openai.requests) < 2:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert not answered.is_set()
        status, text = await streaming

        assert status == 200
        assert "event: done" in text
        assert await stored_balance(served, user_id, "ideas") == 3


async def test_a_unit_spent_elsewhere_meanwhile_refuses_the_stream_the_provider_opened(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.05
    async with make_app(ideas_daily_quota=5) as served:
        user_id, sse = await a_user_with_one_idea(served, format="json")
        await set_balance(served, "ideas", 0)

        refused = await served.client.get("/api", headers=sse)

        assert refused.status_code == 429
        assert "Daily quota exceeded" in markdown_buffer(refused.text)
        assert "retry-after" in refused.headers
        assert len(fake_openai.requests) == 2
        await asyncio.wait_for(fake_openai.stats.disconnected.wait(), timeout=3)  # closed
        assert await stored_balance(served, user_id, "ideas") == 0  # nothing given back
        async with served.app.state.sessions() as session:
            rows = list(await session.scalars(select(UsageRecord).order_by(UsageRecord.created_at)))
        assert [(row.outcome, row.error) for row in rows] == [
            ("succeeded", None),
            ("cancelled", "quota_exceeded"),  # the provider was called: it is on the ledger
        ]
        # Now known to have run out: the next refusal comes before any provider call.
        assert (await served.client.get("/api", headers=sse)).status_code == 429
        assert len(fake_openai.requests) == 2
        async with served.app.state.sessions() as session:
            assert await session.scalar(select(func.count()).select_from(Idea)) == 1


async def test_a_provider_failure_while_the_unit_is_reserved_gives_it_back(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(ideas_daily_quota=5) as served:
        user_id, sse = await a_user_with_one_idea(served)
        fake_openai.fail_with(503, times=1)

        assert (await served.client.get("/api", headers=sse)).status_code == 503
        assert await stored_balance(served, user_id, "ideas") == 4

        # Both at once: the refusal is the answer (as if the provider had not been called), and
        # no unit is given back, since none was taken.
        await set_balance(served, "ideas", 0)
        fake_openai.fail_with(503, times=1)
        refused = await served.client.get("/api?format=json", headers=sse)
        assert refused.status_code == 429
        assert refused.json()["error"] == "quota_exceeded"
        assert await stored_balance(served, user_id, "ideas") == 0


async def test_concurrent_streams_bet_on_no_more_units_than_are_left(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    """Thirty streams at once against nine units known to be left: nine are served, each with
    its provider call made while its unit was reserved, and the other 21 are refused before
    any provider call."""
    fake_openai.token_delay = 0.002
    async with make_app(ideas_daily_quota=10) as served:
        user_id, sse = await a_user_with_one_idea(served)  # 9 left

        responses = await asyncio.gather(
            *(served.client.get("/api", headers=sse) for _ in range(30))
        )

        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) == 9, statuses
        assert statuses.count(429) == 21, statuses
        async with served.app.state.sessions() as session:
            rows = list(await session.scalars(select(UsageRecord)))
        assert [row.outcome for row in rows] == ["succeeded"] * 10  # no call made in vain
        assert len(fake_openai.requests) == 10
        assert await stored_balance(served, user_id, "ideas") == 0


async def test_balances_bet_only_on_units_a_reservation_left_that_no_bet_counts_on() -> None:
    balances, user, other = quotas.Balances(capacity=2), uuid.uuid4(), uuid.uuid4()
    commits: list[asyncio.Future[quotas.Outcome]] = []

    def reservation() -> asyncio.Future[quotas.Outcome]:
        commits.append(asyncio.get_running_loop().create_future())
        return commits[-1]

    assert balances.bet(user, "ideas", 1, reservation) is None  # nothing known
    balances.note(user, "ideas", 2)
    first = balances.bet(user, "ideas", 1, reservation)
    second = balances.bet(user, "ideas", 1, reservation)
    assert first is not None
    assert second is not None
    assert balances.bet(user, "ideas", 1, reservation) is None  # both units are counted on
    assert balances.bet(user, "chats", 1, reservation) is None  # per product
    settled = asyncio.ensure_future(balances.settled(user, "ideas"))
    await asyncio.sleep(0)
    commits[0].set_result(1)  # the first committed, leaving 1, which the second counts on
    await asyncio.sleep(0)  # its outcome is noted as it ends
    assert balances.left(user, "ideas") == 1
    assert balances.bet(user, "ideas", 1, reservation) is None
    assert not settled.done()  # the second is still under way
    commits[1].set_result(0)
    await asyncio.sleep(0)
    await asyncio.wait_for(settled, 1)
    assert balances.left(user, "ideas") == 0
    assert balances.bet(user, "ideas", 1, reservation) is None
    await balances.settled(user, "ideas")  # none under way: at once

    balances.note(user, "ideas", 5)
    refused = balances.bet(user, "ideas", 1, reservation)
    assert refused is not None
    commits[-1].set_result(quotas.QuotaExceeded("ideas", retry_after=60))  # another took them
    await asyncio.sleep(0)
    assert balances.left(user, "ideas") == 0

    balances.note(other, "ideas", 5)
    balances.note(user, "ideas", 5)  # noted last: `other` is now the oldest
    balances.note(uuid.uuid4(), "ideas", 5)
    assert balances.left(other, "ideas") is None
    assert balances.left(user, "ideas") == 5


async def test_unlimited_products_never_refuse(make_app: MakeApp, fake_openai: FakeOpenAI) -> None:
    fake_openai.text = VALID
    async with make_app(challenges_daily_quota="unlimited") as served:
        _, token = await create_user(served.client)
        for _ in range(3):
            assert (await generate(served, token)).status_code == 200
        assert (await quota(served, token))["quota_remaining"] is None
        async with served.app.state.sessions() as session:
            assert list(await session.scalars(select(Quota))) == []


async def test_usage_shows_each_product_s_calls_tokens_and_limits(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    user_id, token = await create_user(served.client)
    _, other = await create_user(served.client)
    sse = {"Accept": "text/event-stream", **bearer(token)}
    assert (await served.client.get("/api", headers=sse)).status_code == 200
    fake_openai.text = VALID
    assert (await generate(served, token)).status_code == 200
    fake_openai.fail_with(500, times=1)
    assert (await generate(served, token)).status_code == 503
    assert (await generate(served, other)).status_code == 200

    response = await served.client.get("/api/usage", headers=bearer(token))

    assert response.status_code == 200, response.text
    products = {p["product"]: p for p in response.json()["products"]}
    assert set(products) == {"ideas", "challenges", "images", "chats"}
    challenges = products["challenges"]
    assert challenges["usage"]["requests"] == 2
    assert challenges["usage"]["succeeded"] == 1
    assert challenges["usage"]["failed"] == 1
    assert challenges["usage"]["input_tokens"] == 17  # the fake's prompt tokens, once
    assert challenges["quota"] == {
        **challenges["quota"],
        "unlimited": False,
        "remaining": 49,
        "daily": 10,
        "initial": 50,
    }
    ideas = products["ideas"]
    assert ideas["usage"]["requests"] == 1
    assert ideas["usage"]["output_tokens"] > 0
    assert ideas["quota"]["remaining"] == ideas["quota"]["daily"] - 1
    async with served.app.state.sessions() as session:
        mine = list(await session.scalars(select(UsageRecord)))
    assert {r.outcome for r in mine if str(r.user_id) == user_id} == {"succeeded", "failed"}
    assert all(r.latency_ms >= 0 and r.provider == "openai" for r in mine)
    assert (await served.client.get("/api/usage?days=0", headers=bearer(token))).status_code == 422


async def test_every_provider_a_fallback_chain_tried_is_in_the_ledger(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_with(503)
    chain = {"ideas_model": "openai:gpt-5-nano,offline:offline"}
    async with make_app(challenges_model="openai:gpt-4o-mini,offline:offline", **chain) as served:
        _, token = await create_user(served.client)
        sse = {"Accept": "text/event-stream", **bearer(token)}
        assert (await served.client.get("/api", headers=sse)).status_code == 200
        assert (await generate(served, token)).status_code == 200

        async with served.app.state.sessions() as session:
            rows = list(await session.scalars(select(UsageRecord)))
        calls = sorted((r.product, r.provider, r.outcome, r.error) for r in rows)
        assert calls == [
            ("challenges", "offline", "succeeded", None),
            ("challenges", "openai", "failed", "provider_unavailable"),
            ("ideas", "offline", "succeeded", None),
            ("ideas", "openai", "failed", "provider_unavailable"),
        ]


async def test_a_chain_that_fails_throughout_records_each_try_and_refunds(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_with(503)
    async with make_app(ideas_model="openai:gpt-5-nano,openai:gpt-5-mini") as served:
        _, token = await create_user(served.client)
        response = await served.client.get("/api?format=json", headers=bearer(token))
        assert response.status_code == 503

        async with served.app.state.sessions() as session:
            rows = list(await session.scalars(select(UsageRecord)))
        assert sorted((r.model, r.outcome) for r in rows) == [
            ("gpt-5-mini", "failed"),
            ("gpt-5-nano", "failed"),
        ]
        body = (await served.client.get("/api/usage", headers=bearer(token))).json()
        ideas = next(p for p in body["products"] if p["product"] == "ideas")
        assert ideas["quota"]["remaining"] == ideas["quota"]["initial"]


async def test_several_units_at_once_are_all_or_nothing(served: Served) -> None:
    """Images reserve one unit per image: a request for more than is left takes nothing."""
    user_id, _ = await create_user(served.client)
    policy = QuotaPolicy(initial=2, daily=5)
    clock = FakeClock()
    sessions = served.app.state.sessions

    async def reserve(units: int) -> int | None:
        async with sessions.begin() as session:
            return await quotas.reserve(
                session,
                user_id=uuid.UUID(user_id),
                product="images",
                policy=policy,
                now=clock.now,
                units=units,
            )

    async def balance() -> int | None:
        async with sessions() as session:
            current = await quotas.get_balance(
                session, user_id=uuid.UUID(user_id), product="images", policy=policy, now=clock.now
            )
            return current.remaining

    with pytest.raises(QuotaExceeded):
        await reserve(3)  # a new user starts with 2
    assert await balance() == 2
    assert await reserve(2) == 0
    clock.advance(hours=24)
    assert await reserve(3) == 2  # topped up to 5 first
    with pytest.raises(QuotaExceeded):
        await reserve(3)
    assert await balance() == 2


def _sqlite_file(path: Any, *, echo: bool = False) -> sqlalchemy.Engine:
    """A plain `sqlite3` engine on `path`, as SQLite's writer thread has (`core.db`)."""
    engine = sqlalchemy.create_engine(f"sqlite:///{path}", echo=echo)
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def test_the_writer_thread_s_reservation_stores_what_sqlalchemy_s_execution_would(
    tmp_path: Any,
) -> None:
    """On the writer thread the reservation runs on the driver's cursor (`DriverStatement`);
    step for step it answers, and stores, exactly what SQLAlchemy's execution of it does."""
    plain = _sqlite_file(tmp_path / "q.db")
    echoing = _sqlite_file(tmp_path / "q.db", echo=True)  # every statement logged: no shortcut
    Base.metadata.create_all(plain)
    clock = FakeClock()
    users = {engine: uuid.uuid4() for engine in (plain, echoing)}
    with plain.begin() as connection:
        connection.execute(
            sqlalchemy.insert(User), [{"id": id, "updated_at": clock.now} for id in users.values()]
        )
    policy = QuotaPolicy(initial=2, daily=3)

    def take(engine: sqlalchemy.Engine) -> int | str | None:
        with engine.connect() as connection, connection.begin():
            assert DriverStatement.runs_on(connection) is (engine is plain)
            try:
                return quotas.take(
                    connection, user_id=users[engine], product="ideas", policy=policy, now=clock.now
                )
            except QuotaExceeded as exc:
                return f"refused, retry after {exc.retry_after}"

    def stored(engine: sqlalchemy.Engine) -> tuple[Any, ...]:
        with plain.connect() as connection:  # the raw columns, as SQLite holds them
            row = connection.execute(
                text("SELECT remaining, last_reset_at FROM quota WHERE user_id = :id"),
                {"id": users[engine].hex},
            ).one()
            return tuple(row)

    answers: list[int | str | None] = []
    steps = ("new", "spend", "refused", "next day", "topped up", "spend", "spend", "refused")
    for step in steps:
        if step == "next day":
            clock.advance(hours=24, minutes=1)
            continue
        answer = take(plain)
        assert take(echoing) == answer, step
        assert stored(plain) == stored(echoing), step
        answers.append(answer)
    assert answers == [1, 0, "refused, retry after 86400", 2, 1, 0, "refused, retry after 86400"]
    plain.dispose()
    echoing.dispose()


def test_the_writer_thread_s_reservation_raises_sqlalchemy_s_errors(tmp_path: Any) -> None:
    """A user deleted since this instance cached them: the foreign key fails as SQLAlchemy's
    `IntegrityError`, which the app answers as it answers any (`handle_integrity_error`)."""
    plain = _sqlite_file(tmp_path / "q.db")
    Base.metadata.create_all(plain)
    with plain.connect() as connection, connection.begin():
        assert DriverStatement.runs_on(connection)
        with pytest.raises(IntegrityError):
            quotas.take(
                connection,
                user_id=uuid.uuid4(),
                product="ideas",
                policy=QuotaPolicy(initial=2, daily=3),
                now=FakeClock().now,
            )
    plain.dispose()
