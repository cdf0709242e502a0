"""Bring-your-own-key chat over a real server, against the OpenAI fake: the original frontend's
contract, honest validation, upstream rejections before the first byte, and a key that never
leaks anywhere."""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from aihub.core.config import Settings
from aihub.core.db import Base
from aihub.core.logging import JsonFormatter
from aihub.providers.openai import OPENAI_API_URL
from aihub.providers.routing import ProviderRegistry
from tests.conftest import MakeApp, Served
from tests.fakes.openai import DEFAULT_TEXT, FakeOpenAI
from tests.sse_clients import event_source_events


def new_key() -> str:
    return "sk-proj-" + secrets.token_urlsafe(32).replace("-", "x")


KEY = new_key()


def chat_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "developer_message": "You are a helpful assistant.",
        "user_message": "What is a monad?",
        "chat_history": [],
        "model": "gpt-4.1-mini",
        "api_key": KEY,
    }
    return {**body, **changes}


async def chat(client: httpx.AsyncClient, body: dict[str, Any], **headers: str) -> httpx.Response:
    return await client.post("/api/chat", json=body, headers=headers)


@pytest.fixture
async def served_byok(make_app: MakeApp) -> Any:
    async with make_app(byok_rate_limit="unlimited") as served:
        yield served


async def test_the_reply_streams_as_plain_text_the_client_appends(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    response = await chat(served_byok.client, chat_body())

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-aihub-provider"] == "openai:gpt-4.1-mini"
    assert response.text == DEFAULT_TEXT
    sent = fake_openai.last_request
    assert sent.headers["authorization"] == f"Bearer {KEY}"  # the caller's key, not the server's
    assert sent.json["model"] == "gpt-4.1-mini"
    assert sent.json["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is a monad?"},
    ]


async def test_the_sse_variant_has_explicit_done_with_usage(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    response = await chat(served_byok.client, chat_body(), accept="text/event-stream")

    assert response.headers["content-type"].startswith("text/event-stream")
    events = event_source_events(response.text)
    text = "".join(e.data["text"] for e in events if e.event == "delta")  # type: ignore[index]
    assert text == DEFAULT_TEXT
    done = events[-1]
    assert done.event == "done"
    assert done.data == {
        "model": "gpt-4.1-mini",
        "usage": {"input_tokens": 17, "output_tokens": len(fake_openai.tokens)},
    }


async def test_history_as_the_client_sends_it(served_byok: Served, fake_openai: FakeOpenAI) -> None:
    history = [
        {"id": "1", "role": "user", "content": "Hi", "timestamp": "2026-11-22T08:00:00Z"},
        {"id": "2", "role": "ai", "content": "", "timestamp": "2026-11-22T08:00:01Z"},
        {"id": "3", "role": "ai", "content": "Hello! <b>How</b> can I help?", "extra": [1]},
        {"id": "4", "role": "user", "content": "   "},
    ]
    code = 'if a < b && c > d: print("it\'s \\"quoted\\"")  # <script>alert(1)</script>'

    response = await chat(
        served_byok.client, chat_body(chat_history=history, user_message=code, model=None)
    )

    assert response.status_code == 200
    sent = fake_openai.last_request.json
    assert sent["model"] == "gpt-4.1-mini"  # the first allowed model when none is asked for
    assert sent["messages"][1:] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! <b>How</b> can I help?"},
        {"role": "user", "content": code},  # unchanged: nothing stripped or escaped
    ]


