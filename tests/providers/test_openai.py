"""The OpenAI adapter, through the real SDK, against the loopback fake of Chat Completions."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest

from aihub.providers import openai as openai_adapter
from aihub.providers.base import (
    Accepted,
    Finish,
    MediaPart,
    Message,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderNotFound,
    ProviderRateLimited,
    ProviderUnavailable,
    TextDelta,
    TextEvent,
    TextPart,
    TextRequest,
    Usage,
)
from aihub.providers.openai import OpenAIProvider
from tests.fakes.openai import DEFAULT_TEXT, FakeOpenAI

API_KEY = "sk-test-0123456789abcdefghijklmnop"
MODEL = "gpt-5-nano"
HELLO = TextRequest(messages=(Message.user("Give me a business idea"),))


@pytest.fixture
async def provider(fake_openai: FakeOpenAI) -> AsyncIterator[OpenAIProvider]:
    provider = OpenAIProvider(
        api_key=API_KEY, base_url=fake_openai.base_url, timeout=10, max_retries=0
    )
    yield provider
    await provider.aclose()


async def collect(
    provider: OpenAIProvider, request: TextRequest = HELLO, into: list[TextEvent] | None = None
) -> list[TextEvent]:
    events = [] if into is None else into
    async for event in provider.stream_text(request, model=MODEL):
        events.append(event)
    return events


def text_of(events: list[TextEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


async def test_streams_the_text_exactly(provider: OpenAIProvider, fake_openai: FakeOpenAI) -> None:
    events = await collect(provider)

    assert text_of(events) == fake_openai.text
    assert any(t.startswith("\n") and t.strip() for t in fake_openai.tokens)
    assert "\n\n" in fake_openai.tokens
    deltas = [event for event in events if isinstance(event, TextDelta)]
    assert all(delta.text for delta in deltas)


async def test_a_compressed_stream_is_read_through_its_decoder(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.gzip = True
    events = await collect(provider)
    assert text_of(events) == fake_openai.text
    assert isinstance(events[-1], Finish)
    assert any(isinstance(event, Usage) for event in events)


async def test_a_last_line_without_its_line_break_is_read(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    """Some OpenAI-compatible servers end with the usage line unterminated and no `[DONE]`."""
    fake_openai.unterminated = True
    events = await collect(provider)
    assert text_of(events) == fake_openai.text
    assert Usage(input_tokens=17, output_tokens=len(fake_openai.tokens)) in events
    assert isinstance(events[-1], Finish)


async def test_the_request_is_accepted_before_a_slow_first_token(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    """A reasoning model's silence: the success status is known at once, the text much later."""
    fake_openai.first_token_delay = 2
    stream = provider.stream_text(HELLO, model=MODEL)
    try:
        assert await asyncio.wait_for(anext(stream), 1) == Accepted()
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_tokens_that_arrive_apart_stay_apart_and_together_are_joined(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.01  # one token a network read: one delta each
    paced = [e.text for e in await collect(provider) if isinstance(e, TextDelta)]
    assert paced == fake_openai.tokens

    fake_openai.token_delay = 0  # many tokens a read (as under load): fewer, longer deltas
    burst = [e.text for e in await collect(provider) if isinstance(e, TextDelta)]
    assert "".join(burst) == fake_openai.text
    assert len(burst) < len(fake_openai.tokens)


async def test_usage_then_finish_last(provider: OpenAIProvider, fake_openai: FakeOpenAI) -> None:
    fake_openai.prompt_tokens, fake_openai.completion_tokens = 31, 404
    fake_openai.finish_reason = "length"

    events = await collect(provider)

    assert events[-2:] == [Usage(input_tokens=31, output_tokens=404), Finish("length")]


async def test_request_shape(provider: OpenAIProvider, fake_openai: FakeOpenAI) -> None:
    request = TextRequest(
        messages=(Message.user("first"), Message.assistant("answer"), Message.user("second")),
        system="Be brief.",
    )

    await collect(provider, request)

    received = fake_openai.last_request
    assert received.path == "/v1/chat/completions"
    assert received.headers["authorization"] == f"Bearer {API_KEY}"
    body = received.json
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "second"},
    ]
    # gpt-5 models reject temperature: nothing unset is sent.
    for absent in ("temperature", "max_completion_tokens", "max_tokens", "response_format"):
        assert absent not in body


