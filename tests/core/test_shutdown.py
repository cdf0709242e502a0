"""A server that stops while streams are open (a deploy): uvicorn waits its graceful timeout (2 s
in these tests), then cancels what is left. Each stream must end in a way its client reads as
cut short, not as complete, and what was produced must be stored before the app closes its
database."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from aihub.chats.models import ChatMessage
from aihub.core.config import Settings
from aihub.core.sse import INTERRUPTED
from aihub.ideas import service as ideas_service
from aihub.ideas.models import Idea
from aihub.main import create_app
from tests.factories import bearer, create_user
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import DEFAULT_TEXT, FakeOpenAI
from tests.fakes.replicate import FakeReplicate
from tests.fakes.server import serve
from tests.sse_clients import fetch_event_source_messages, markdown_buffer


@contextlib.asynccontextmanager
async def stoppable(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """A client of a real server, and `stop()`: stops the server as a deploy does (the client
    stays connected: it is the server that goes)."""
    server = contextlib.AsyncExitStack()
    base_url = await server.enter_async_context(serve(create_app(settings)))
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=15) as client:
            yield client, server.aclose
    finally:
        await server.aclose()


async def read_while_stopping(
    client: httpx.AsyncClient, stop: Callable[[], Any], method: str, url: str, **kwargs: Any
) -> bytes:
    """The whole response body; the server is told to stop once the stream is under way. The
    body must end cleanly: httpx raises on a response cut off mid-way."""
    body = b""
    stopping: asyncio.Task[Any] | None = None
    async with client.stream(method, url, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_bytes():
            body += chunk
            if stopping is None and len(body) > 100:
                stopping = asyncio.create_task(stop())
    assert stopping is not None
    await stopping
    return body


async def test_an_idea_stream_the_server_stops_says_so_and_is_stored(
    make_settings: Callable[..., Settings], fake_openai: FakeOpenAI, db_engine: AsyncEngine
) -> None:
    fake_openai.token_delay = 0.1  # ~9 s of tokens: longer than the graceful timeout
    async with stoppable(make_settings()) as (client, stop):
        _, token = await create_user(client)
        body = await read_while_stopping(client, stop, "GET", "/api", headers=bearer(token))

    rendered = markdown_buffer(body.decode())
    assert rendered.endswith(f"\n\n**Error:** {INTERRUPTED}\n")  # not taken for a whole idea
    partial = rendered.removesuffix(f"\n\n**Error:** {INTERRUPTED}\n")
    assert partial
    assert DEFAULT_TEXT.startswith(partial)
    assert fetch_event_source_messages(body.decode())[-1].event == "error"
    assert b"event: done" not in body

    async with db_engine.connect() as connection:
        ideas = (await connection.execute(select(Idea.status, Idea.error, Idea.content))).all()
    assert [(status, error) for status, error, _ in ideas] == [("incomplete", "interrupted")]
    assert DEFAULT_TEXT.startswith(ideas[0].content)
    assert ideas[0].content.startswith(partial)  # all it produced, stored
    async with db_engine.connect() as connection:
        left = (await connection.execute(text("SELECT remaining FROM quota"))).scalars().all()
    assert left == [make_settings().ideas_daily_quota]  # the server's doing: given back


async def test_a_stopping_server_waits_for_a_cancelled_stream_to_store_its_answer(
    make_settings: Callable[..., Settings],
    fake_openai: FakeOpenAI,
    db_engine: AsyncEngine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The app's own shutdown (closing the database) comes right after uvicorn cancels the
    streams: it must wait for them to finish storing what they had."""
    save = ideas_service._save

    async def slow_save(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(1)  # a busy database
        await save(*args, **kwargs)

    monkeypatch.setattr(ideas_service, "_save", slow_save)
    fake_openai.token_delay = 0.1
    async with stoppable(make_settings()) as (client, stop):
        _, token = await create_user(client)
        async with client.stream("GET", "/api", headers=bearer(token)) as response:
            chunks = response.aiter_bytes()  # kept: dropping it would close the response
            await anext(chunks)  # under way
            await stop()  # back once the app has shut down, as the process would then end
            async with db_engine.connect() as connection:
                errors = (await connection.execute(select(Idea.error))).scalars().all()
    assert errors == ["interrupted"]


async def test_a_byok_reply_the_server_stops_ends_with_a_readable_line(
    make_settings: Callable[..., Settings], fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.1
    body = {
        "developer_message": "You are a helpful assistant.",
        "user_message": "What is a monad?",
        "chat_history": [],
        "api_key": "sk-proj-" + "x" * 40,
    }
    async with stoppable(make_settings(byok_rate_limit="unlimited")) as (client, stop):
        text = await read_while_stopping(client, stop, "POST", "/api/chat", json=body)

    partial, _, notice = text.decode().partition("\n\n[The reply was cut short: ")
    assert DEFAULT_TEXT.startswith(partial)
    assert notice == f"{INTERRUPTED}]\n"


async def test_a_chat_reply_the_server_stops_says_so_and_is_stored(
    make_settings: Callable[..., Settings],
    fake_gemini: FakeGemini,
    fake_clerk: Any,
    db_engine: AsyncEngine,
) -> None:
    fake_gemini.text = " ".join(f"word{i}" for i in range(200))
    fake_gemini.token_delay = 0.05
    token = fake_clerk.template_token("user_stopping", email="stopping@example.com")
    request = {"messages": [{"role": "user", "parts": [{"text": "Tell me a long story"}]}]}
    async with stoppable(make_settings()) as (client, stop):
        body = await read_while_stopping(
            client, stop, "POST", "/chat", json=request, headers=bearer(token)
        )

    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert lines[-1] == {"error": INTERRUPTED, "code": "interrupted"}
    streamed = "".join(line.get("response", "") for line in lines)
    assert streamed
    assert fake_gemini.text.startswith(streamed)

    async with db_engine.connect() as connection:
        replies = (
            await connection.execute(
                select(ChatMessage.status, ChatMessage.error, ChatMessage.content).where(
                    ChatMessage.role == "assistant"
                )
            )
        ).all()
    assert [(status, error) for status, error, _ in replies] == [("incomplete", "interrupted")]
    assert replies[0].content.startswith(streamed)


async def test_an_image_job_stream_the_server_stops_just_ends(
    make_settings: Callable[..., Settings],
    fake_replicate: FakeReplicate,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An `error` event would say the job failed, and it goes on: the stream just ends, cleanly
    (an EventSource reconnects, with Last-Event-ID, to an instance that is up)."""
    fake_replicate.image_delay = 10
    async with stoppable(make_settings()) as (client, stop):
        _, token = await create_user(client)
        job = await client.post(
            "/api/generate/", json={"prompt": "a fox", "num_images": 1}, headers=bearer(token)
        )
        body = b""
        async with client.stream("GET", f"/api/generate/{job.json()['job_id']}/stream") as response:
            chunks = response.aiter_bytes()  # kept: dropping it would close the response
            body += await anext(chunks)
            stopping = asyncio.create_task(stop())
            async for chunk in chunks:
                body += chunk
            await stopping

    assert b"event: progress" in body
    assert b"event: error" not in body
    assert b"event: done" not in body
    assert "Exception in ASGI application" not in caplog.text
