"""The Gemini adapter, through the real google-genai SDK, against the loopback fake."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from datetime import timedelta

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
from aihub.providers.gemini import GeminiFileRef, GeminiProvider
from tests.fakes.gemini import FakeGemini, FileStage

API_KEY = "AIzaTestKey0123456789abcdefghijklmno"
MODEL = "gemini-2.5-flash"
HELLO = TextRequest(messages=(Message.user("Hello"),))
CHUNK = 8 * 1024 * 1024
"""The SDK sends an upload in chunks of this many bytes."""


def payload(size: int) -> bytes:
    """`size` bytes that are not all alike, so a lost or reordered chunk shows (a chunk is not
    a whole number of the 251-byte periods)."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


@pytest.fixture
async def provider(fake_gemini: FakeGemini) -> AsyncIterator[GeminiProvider]:
    provider = GeminiProvider(
        api_key=API_KEY,
        base_url=fake_gemini.base_url,
        timeout=10,
        max_retries=0,
        file_poll_interval=0.01,
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


# --- file API -----------------------------------------------------------------------------------


async def test_upload_returns_a_reference_to_the_exact_bytes(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    data = payload(300_000)

    ref = await provider.upload_file(data, "application/pdf", display_name="report.pdf")

    assert isinstance(ref, FileRefPart)
    file = fake_gemini.file_at(ref.uri)
    assert bytes(file.data) == data
    assert (file.mime_type, file.display_name) == ("application/pdf", "report.pdf")
    assert ref == GeminiFileRef(
        uri=file.uri, mime_type="application/pdf", name=file.name, expires_at=file.expires
    )
    assert ref.expires_at is not None
    assert ref.expires_at - file.created == timedelta(hours=48)
    assert fake_gemini.uploads == 1


async def test_upload_wire_format(provider: GeminiProvider, fake_gemini: FakeGemini) -> None:
    data = payload(CHUNK + 1234)  # two chunks: "upload", then "upload, finalize"

    ref = await provider.upload_file(data, "video/mp4", display_name="clip.mp4")

    start, first, last = fake_gemini.file_requests
    assert (start.method, start.query) == ("POST", {})
    assert start.path.startswith("/upload/")
    assert start.path.endswith("/files")
    assert start.headers["x-goog-api-key"] == API_KEY
    assert start.headers["x-goog-upload-protocol"] == "resumable"
    assert start.headers["x-goog-upload-command"] == "start"
    assert start.headers["x-goog-upload-header-content-length"] == str(len(data))
    assert start.headers["x-goog-upload-header-content-type"] == "video/mp4"
    metadata = start.json["file"]
    assert metadata.get("displayName", metadata.get("display_name")) == "clip.mp4"
    for chunk in (first, last):
        assert chunk.path == start.path
        assert chunk.query["upload_protocol"] == "resumable"
        assert chunk.query["upload_id"]
    assert first.headers["x-goog-upload-command"] == "upload"
    assert first.headers["x-goog-upload-offset"] == "0"
    assert last.headers["x-goog-upload-command"] == "upload, finalize"
    assert last.headers["x-goog-upload-offset"] == str(CHUNK)
    assert bytes(fake_gemini.file_at(ref.uri).data) == data


async def test_upload_url_on_another_host_goes_through_the_base_url(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    # Gemini hands out upload URLs on its own host; behind a base URL the bytes go there too.
    fake_gemini.upload_origin = "https://generativelanguage.googleapis.com"

    ref = await provider.upload_file(b"%PDF-1.7 fake", "application/pdf", display_name="a.pdf")

    assert bytes(fake_gemini.file_at(ref.uri).data) == b"%PDF-1.7 fake"


async def test_upload_waits_while_the_file_is_processing(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.processing_polls = 3

    ref = await provider.upload_file(payload(1000), "video/mp4", display_name="clip.mp4")

    file = fake_gemini.file_at(ref.uri)
    assert file.state == "ACTIVE"
    assert file.gets == 4  # three PROCESSING answers, then ACTIVE
    gets = [r for r in fake_gemini.file_requests if r.method == "GET"]
    assert {r.path for r in gets} == {f"/{ref.uri.split('/')[-3]}/{file.name}"}
    assert all(r.headers["x-goog-api-key"] == API_KEY for r in gets)


async def test_an_active_upload_is_not_polled(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    ref = await provider.upload_file(payload(1000), "image/png", display_name="a.png")

    assert fake_gemini.file_at(ref.uri).gets == 0


@pytest.mark.parametrize("polls", [0, 2])
async def test_a_failed_file_is_a_bad_request(
    provider: GeminiProvider, fake_gemini: FakeGemini, polls: int
) -> None:
    fake_gemini.processing_polls = polls
    fake_gemini.processing_failure = "The video could not be decoded."

    with pytest.raises(ProviderBadRequest, match="could not be decoded") as caught:
        await provider.upload_file(payload(1000), "video/mp4", display_name="clip.mp4")

    assert isinstance(caught.value, ProviderError)
    assert caught.value.provider == "gemini"
    # FAILED in the finalize answer: no look; else each PROCESSING answer, then the FAILED one
    assert [file.gets for file in fake_gemini.deleted_files] == [polls + 1 if polls else 0]
    assert fake_gemini.files == {}  # deleted at once, not left to take up the project's space


async def test_a_caller_leaving_while_the_file_processes_deletes_it(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.processing_polls = 1_000_000
    upload = asyncio.create_task(
        provider.upload_file(payload(1000), "video/mp4", display_name="clip.mp4")
    )
    while not any(file.gets for file in fake_gemini.files.values()):
        await asyncio.sleep(0.01)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    assert fake_gemini.files == {}
    assert len(fake_gemini.deleted_files) == 1


async def test_processing_has_a_deadline(fake_gemini: FakeGemini) -> None:
    fake_gemini.processing_polls = 1_000_000
    provider = GeminiProvider(
        api_key=API_KEY,
        base_url=fake_gemini.base_url,
        max_retries=0,
        file_ready_timeout=0.3,
        file_poll_interval=0.01,
    )
    started = time.monotonic()
    try:
        with pytest.raises(ProviderUnavailable, match="still processing"):
            await provider.upload_file(payload(1000), "video/mp4", display_name="clip.mp4")
    finally:
        await provider.aclose()

    assert time.monotonic() - started < 2
    (file,) = fake_gemini.deleted_files  # given up on, and deleted
    assert fake_gemini.files == {}
    assert 3 <= file.gets <= 30  # a doubling pause: a handful of looks, not a busy loop


@pytest.mark.parametrize("stage", ["start", "upload", "get"])
@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, ProviderBadRequest),
        (403, ProviderAuthError),
        (404, ProviderNotFound),
        (413, ProviderBadRequest),
        (429, ProviderRateLimited),
        (500, ProviderUnavailable),
        (503, ProviderUnavailable),
    ],
)
async def test_upload_status_errors_are_mapped(
    provider: GeminiProvider,
    fake_gemini: FakeGemini,
    stage: FileStage,
    status: int,
    error_type: type[ProviderError],
) -> None:
    fake_gemini.processing_polls = 1
    fake_gemini.fail_files_with(status, at=stage)

    with pytest.raises(error_type) as caught:
        await provider.upload_file(payload(1000), "video/mp4", display_name="clip.mp4")

    assert type(caught.value) is error_type
    assert caught.value.provider == "gemini"
    assert caught.value.upstream_status == status
    assert isinstance(caught.value.__cause__, Exception)


async def test_upload_rate_limit_carries_retry_after(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.fail_files_with(429, at="start", retry_after=7)

    with pytest.raises(ProviderRateLimited) as caught:
        await provider.upload_file(payload(10), "image/png", display_name="a.png")

    assert caught.value.retry_after == 7


async def test_upload_with_a_wrong_key_is_an_auth_error(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.require_api_key = "AIzaSomeOtherKey"

    with pytest.raises(ProviderAuthError) as caught:
        await provider.upload_file(payload(10), "image/png", display_name="a.png")

    assert API_KEY not in caught.value.message
    assert fake_gemini.uploads == 0


async def test_upload_connection_refused_is_unavailable() -> None:
    provider = GeminiProvider(api_key=API_KEY, base_url="http://127.0.0.1:9", max_retries=0)
    try:
        with pytest.raises(ProviderUnavailable):
            await provider.upload_file(payload(10), "image/png", display_name="a.png")
    finally:
        await provider.aclose()


async def test_an_uploaded_file_reaches_the_model(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    fake_gemini.processing_polls = 1
    ref = await provider.upload_file(payload(5000), "video/mp4", display_name="clip.mp4")
    message = Message("user", (TextPart("What happens in this video?"), ref))

    events = await collect(provider, TextRequest(messages=(message,)))

    assert text_of(events) == fake_gemini.text
    (file_data,) = fake_gemini.file_parts
    assert file_data.get("fileUri", file_data.get("file_uri")) == ref.uri
    assert file_data.get("mimeType", file_data.get("mime_type")) == "video/mp4"
    parts = fake_gemini.last_request.json["contents"][0]["parts"]
    assert parts[0] == {"text": "What happens in this video?"}
    assert "inlineData" not in parts[1]


async def test_a_file_gemini_does_not_hold_is_a_bad_request(
    provider: GeminiProvider, fake_gemini: FakeGemini
) -> None:
    # What a message meets once the file expired: Gemini's 403 is about the file, not the key.
    gone = FileRefPart(f"{fake_gemini.base_url}/v1/files/expired0000", "video/mp4")
    message = Message("user", (TextPart("And now?"), gone))

    with pytest.raises(ProviderBadRequest, match="expired0000") as caught:
        await collect(provider, TextRequest(messages=(message,)))

    assert caught.value.upstream_status == 403


async def test_the_client_keeps_no_cookies(fake_gemini: FakeGemini) -> None:
    """One client serves every user: a cookie that one answer sets (a load balancer's, a
    proxy's) must not ride along on the next request. (By a host name, not an IP address:
    cookie jars keep no cookies for IP addresses.)"""
    base_url = fake_gemini.base_url.replace("127.0.0.1", "localhost")
    provider = GeminiProvider(api_key=API_KEY, base_url=base_url, max_retries=0)
    fake_gemini.set_cookie = "GFE_RTT=first-users-session; Path=/; HttpOnly"
    try:
        await collect(provider)
        await collect(provider)
        await provider.upload_file(b"%PDF-1.4", "application/pdf", display_name="a.pdf")
    finally:
        await provider.aclose()
    sent = [*fake_gemini.requests, *fake_gemini.file_requests]
    assert len(sent) >= 3
    assert [r.headers.get("cookie") for r in sent] == [None] * len(sent)