async def test_options_and_json_schema(provider: OpenAIProvider, fake_openai: FakeOpenAI) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    fake_openai.text = '{"title": "Two Sum"}'
    request = TextRequest(
        messages=HELLO.messages, temperature=0.2, max_output_tokens=300, json_schema=schema
    )

    events = await collect(provider, request)

    assert text_of(events) == '{"title": "Two Sum"}'
    body = fake_openai.last_request.json
    assert body["temperature"] == 0.2
    assert body["max_completion_tokens"] == 300
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": False},
    }


async def test_image_parts_are_data_urls(provider: OpenAIProvider, fake_openai: FakeOpenAI) -> None:
    png = b"\x89PNG\r\n\x1a\nfake-image-bytes"
    message = Message("user", (TextPart("What is this?"), MediaPart(png, "image/png")))

    await collect(provider, TextRequest(messages=(message,)))

    content = fake_openai.last_request.json["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "What is this?"},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
        },
    ]


async def test_unsupported_media_is_refused_before_calling(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    message = Message("user", (MediaPart(b"RIFF....", "audio/wav"),))

    with pytest.raises(ProviderBadRequest):
        await collect(provider, TextRequest(messages=(message,)))
    assert fake_openai.requests == []


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, ProviderBadRequest),
        (401, ProviderAuthError),
        (403, ProviderAuthError),
        (404, ProviderNotFound),
        (413, ProviderBadRequest),
        (422, ProviderBadRequest),
        (429, ProviderRateLimited),
        (500, ProviderUnavailable),
        (503, ProviderUnavailable),
    ],
)
async def test_status_errors_are_mapped(
    provider: OpenAIProvider, fake_openai: FakeOpenAI, status: int, error_type: type[ProviderError]
) -> None:
    fake_openai.fail_with(status)

    with pytest.raises(error_type) as caught:
        await collect(provider)

    assert type(caught.value) is error_type
    assert caught.value.provider == "openai"
    assert caught.value.upstream_status == status
    assert isinstance(caught.value.__cause__, Exception)


