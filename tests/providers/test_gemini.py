"""The Gemini adapter, through the real google-genai SDK, against the loopback fake."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator

import pytest

from aihub.providers.base import (
    Citation,
    FileRefPart,
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
from aihub.providers.gemini import GeminiProvider
from tests.fakes.gemini import FakeGemini

API_KEY = "AIzaTestKey0123456789abcdefghijklmno"
MODEL = "gemini-2.5-flash"
HELLO = TextRequest(messages=(Message.user("Hello"),))


@pytest.fixture
async def provider(fake_gemini: FakeGemini) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(
        api_key=API_KEY, base_url=fake_gemini.base_url, timeout=10, max_retries=0
    )
    yield provider
    await provider.aclose()


async def collect(
    provider: GeminiProvider, request: TextRequest = HELLO, into: list[TextEvent] | None = None
) -> list[TextEvent]:
    events = [] if into is None else into
    async for event in provider.stream_text(request, model=MODEL):
        events.append(event)
    return events


def text_of(events: list[TextEvent]) -> str:
    return "".join(event.text for event in events if isinstance(event, TextDelta))


async def test_streams_the_text_exactly(provider: GeminiProvider, fake_gemini: FakeGemini) -> None:
    events = await collect(provider)

    assert text_of(events) == fake_gemini.text
    assert "\n\n" in fake_gemini.tokens
    assert sum(isinstance(event, TextDelta) for event in events) == len(fake_gemini.tokens)


async def test_usage_once_then_finish(provider: GeminiProvider, fake_gemini: FakeGemini) -> None:
    fake_gemini.prompt_tokens, fake_gemini.completion_tokens = 12, 345
    fake_gemini.thoughts_tokens = 55
    fake_gemini.finish_reason = "MAX_TOKENS"

    events = await collect(provider)

    assert [event for event in events if isinstance(event, Usage)] == [Usage(12, 400)]
    assert events[-2:] == [Usage(12, 400), Finish("length")]


async def test_request_shape(provider: GeminiProvider, fake_gemini: FakeGemini) -> None:
    schema = {"type": "object", "properties": {"title": {"type": "string"}}}
    request = TextRequest(
        messages=(Message.user("first"), Message.assistant("answer"), Message.user("second")),
        system="Be brief.",
        temperature=0.5,
        max_output_tokens=256,
        json_schema=schema,
    )

    await collect(provider, request)

    received = fake_gemini.last_request
    assert received.path.endswith(f"/models/{MODEL}:streamGenerateContent")
    assert received.query == {"alt": "sse"}
    assert received.headers["x-goog-api-key"] == API_KEY
    body = received.json
    assert [(c["role"], c["parts"]) for c in body["contents"]] == [
        ("user", [{"text": "first"}]),
        ("model", [{"text": "answer"}]),
        ("user", [{"text": "second"}]),
    ]
    assert body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert body["generationConfig"] == {
        "temperature": 0.5,
        "maxOutputTokens": 256,
        "responseMimeType": "application/json",
        "responseJsonSchema": schema,
    }
    assert "tools" not in body


async def test_media_and_file_parts(provider: GeminiProvider, fake_gemini: FakeGemini) -> None:
    pdf = b"%PDF-1.7 fake"
    uri = "https://generativelanguage.googleapis.com/v1beta/files/abc123"
    message = Message(
        "user",
        (TextPart("Summarise"), MediaPart(pdf, "application/pdf"), FileRefPart(uri, "image/png")),
    )

    await collect(provider, TextRequest(messages=(message,)))

    text, inline, file = fake_gemini.last_request.json["contents"][0]["parts"]
    assert text == {"text": "Summarise"}
    inline_data = inline["inlineData"]
    assert base64.b64decode(inline_data["data"]) == pdf
    assert inline_data.get("mimeType", inline_data.get("mime_type")) == "application/pdf"
    file_data = file["fileData"]
    assert file_data.get("fileUri", file_data.get("file_uri")) == uri
    assert file_data.get("mimeType", file_data.get("mime_type")) == "image/png"


async def test_grounding_citations_are_deduplicated(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.citations = [
        ("https://example.com/a", "Example A"),
        ("https://example.org/b", None),
    ]

    events = await collect(provider, TextRequest(messages=HELLO.messages, grounding=True))

    assert fake_gemini.last_request.json["tools"] == [{"googleSearch": {}}]
    assert [event for event in events if isinstance(event, Citation)] == [
        Citation("https://example.com/a", "Example A"),
        Citation("https://example.org/b", None),
    ]
    assert text_of(events) == fake_gemini.text


async def test_no_citations_without_grounding(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.citations = [("https://example.com/a", "Example A")]

    events = await collect(provider)

    assert not any(isinstance(event, Citation) for event in events)


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
    provider: GeminiProvider, fake_gemini: FakeGemini, status: int, error_type: type[ProviderError]
) -> None:
    fake_gemini.fail_with(status)

    with pytest.raises(error_type) as caught:
        await collect(provider)

    assert type(caught.value) is error_type
    assert caught.value.provider == "gemini"
    assert caught.value.upstream_status == status
    assert isinstance(caught.value.__cause__, Exception)


async def test_wrong_key_is_an_auth_error(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.require_api_key = "AIzaSomeOtherKey"

    with pytest.raises(ProviderAuthError) as caught:
        await collect(provider)

    assert caught.value.upstream_status == 400
    assert API_KEY not in caught.value.message


@pytest.mark.parametrize("as_header", [True, False])
async def test_rate_limit_carries_retry_after(
    provider: GeminiProvider, fake_gemini: FakeGemini, as_header: bool
) -> None:
    if as_header:
        fake_gemini.fail_with(429, {"error": {"code": 429, "message": "slow"}}, retry_after=9)
    else:  # Google's RetryInfo detail only
        fake_gemini.fail_with(429, retry_after=23)
        assert fake_gemini.error is not None
        fake_gemini.error.retry_after = None

    with pytest.raises(ProviderRateLimited) as caught:
        await collect(provider)

    assert caught.value.retry_after == (9 if as_header else 23)


async def test_blocked_prompt_is_a_bad_request(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.block_reason = "SAFETY"

    with pytest.raises(ProviderBadRequest, match="SAFETY"):
        await collect(provider)


@pytest.mark.parametrize("mode", ["error", "drop"])
async def test_mid_stream_failure_raises(
    provider: GeminiProvider, fake_gemini: FakeGemini, mode: str
) -> None:
    fake_gemini.fail_mid_stream(4, mode="error" if mode == "error" else "drop")
    received: list[TextEvent] = []

    with pytest.raises((ProviderUnavailable,)):
        await collect(provider, into=received)

    assert text_of(received) == "".join(fake_gemini.tokens[:4])
    assert not any(isinstance(event, Finish) for event in received)


async def test_closing_the_stream_closes_the_upstream_request(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.token_delay = 0.05
    stream = provider.stream_text(HELLO, model=MODEL)

    first = await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]

    assert first == TextDelta(fake_gemini.tokens[0])
    await asyncio.wait_for(fake_gemini.disconnected.wait(), timeout=2)
    assert fake_gemini.disconnects == 1
    assert fake_gemini.stats.completed == 0


async def test_connection_refused_is_unavailable() -> None:
    provider = GeminiProvider(api_key=API_KEY, base_url="http://127.0.0.1:9", max_retries=0)
    try:
        with pytest.raises(ProviderUnavailable):
            await collect(provider)
    finally:
        await provider.aclose()