async def test_a_long_history_is_windowed_to_its_most_recent_entries(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    history = [
        {"role": "user" if i % 2 == 0 else "ai", "content": f"message {i}"} for i in range(70)
    ]

    response = await chat(served_byok.client, chat_body(chat_history=history))

    assert response.status_code == 200
    sent = fake_openai.last_request.json["messages"]
    assert len(sent) == 1 + 50 + 1
    assert sent[1]["content"] == "message 20"
    assert sent[-2]["content"] == "message 69"


async def test_a_conversation_longer_than_the_usual_body_limit_still_gets_answered(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    """The client never trims its history: 80 long replies (1.2 MB, over `MAX_REQUEST_BODY_BYTES`)
    must not make the chat one nobody can write to, nor one reply longer than any other."""
    history = [
        {"role": "user" if i % 2 == 0 else "ai", "content": f"{i}:" + "x" * 15_000}
        for i in range(80)
    ]
    history[-1]["content"] = "a very long reply " * 20_000  # 360,000 characters

    response = await chat(served_byok.client, chat_body(chat_history=history))

    assert response.status_code == 200
    assert response.text == DEFAULT_TEXT
    assert fake_openai.last_request.json["messages"][-2]["content"] == history[-1]["content"]


async def test_the_window_follows_the_setting(make_app: MakeApp, fake_openai: FakeOpenAI) -> None:
    async with make_app(byok_max_history=2, byok_rate_limit="unlimited") as served:
        history = [{"role": "user", "content": f"m{i}"} for i in range(5)]
        assert (await chat(served.client, chat_body(chat_history=history))).status_code == 200
        contents = [m["content"] for m in fake_openai.last_request.json["messages"]]
        assert contents == ["You are a helpful assistant.", "m3", "m4", "What is a monad?"]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"user_message": ""}, "user_message"),
        ({"user_message": " \n\t "}, "user_message"),
        ({"user_message": "x" * 10_001}, "user_message"),
        ({"developer_message": "x" * 10_001}, "developer_message"),
        ({"model": "gpt-4o"}, "model"),
        ({"model": "GPT-4.1-MINI"}, "model"),
        ({"api_key": "not-a-key"}, "api_key"),
        ({"api_key": "sk-short"}, "api_key"),
        ({"api_key": "sk-has spaces in it 1234567890"}, "api_key"),
        ({"api_key": ""}, "api_key"),
        ({"api_key": "sk-" + "a" * 30 + "\n"}, "api_key"),  # would be a header injection
        ({"chat_history": [{"role": "system", "content": "x"}]}, "chat_history"),
        ({"chat_history": "not a list"}, "chat_history"),
    ],
)
async def test_invalid_input_is_a_422_naming_the_field(
    served_byok: Served, fake_openai: FakeOpenAI, changes: dict[str, Any], field: str
) -> None:
    response = await chat(served_byok.client, chat_body(**changes))

    assert response.status_code == 422
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail.startswith(field)
    assert fake_openai.requests == []


async def test_missing_fields_are_named(served_byok: Served) -> None:
    response = await served_byok.client.post("/api/chat", json={"user_message": "hi"})
    assert response.status_code == 422
    assert "api_key" in response.json()["detail"]