async def test_rate_limit_carries_retry_after(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_with(429, retry_after=17)

    with pytest.raises(ProviderRateLimited) as caught:
        await collect(provider)

    assert caught.value.retry_after == 17
    assert caught.value.headers == {"Retry-After": "17"}


async def test_auth_error_never_repeats_the_key(fake_openai: FakeOpenAI) -> None:
    fake_openai.require_api_key = "sk-the-right-key-000000000000"
    provider = OpenAIProvider(api_key=API_KEY, base_url=fake_openai.base_url, max_retries=0)
    try:
        with pytest.raises(ProviderAuthError) as caught:
            await collect(provider)
    finally:
        await provider.aclose()

    assert API_KEY[-4:] not in caught.value.message
    assert API_KEY[:8] not in caught.value.message
    assert API_KEY not in repr(provider)


def _openai_error(status: int, message: str) -> dict[str, object]:
    return {"error": {"message": message, "type": "requests", "param": None, "code": None}}


ACCOUNT = "Rate limit reached for gpt-5-nano in organization org-Hidden123 on requests per min"


@pytest.mark.parametrize("status", [404, 429, 500])
async def test_words_about_the_server_s_account_go_to_the_logs_only(
    provider: OpenAIProvider, fake_openai: FakeOpenAI, status: int
) -> None:
    fake_openai.fail_with(status, _openai_error(status, ACCOUNT))

    with pytest.raises(ProviderError) as caught:
        await collect(provider)

    assert caught.value.message.endswith(f"(OpenAI answered {status})")
    assert "org-Hidden123" not in caught.value.message
    assert caught.value.detail == ACCOUNT


async def test_a_caller_s_own_key_hears_openai_s_words(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_with(429, _openai_error(429, ACCOUNT))

    with pytest.raises(ProviderRateLimited) as caught:
        await collect(provider.with_api_key("sk-caller-own-key-9876543210"))

    assert caught.value.message == f"OpenAI answered 429: {ACCOUNT}"


async def test_a_refused_request_keeps_openai_s_words(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    refusal = "Your request was rejected as a result of our safety system."
    fake_openai.fail_with(400, _openai_error(400, refusal))

    with pytest.raises(ProviderBadRequest) as caught:
        await collect(provider)

    assert caught.value.message == f"OpenAI answered 400: {refusal}"


async def test_words_in_a_mid_stream_error_go_to_the_logs_only(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.fail_mid_stream(3)

    with pytest.raises(ProviderUnavailable) as caught:
        await collect(provider)
    with pytest.raises(ProviderUnavailable) as callers:
        await collect(provider.with_api_key("sk-caller-own-key-9876543210"))

    assert caught.value.message == "OpenAI failed mid-stream"
    assert caught.value.detail == "The fake answered 500."
    assert callers.value.message == "OpenAI failed mid-stream: The fake answered 500."


async def test_retries_when_asked(fake_openai: FakeOpenAI) -> None:
    fake_openai.fail_with(500, times=1)
    provider = OpenAIProvider(api_key=API_KEY, base_url=fake_openai.base_url, max_retries=1)
    try:
        events = await collect(provider)
    finally:
        await provider.aclose()

    assert text_of(events) == fake_openai.text
    assert len(fake_openai.requests) == 2


@pytest.mark.parametrize("mode", ["error", "drop"])
async def test_mid_stream_failure_raises(
    provider: OpenAIProvider, fake_openai: FakeOpenAI, mode: str
) -> None:
    fake_openai.fail_mid_stream(5, mode="error" if mode == "error" else "drop")
    received: list[TextEvent] = []

    with pytest.raises(ProviderUnavailable):
        await collect(provider, into=received)

    assert text_of(received) == "".join(fake_openai.tokens[:5])
    assert not any(isinstance(event, Finish) for event in received)


async def test_closing_the_stream_closes_the_upstream_request(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    fake_openai.token_delay = 0.05
    stream = provider.stream_text(HELLO, model=MODEL)

    accepted, first = await anext(stream), await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]

    assert accepted == Accepted()
    assert first == TextDelta(fake_openai.tokens[0])
    await asyncio.wait_for(fake_openai.disconnected.wait(), timeout=2)
    assert fake_openai.disconnects == 1
    assert fake_openai.stats.completed == 0


async def test_byok_copy_uses_its_own_key_and_the_shared_pool(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    own_key = "sk-caller-own-key-9876543210"
    fake_openai.require_api_key = own_key
    byok = provider.with_api_key(own_key)

    events = [event async for event in byok.stream_text(HELLO, model=MODEL)]
    await byok.aclose()  # must not close the shared pool
    with pytest.raises(ProviderAuthError):
        await collect(provider)

    assert text_of(events) == fake_openai.text
    assert fake_openai.requests[0].headers["authorization"] == f"Bearer {own_key}"
    assert fake_openai.requests[1].headers["authorization"] == f"Bearer {API_KEY}"


async def test_requests_tell_the_upstream_nothing_of_this_machine(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    await collect(provider)
    await collect(provider.with_api_key("sk-caller-own-key-9876543210"))
    for request in fake_openai.requests:
        assert request.headers["user-agent"].startswith("AsyncOpenAI/Python")
        assert request.headers["authorization"].startswith("Bearer sk-")
        assert not [name for name in request.headers if name.startswith("x-stainless")]


async def test_a_request_reads_no_system_randomness(
    provider: OpenAIProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK's own idempotency key (a `uuid4()`, read from the system with the GIL released)
    is not made: the adapter gives one, unique to each request."""

    def no_key_of_its_own() -> str:
        raise AssertionError("the SDK made an idempotency key")

    monkeypatch.setattr(provider._client, "_idempotency_key", no_key_of_its_own)
    await collect(provider)
    await collect(provider.with_api_key("sk-caller-own-key-9876543210"))

    assert openai_adapter._request_key() != openai_adapter._request_key()


async def test_the_shared_client_keeps_no_cookies(fake_openai: FakeOpenAI) -> None:
    """One client serves every caller (and every caller's own key): a cookie that one upstream
    answer sets must not ride along on anybody's next request. (By a host name, not an IP
    address: cookie jars keep no cookies for IP addresses.)"""
    base_url = fake_openai.base_url.replace("127.0.0.1", "localhost")
    provider = OpenAIProvider(api_key=API_KEY, base_url=base_url, max_retries=0)
    fake_openai.set_cookie = "__cf_bm=first-callers-session; Path=/; HttpOnly"
    try:
        await collect(provider.with_api_key("sk-first-caller-0123456789"))
        await collect(provider.with_api_key("sk-second-caller-0123456789"))
        await collect(provider)
    finally:
        await provider.aclose()
    assert [r.headers.get("cookie") for r in fake_openai.requests] == [None, None, None]


async def test_the_pool_lets_an_idle_connection_go_before_a_uvicorn_upstream_does(
    fake_openai: FakeOpenAI,
) -> None:
    """uvicorn, which most OpenAI-compatible servers run on (vLLM, LiteLLM) and the fake too,
    closes a connection after 5 s idle; a request sent on it as it closes fails. The pool
    drops idle connections sooner, so the next request after a pause opens a new one."""
    provider = OpenAIProvider(api_key=API_KEY, base_url=fake_openai.base_url, max_retries=0)
    try:
        await collect(provider)
        await collect(provider)
        await asyncio.sleep(4.3)
        await collect(provider)
    finally:
        await provider.aclose()
    first, again, after_a_pause = (r.client_port for r in fake_openai.requests)
    assert first == again  # kept alive between two requests in a row
    assert after_a_pause != first


async def test_a_stream_whose_body_ends_after_done_leaves_its_connection_in_the_pool(
    fake_openai: FakeOpenAI,
) -> None:
    """The end of the chunked body may come in a packet of its own after `[DONE]`: it is read,
    so the connection can serve the next request (a body left unread closes it, and the next
    request pays for a new connection: on the internet, a TLS handshake)."""
    fake_openai.end_delay = 0.05
    provider = OpenAIProvider(api_key=API_KEY, base_url=fake_openai.base_url, max_retries=0)
    try:
        first = await collect(provider)
        await collect(provider)
    finally:
        await provider.aclose()
    assert text_of(first) == DEFAULT_TEXT
    assert isinstance(first[-1], Finish)
    one, two = (r.client_port for r in fake_openai.requests)
    assert one == two


async def test_a_body_that_does_not_end_after_done_costs_its_connection_not_the_answer(
    fake_openai: FakeOpenAI,
) -> None:
    fake_openai.end_delay = 5
    provider = OpenAIProvider(api_key=API_KEY, base_url=fake_openai.base_url, max_retries=0)
    try:
        async with asyncio.timeout(openai_adapter.DRAIN_SECONDS + 1):
            events = await collect(provider)
    finally:
        await provider.aclose()
    assert text_of(events) == DEFAULT_TEXT
    assert isinstance(events[-1], Finish)


async def test_connection_refused_is_unavailable() -> None:
    provider = OpenAIProvider(api_key=API_KEY, base_url="http://127.0.0.1:9/v1", max_retries=0)
    try:
        with pytest.raises(ProviderUnavailable) as caught:
            await collect(provider)
    finally:
        await provider.aclose()
    assert caught.value.upstream_status is None


async def test_several_text_parts_stay_separate(
    provider: OpenAIProvider, fake_openai: FakeOpenAI
) -> None:
    message = Message("user", (TextPart("Context: a bakery."), TextPart("Question: name it?")))

    await collect(provider, TextRequest(messages=(message,)))

    assert fake_openai.last_request.json["messages"][0]["content"] == [
        {"type": "text", "text": "Context: a bakery."},
        {"type": "text", "text": "Question: name it?"},
    ]
