"""The business-idea stream over a real server, read the way the original client reads it."""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from aihub.ideas import service
from aihub.ideas.service import CUT_SHORT, NOT_STORED
from tests.conftest import MakeApp, Served
from tests.factories import bearer, create_user
from tests.fakes.openai import DEFAULT_TEXT, FakeOpenAI
from tests.sse_clients import (
    event_source_events,
    fetch_event_source_messages,
    markdown_buffer,
)

SSE_HEADERS = {"Accept": "text/event-stream"}


async def read_stream(client: httpx.AsyncClient, token: str, **params: str) -> httpx.Response:
    return await client.get("/api", params=params, headers={**SSE_HEADERS, **bearer(token)})


async def test_markdown_rendered_by_the_original_client_equals_the_model_text(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    _, token = await create_user(served.client)
    response = await read_stream(served.client, token)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache, no-transform"
    assert response.headers["x-accel-buffering"] == "no"
    assert markdown_buffer(response.text) == DEFAULT_TEXT
    last = fetch_event_source_messages(response.text)[-1]
    assert (last.event, last.data) == ("done", "")
    assert "{" not in response.text  # no JSON in the default stream
    sent = fake_openai.last_request.json
    assert sent["model"] == "gpt-5-nano"
    assert sent["stream"] is True
    assert sent["messages"][-1]["role"] == "user"
    assert "business idea" in sent["messages"][-1]["content"]


async def test_markdown_survives_tokens_that_start_with_newlines(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.tokens = ["#", " Title", "\n\n", "\n##", " Sub", "\n", "- a", "\n\n\n", "x", "\n"]
    _, token = await create_user(served.client)
    response = await read_stream(served.client, token)
    assert markdown_buffer(response.text) == "".join(fake_openai.tokens)


async def test_json_variant_names_events_and_reports_the_stored_idea(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.prompt_tokens = 21
    _, token = await create_user(served.client)
    response = await read_stream(served.client, token, format="json")

    events = event_source_events(response.text)
    deltas = [e for e in events if e.event == "delta"]
    assert "".join(e.data["text"] for e in deltas) == DEFAULT_TEXT  # type: ignore[index]
    done = events[-1]
    # Each delta's id says how much of which idea the client has (for `Last-Event-ID`).
    assert isinstance(done.data, dict)
    written = 0
    for delta in deltas:
        written += len(delta.data["text"])  # type: ignore[index]
        assert delta.id == f"{done.data['idea_id']}:{written}"
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    assert done.event == "done"
    assert isinstance(done.data, dict)
    assert done.data["provider"] == "openai"
    assert done.data["model"] == "gpt-5-nano"
    assert done.data["usage"] == {"input_tokens": 21, "output_tokens": len(fake_openai.tokens)}

    stored = await served.client.get(f"/api/ideas/{done.data['idea_id']}", headers=bearer(token))
    assert stored.status_code == 200
    assert stored.json()["content"] == DEFAULT_TEXT
    assert stored.json()["status"] == "complete"
    assert stored.json()["input_tokens"] == 21


async def test_the_idea_and_its_usage_row_are_stored_in_one_statement_on_postgresql(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    """They are written after every idea: on PostgreSQL one autocommitted statement, one round
    trip, rather than BEGIN, two INSERTs and COMMIT."""
    fake_openai.prompt_tokens = 21
    _, token = await create_user(served.client)
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    event.listen(Engine, "before_cursor_execute", record)
    try:
        response = await read_stream(served.client, token, format="json")
    finally:
        event.remove(Engine, "before_cursor_execute", record)

    assert event_source_events(response.text)[-1].event == "done"
    writes = [s for s in statements if s.lstrip().upper().startswith(("INSERT", "WITH"))]
    stored = [s for s in writes if "INSERT INTO idea " in s]
    assert len(stored) == 1
    if (served.settings.database_url or "").startswith("postgresql"):
        assert "INSERT INTO usage_record " in stored[0]
        assert len(writes) == 2  # and the quota reservation
    else:
        assert any("INSERT INTO usage_record " in s for s in writes)
    usage = (await served.client.get("/api/usage", headers=bearer(token))).json()
    ideas = next(p for p in usage["products"] if p["product"] == "ideas")
    assert ideas["usage"]["requests"] == 1
    assert ideas["usage"]["input_tokens"] == 21
    listed = (await served.client.get("/api/ideas", headers=bearer(token))).json()["items"]
    assert [idea["content"] for idea in listed] == [DEFAULT_TEXT]


async def test_history_is_paginated_and_private(served: Served) -> None:
    _, alice = await create_user(served.client)
    _, bob = await create_user(served.client)
    for _ in range(3):
        assert (await read_stream(served.client, alice)).status_code == 200

    first = (await served.client.get("/api/ideas?limit=2", headers=bearer(alice))).json()
    assert len(first["items"]) == 2
    second = await served.client.get(
        "/api/ideas", params={"limit": 2, "cursor": first["next_cursor"]}, headers=bearer(alice)
    )
    assert len(second.json()["items"]) == 1
    assert second.json()["next_cursor"] is None
    ids = [i["id"] for i in first["items"] + second.json()["items"]]
    assert len(set(ids)) == 3

    assert (await served.client.get("/api/ideas", headers=bearer(bob))).json()["items"] == []
    other = await served.client.get(f"/api/ideas/{ids[0]}", headers=bearer(bob))
    assert other.status_code == 404
    assert other.json()["error"] == "not_found"
    naive = base64.urlsafe_b64encode(f"2030-01-01T00:00:00|{ids[0]}".encode()).decode()
    for cursor in ("zzz", naive, "//8"):
        bad_cursor = await served.client.get(
            "/api/ideas", params={"cursor": cursor}, headers=bearer(alice)
        )
        assert bad_cursor.status_code == 422
        assert isinstance(bad_cursor.json()["detail"], str)


def assert_markdown_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/event-stream")
    rendered = markdown_buffer(response.text)
    assert words.lower() in rendered.lower()
    assert "\n" not in rendered.strip()  # one readable line


async def test_errors_before_the_stream_are_event_stream_text(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    async with make_app(ideas_required_plan="premium_subscription") as served:
        client = served.client
        assert_markdown_error(await client.get("/api", headers=SSE_HEADERS), 401, "authenticated")
        bad = await client.get("/api", headers={**SSE_HEADERS, **bearer("not-a-jwt")})
        assert_markdown_error(bad, 401, "token")
        _, token = await create_user(client)
        assert_markdown_error(await read_stream(client, token), 403, "premium_subscription")


async def test_a_wire_format_it_does_not_know_is_a_422_in_the_client_s_own_form(
    served: Served,
) -> None:
    """`?format` is checked after the token (a stranger learns nothing about the route), as
    Markdown for the original client, and never repeats what was sent."""
    client = served.client
    unknown = await client.get("/api?format=x%3Csecret%3E", headers=SSE_HEADERS)
    assert_markdown_error(unknown, 401, "authenticated")
    _, token = await create_user(client)
    markdown = await read_stream(client, token, format="x<secret>")
    assert_markdown_error(markdown, 422, "query.format: Input should be 'markdown' or 'json'")
    assert "secret" not in markdown.text
    # The last of repeated values counts, as for any query parameter.
    twice = await client.get("/api?format=x&format=json", headers=bearer(token))
    assert twice.status_code == 200
    assert "event: delta" in twice.text  # the JSON variant's named events
    assert "event: done" in twice.text


async def test_the_stream_s_inputs_are_documented(served: Served) -> None:
    operation = (await served.client.get("/openapi.json")).json()["paths"]["/api"]["get"]
    assert operation["security"] == [{"HTTPBearer": []}]
    parameters = {(p["in"], p["name"]): p for p in operation["parameters"]}
    assert set(parameters) == {("query", "format"), ("header", "last-event-id")}
    wire = parameters["query", "format"]
    assert wire["required"] is False
    assert wire["schema"]["enum"] == ["markdown", "json"]
    assert wire["schema"]["default"] == "markdown"
    assert parameters["header", "last-event-id"]["required"] is False
    assert all(p["description"] for p in parameters.values())


@pytest.mark.parametrize(
    ("upstream", "status", "words"),
    [(429, 429, "openai"), (500, 503, "openai"), (401, 502, "openai")],
)
async def test_provider_errors_before_the_stream(
    served: Served, fake_openai: FakeOpenAI, upstream: int, status: int, words: str
) -> None:
    fake_openai.fail_with(upstream, retry_after="7" if upstream == 429 else None)
    _, token = await create_user(served.client)
    response = await read_stream(served.client, token)
    assert_markdown_error(response, status, words)
    if upstream == 429:
        assert response.headers["retry-after"] == "7"
    json_variant = await read_stream(served.client, token, format="json")
    assert json_variant.status_code == status
    assert json_variant.json()["error"].startswith("provider_")
    assert "sk-test" not in response.text + json_variant.text


async def test_the_providers_words_about_the_server_s_account_are_logged_not_shown(
    served: Served, fake_openai: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    account = "Rate limit reached for gpt-5-nano in organization org-Hidden123"
    fake_openai.fail_with(429, {"error": {"message": account, "type": "requests"}})
    _, token = await create_user(served.client)

    with caplog.at_level(logging.WARNING, logger="aihub"):
        response = await read_stream(served.client, token)

    assert_markdown_error(response, 429, "rate limiting")
    assert "org-Hidden123" not in response.text
    [failed] = [r for r in caplog.records if r.getMessage() == "provider failed"]
    assert failed.detail == account  # type: ignore[attr-defined]


async def test_fallback_chain_serves_from_the_next_provider(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_with(503)
    async with make_app(ideas_model="openai:gpt-5-nano,gemini:gemini-2.5-flash") as served:
        _, token = await create_user(served.client)
        response = await read_stream(served.client, token, format="json")
        done = event_source_events(response.text)[-1]
        assert done.event == "done"
        assert done.data["provider"] == "gemini"  # type: ignore[index]


async def test_failure_mid_stream_says_so_and_keeps_the_partial_idea(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_mid_stream(5)
    _, token = await create_user(served.client)
    response = await read_stream(served.client, token)
    assert response.status_code == 200
    rendered = markdown_buffer(response.text)
    assert "**Error:**" in rendered
    assert "event: done" not in response.text
    partial = "".join(fake_openai.tokens[:5])
    assert rendered.startswith(partial)

    ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()["items"]
    assert len(ideas) == 1
    assert ideas[0]["status"] == "incomplete"
    assert ideas[0]["content"] == partial
    assert ideas[0]["error"].startswith("provider_")

    fake_openai.fail_mid_stream(3)
    json_variant = await read_stream(served.client, token, format="json")
    last = event_source_events(json_variant.text)[-1]
    assert last.event == "error"
    assert last.data["partial"] is True  # type: ignore[index]


@pytest.mark.parametrize("resume_seconds", [0, 0.3])
async def test_client_disconnect_stops_upstream_and_saves_partial_idea(
    make_app: MakeApp, fake_openai: FakeOpenAI, resume_seconds: float
) -> None:
    """At once, or once nobody came back for the rest within IDEAS_RESUME_SECONDS."""
    fake_openai.token_delay = 0.05
    async with make_app(ideas_resume_seconds=resume_seconds) as served:
        _, token = await create_user(served.client)
        async with served.client.stream("GET", "/api", headers=bearer(token)) as response:
            received = b""
            async for chunk in response.aiter_bytes():
                received += chunk
                if received.count(b"data: ") >= 3:
                    break
        left = asyncio.get_running_loop().time()
        await asyncio.wait_for(fake_openai.disconnected.wait(), timeout=5)
        assert asyncio.get_running_loop().time() - left >= resume_seconds * 0.9

        for _ in range(50):
            ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()
            if ideas := ideas["items"]:
                break
            await asyncio.sleep(0.05)
    assert len(ideas) == 1
    assert ideas[0]["status"] == "incomplete"
    assert ideas[0]["error"] == "client_disconnected"
    assert ideas[0]["content"]
    assert DEFAULT_TEXT.startswith(ideas[0]["content"])
    assert len(ideas[0]["content"]) < len(DEFAULT_TEXT)


async def test_client_leaving_before_the_first_token_stops_the_upstream(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.first_token_delay = 5
    _, token = await create_user(served.client)
    request = asyncio.create_task(served.client.get("/api", headers=bearer(token)))
    while fake_openai.stats.started == 0:  # the upstream stream is open, its first token pending
        await asyncio.sleep(0.01)
    request.cancel()  # the client goes away
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(fake_openai.disconnected.wait(), timeout=3)
    ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()["items"]
    assert ideas == []


async def test_offline_when_no_key(make_app: MakeApp) -> None:
    async with make_app(openai_api_key=None) as served:
        health = (await served.client.get("/api/health")).json()
        assert health["products"]["ideas"]["provider"] == "offline"
        assert health["products"]["ideas"]["offline"] is True
        _, token = await create_user(served.client)
        response = await read_stream(served.client, token, format="json")
        done = event_source_events(response.text)[-1]
        assert done.data["provider"] == "offline"  # type: ignore[index]
        assert response.headers["x-aihub-provider"] == "offline:offline"
        assert health["products"]["ideas"]["configured"] == "openai:gpt-5-nano"
        text = "".join(
            e.data["text"]  # type: ignore[index]
            for e in event_source_events(response.text)
            if e.event == "delta"
        )
        assert text.startswith("# ")


async def test_a_thinking_model_s_stream_starts_at_once_and_is_kept_alive(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    """A reasoning model may think for a long while before its first token: the response starts
    as soon as the provider has taken the request, and keep-alives fill the silence (a proxy
    with an idle timeout would otherwise cut the request)."""
    fake_openai.first_token_delay = 1.5
    loop = asyncio.get_running_loop()
    async with make_app(sse_keepalive_seconds=0.3) as served:
        _, token = await create_user(served.client)
        started = loop.time()
        async with served.client.stream(
            "GET", "/api", headers={**SSE_HEADERS, **bearer(token)}
        ) as response:
            headers_after = loop.time() - started
            body = (await response.aread()).decode()

    assert response.status_code == 200
    assert headers_after < 1.0
    assert body.startswith(": keep-alive\n\n")
    assert markdown_buffer(body) == DEFAULT_TEXT


async def test_a_provider_failing_after_taking_the_request_but_before_any_text(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    """The response has started, so the failure is the stream's error line; there is no idea to
    keep, so none is stored and the unit is given back, as for a failure to open."""
    fake_openai.fail_mid_stream(0)
    _, token = await create_user(served.client)

    response = await read_stream(served.client, token)
    json_variant = await read_stream(served.client, token, format="json")

    assert response.status_code == 200
    assert markdown_buffer(response.text).startswith("**Error:**")
    last = event_source_events(json_variant.text)[-1]
    assert last.event == "error"
    assert last.data["partial"] is False  # type: ignore[index]
    ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()["items"]
    assert ideas == []
    quota = await served.app.state.sessions.write(
        lambda connection: connection.exec_driver_sql(
            "SELECT remaining FROM quota WHERE product = 'ideas'"
        ).scalar_one()
    )
    assert quota == served.settings.ideas_daily_quota


# --- a client that comes back (its tab was hidden, then shown) --------------------------------


async def read_some(
    client: httpx.AsyncClient, token: str, events: int, **params: str
) -> tuple[str, str]:
    """Read `events` events, then leave as fetch-event-source does when its tab is hidden: the
    raw text read, and the last event id seen."""
    raw = ""
    async with client.stream(
        "GET", "/api", params=params, headers={**SSE_HEADERS, **bearer(token)}
    ) as response:
        async for chunk in response.aiter_text():
            raw += chunk
            if raw.count("\n\n") >= events:
                break
    messages = fetch_event_source_messages(raw)
    return raw, next(m.id for m in reversed(messages) if m.id)


async def come_back(
    client: httpx.AsyncClient, token: str, last_event_id: str, **params: str
) -> httpx.Response:
    headers = {**SSE_HEADERS, **bearer(token), "Last-Event-ID": last_event_id}
    return await client.get("/api", params=params, headers=headers)


async def ideas_used(served: Served) -> int:
    """Units of today's ideas quota spent."""
    assert served.settings.ideas_daily_quota is not None
    remaining: int = await served.app.state.sessions.write(
        lambda connection: connection.exec_driver_sql(
            "SELECT remaining FROM quota WHERE product = 'ideas'"
        ).scalar_one()
    )
    return served.settings.ideas_daily_quota - remaining


async def test_a_client_that_comes_back_gets_the_rest_of_the_same_idea_at_no_charge(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.02
    _, token = await create_user(served.client)
    first, last_id = await read_some(served.client, token, 8)
    await asyncio.sleep(0.1)  # away for a moment: the idea is still being written

    rest = await come_back(served.client, token, last_id)

    assert rest.status_code == 200
    assert markdown_buffer(first) + markdown_buffer(rest.text) == DEFAULT_TEXT
    assert fetch_event_source_messages(rest.text)[-1].event == "done"
    assert len(fake_openai.requests) == 1  # the provider was not asked again
    ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()["items"]
    assert [(i["status"], i["content"]) for i in ideas] == [("complete", DEFAULT_TEXT)]
    assert await ideas_used(served) == 1


async def test_the_json_variant_comes_back_the_same_way(
    served: Served, fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.02
    _, token = await create_user(served.client)
    first, last_id = await read_some(served.client, token, 5, format="json")

    rest = await come_back(served.client, token, last_id, format="json")

    events = event_source_events(first) + event_source_events(rest.text)
    text = "".join(e.data["text"] for e in events if e.event == "delta")  # type: ignore[index]
    assert text == DEFAULT_TEXT
    assert [e.event for e in events[-2:]] == ["usage", "done"]
    assert len(fake_openai.requests) == 1


async def test_coming_back_too_late_shows_the_stored_part_and_says_it_was_cut_short(
    make_app: MakeApp, fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.05
    async with make_app(ideas_resume_seconds=0.1) as served:
        _, token = await create_user(served.client)
        first, last_id = await read_some(served.client, token, 4)
        await asyncio.wait_for(fake_openai.disconnected.wait(), timeout=5)
        for _ in range(50):  # until the partial idea is stored
            ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()
            if ideas["items"]:
                break
            await asyncio.sleep(0.05)

        rest = await come_back(served.client, token, last_id)

        shown = markdown_buffer(first) + markdown_buffer(rest.text)
        stored = ideas["items"][0]["content"]
        assert shown.startswith(stored)
        assert shown.endswith(f"**Error:** {CUT_SHORT}\n")
        assert len(fake_openai.requests) == 1
        assert await ideas_used(served) == 1


@pytest.mark.parametrize("last_event_id", ["someone-else", "not-an-id", f"{uuid.uuid4()}:3"])
async def test_an_id_that_is_not_one_of_the_caller_s_ideas_gets_a_new_idea(
    served: Served, fake_openai: FakeOpenAI, last_event_id: str
) -> None:
    if last_event_id == "someone-else":
        _, other = await create_user(served.client)
        _, last_event_id = await read_some(served.client, other, 3)
    _, token = await create_user(served.client)

    response = await come_back(served.client, token, last_event_id)

    assert markdown_buffer(response.text) == DEFAULT_TEXT
    assert fake_openai.requests[-1].json["stream"] is True
    ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()["items"]
    assert len(ideas) == 1


async def test_an_idea_that_cannot_be_stored_says_so(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_gone(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("INSERT", {}, Exception("the database went away"))

    _, token = await create_user(served.client)
    monkeypatch.setattr(service, "insert_with_usage", database_gone)

    markdown = await read_stream(served.client, token)
    json_variant = await read_stream(served.client, token, format="json")

    shown = markdown_buffer(markdown.text)
    assert shown.startswith(DEFAULT_TEXT)
    assert shown.endswith(f"\n\n**Error:** {NOT_STORED}\n")
    last = event_source_events(json_variant.text)[-1]
    assert (last.event, last.data["code"]) == ("error", "not_stored")  # type: ignore[index]


@pytest.mark.parametrize(
    ("tokens", "finish", "code"),
    [
        ([], "stop", "provider_empty_answer"),
        (["  ", "\n"], "stop", "provider_empty_answer"),
        (["# A start"], "content_filter", "provider_content_filtered"),
    ],
)
async def test_an_empty_or_filtered_idea_is_an_error_and_costs_nothing(
    served: Served, fake_openai: FakeOpenAI, tokens: list[str], finish: str, code: str
) -> None:
    fake_openai.tokens, fake_openai.finish_reason = tokens, finish
    _, token = await create_user(served.client)

    markdown = await read_stream(served.client, token)
    json_variant = await read_stream(served.client, token, format="json")

    assert "**Error:**" in markdown_buffer(markdown.text)
    last = event_source_events(json_variant.text)[-1]
    assert (last.event, last.data["code"]) == ("error", code)  # type: ignore[index]
    ideas = (await served.client.get("/api/ideas", headers=bearer(token))).json()["items"]
    assert [i["status"] for i in ideas] == (["incomplete"] * 2 if "".join(tokens).strip() else [])
    assert await ideas_used(served) == 0