async def test_ten_thousand_characters_are_fine(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    response = await chat(served_byok.client, chat_body(user_message="y" * 10_000))
    assert response.status_code == 200
    assert fake_openai.last_request.json["messages"][-1]["content"] == "y" * 10_000


@pytest.mark.parametrize(
    ("upstream", "status", "code"),
    [
        (401, 401, "provider_auth_failed"),
        (429, 429, "provider_rate_limited"),
        (404, 404, "provider_model_not_found"),
        (500, 503, "provider_unavailable"),
    ],
)
async def test_upstream_rejections_arrive_before_the_stream_with_their_status(
    served_byok: Served, fake_openai: FakeOpenAI, upstream: int, status: int, code: str
) -> None:
    fake_openai.fail_with(upstream, retry_after=7 if upstream == 429 else None)

    response = await chat(served_byok.client, chat_body())

    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == code
    assert isinstance(response.json()["detail"], str)
    if upstream == 429:
        assert response.headers["retry-after"] == "7"


async def test_a_wrong_key_is_a_401_that_does_not_repeat_it(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.require_api_key = new_key()  # OpenAI's 401 quotes part of the key it refused

    response = await chat(served_byok.client, chat_body())

    assert response.status_code == 401
    assert response.json()["detail"] == "OpenAI rejected the API key"
    assert KEY[-4:] not in response.text


async def test_an_empty_answer_is_not_passed_off_as_one(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.tokens = ["  "]

    response = await chat(served_byok.client, chat_body())

    assert response.status_code == 200  # the answer had begun: its end says what went wrong
    assert response.text.startswith("  \n\n[The reply was cut short: The model answered with no")


@pytest.mark.parametrize("mode", ["error", "drop"])
async def test_a_reply_cut_short_says_so(
    served_byok: Served, fake_openai: FakeOpenAI, mode: Any
) -> None:
    fake_openai.fail_mid_stream(5, mode=mode)

    text = await chat(served_byok.client, chat_body())
    sse = await chat(served_byok.client, chat_body(), accept="text/event-stream")

    assert text.status_code == 200
    assert text.text.startswith("".join(fake_openai.tokens[:5]))
    assert text.text.rstrip().endswith("]")
    assert "[The reply was cut short:" in text.text
    last = event_source_events(sse.text)[-1]
    assert last.event == "error"
    assert last.data["code"].startswith("provider")  # type: ignore[index]


async def test_a_client_that_leaves_closes_the_upstream_request(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.2
    async with served_byok.client.stream("POST", "/api/chat", json=chat_body()) as response:
        async for _ in response.aiter_bytes():
            break  # the first bytes are in: leave
    await asyncio.wait_for(fake_openai.disconnected.wait(), timeout=3)
    assert fake_openai.stats.completed == 0


async def test_the_upstream_is_the_server_s_setting_not_the_caller_s(
    served_byok: Served, fake_openai: FakeOpenAI
) -> None:
    response = await chat(served_byok.client, chat_body(base_url="http://attacker.example/v1"))
    assert response.status_code == 200
    assert len(fake_openai.requests) == 1  # it went to BYOK_BASE_URL, the fake


async def test_callers_keys_go_to_byok_base_url_not_to_openai_base_url(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    """OPENAI_BASE_URL is where the server's own key goes (maybe a server that checks no keys):
    callers' keys must not be relayed there."""
    async with make_app(
        openai_base_url="http://127.0.0.1:9/v1", byok_base_url=fake_openai.base_url
    ) as served:
        response = await chat(served.client, chat_body())
    assert response.status_code == 200
    assert len(fake_openai.requests) == 1


async def test_without_byok_base_url_callers_keys_go_to_openai_whatever_the_environment(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given no base URL the SDK would read the process's OPENAI_BASE_URL.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:11434/v1")
    registry = ProviderRegistry(make_settings(byok_base_url=None))
    try:
        assert registry.byok is not None
        assert registry.byok.base_url.rstrip("/") == OPENAI_API_URL
    finally:
        await registry.aclose()


async def test_switched_off_there_is_no_route(make_app: MakeApp, fake_openai: FakeOpenAI) -> None:
    async with make_app(byok_enabled=False) as served:
        response = await chat(served.client, chat_body())
        schema = (await served.client.get("/openapi.json")).json()
        health = (await served.client.get("/api/health")).json()
    assert response.status_code == 404
    assert fake_openai.requests == []
    assert "/api/chat" not in schema["paths"]
    assert health["products"]["byok"] == {"enabled": False}


# --- the key never leaks -------------------------------------------------------------------------


@pytest.fixture
def all_logs() -> Iterator[tuple[list[logging.LogRecord], io.StringIO]]:
    """Every record at DEBUG, from every logger (the noisy ones too), raw and as aihub writes it."""
    records: list[logging.LogRecord] = []
    written = io.StringIO()

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep, write = Keep(logging.DEBUG), logging.StreamHandler(written)
    write.setFormatter(JsonFormatter())
    root = logging.getLogger()
    loggers = [root, *(logging.getLogger(n) for n in ("httpx", "httpcore", "openai", "uvicorn"))]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    root.addHandler(keep)
    root.addHandler(write)
    try:
        yield records, written
    finally:
        root.removeHandler(keep)
        root.removeHandler(write)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


async def test_a_canary_key_never_appears_in_logs_responses_or_the_database(
    served_byok: Served,
    fake_openai: FakeOpenAI,
    all_logs: tuple[list[logging.LogRecord], io.StringIO],
) -> None:
    canary = new_key()
    client = served_byok.client
    responses = [
        await chat(client, chat_body(api_key=canary)),
        await chat(client, chat_body(api_key=canary), accept="text/event-stream"),
        await chat(client, chat_body(api_key=canary, model="gpt-nope")),
        await chat(client, chat_body(api_key=canary, user_message="")),
        await chat(client, chat_body(api_key=canary + " trailing")),  # an invalid key
        await chat(client, chat_body(api_key=canary, chat_history=[{"role": "x"}])),
        await client.post("/api/chat", content=f'{{"api_key": "{canary}", broken'),
    ]
    fake_openai.require_api_key = new_key()
    responses.append(await chat(client, chat_body(api_key=canary)))
    fake_openai.require_api_key = None
    for status in (429, 404, 500, 400):
        fake_openai.fail_with(status, body={"error": {"message": f"echo {canary}"}}, times=1)
        responses.append(await chat(client, chat_body(api_key=canary)))
    fake_openai.fail_mid_stream(3, mode="drop")
    responses.append(await chat(client, chat_body(api_key=canary)))
    fake_openai.fail_mid_stream(3, mode="error")
    responses.append(await chat(client, chat_body(api_key=canary), accept="text/event-stream"))

    assert {r.status_code for r in responses} >= {200, 401, 404, 422, 429, 503}
    for response in responses:
        assert canary not in response.text
        assert canary[-8:] not in response.text
        assert all(canary not in value for value in response.headers.values())
    records, written = all_logs
    assert records, "the log capture saw nothing"
    for record in records:
        raw = record.getMessage() + repr(record.args) + repr(record.__dict__)
        assert canary not in raw, f"{record.name}: {record.getMessage()}"
    assert canary not in written.getvalue()
    async with served_byok.app.state.sessions() as session:
        for table in Base.metadata.sorted_tables:
            rows = (await session.execute(select(table))).all()
            assert canary not in repr(rows), table.name
