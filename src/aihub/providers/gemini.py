"""Gemini through the official async SDK (google-genai), over an httpx2 client of our own.

The SDK streams through several nested async generators, one of them in a reference cycle, so
closing the outermost one leaves the HTTP response open until the garbage collector runs. The
adapter therefore hands the SDK its own `httpx2.AsyncClient`, whose response hook records each
streamed response of the current call (through a context variable set only around each `anext`),
and closes those responses itself when the consumer stops listening. With an httpx client the
SDK's timeout is also a per-read timeout rather than a deadline for the whole stream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from typing import Any

import aiohttp
import httpx
import httpx2
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from aihub.providers.base import (
    Citation,
    FileRefPart,
    Finish,
    MediaPart,
    Message,
    Part,
    ProviderAuthError,
    ProviderBadRequest,
    ProviderError,
    ProviderUnavailable,
    TextDelta,
    TextEvent,
    TextPart,
    TextProvider,
    TextRequest,
    Usage,
    error_for_status,
    parse_retry_after,
)

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
}
_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s$")
_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
_CONNECTION_ERRORS = (
    aiohttp.ClientError,
    TimeoutError,
    httpx.TransportError,
    httpx2.TransportError,
    genai_errors.UnknownApiResponseError,
)


class GeminiProvider(TextProvider):
    name = "gemini"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        self._http = httpx2.AsyncClient(
            timeout=timeout, limits=_LIMITS, event_hooks={"response": [_track_response]}
        )
        options = types.HttpOptions(
            base_url=base_url,
            timeout=round(timeout * 1000),
            # Explicit retry options also turn off the SDK's own hidden retry of connection
            # errors (a 1-10 s sleep), so `max_retries=0` means one attempt.
            retry_options=types.HttpRetryOptions(attempts=max_retries + 1),
            httpx_async_client=self._http,
        )
        self._client = genai.Client(api_key=api_key, http_options=options)

    def __repr__(self) -> str:
        return "GeminiProvider()"

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        await self._http.aclose()

    async def stream_text(self, request: TextRequest, *, model: str) -> AsyncIterator[TextEvent]:
        contents = [_content(message) for message in request.messages]
        config = _config(request)
        reader = _ResponseReader()
        responses: list[httpx2.Response] = []
        try:
            stream = await self._client.aio.models.generate_content_stream(
                model=model, contents=contents, config=config
            )
            try:
                while (chunk := await _next_chunk(stream, responses)) is not None:
                    for event in reader.feed(chunk):
                        yield event
            finally:
                await _aclose(stream)
                for response in responses:
                    await response.aclose()
            for event in reader.finish():
                yield event
        except genai_errors.APIError as exc:
            raise _api_error(exc) from exc
        except _CONNECTION_ERRORS as exc:
            raise ProviderUnavailable(
                f"Gemini connection failed: {type(exc).__name__}", provider=self.name
            ) from exc


class _ResponseReader:
    """Turns `GenerateContentResponse` chunks into events; usage and finish come at the end."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.cited: set[str] = set()

    def feed(self, chunk: types.GenerateContentResponse) -> list[TextEvent]:
        if chunk.usage_metadata is not None:
            self.usage = _usage(chunk.usage_metadata)
        feedback = chunk.prompt_feedback
        if not chunk.candidates and feedback is not None and feedback.block_reason is not None:
            raise ProviderBadRequest(
                f"Gemini blocked the prompt ({feedback.block_reason.value})",
                provider=GeminiProvider.name,
            )
        if not chunk.candidates:
            return []
        candidate = chunk.candidates[0]
        events: list[TextEvent] = []
        for part in (candidate.content.parts if candidate.content else None) or ():
            if part.text and not part.thought:
                events.append(TextDelta(part.text))
        events.extend(self._citations(candidate.grounding_metadata))
        if candidate.finish_reason is not None:
            self.finish_reason = candidate.finish_reason.value
        return events

    def _citations(self, metadata: types.GroundingMetadata | None) -> list[Citation]:
        citations = []
        for chunk in (metadata.grounding_chunks if metadata else None) or ():
            web = chunk.web
            if web is None or not web.uri or web.uri in self.cited:
                continue
            self.cited.add(web.uri)
            citations.append(Citation(url=web.uri, title=web.title))
        return citations

    def finish(self) -> list[TextEvent]:
        if self.finish_reason is None:
            # A stream that stops without a finish reason was cut: it must not look complete.
            raise ProviderUnavailable("Gemini's stream ended early", provider=GeminiProvider.name)
        events: list[TextEvent] = [] if self.usage is None else [self.usage]
        events.append(Finish(_FINISH_REASONS.get(self.finish_reason, self.finish_reason.lower())))
        return events


def _usage(metadata: types.GenerateContentResponseUsageMetadata) -> Usage:
    # Thinking tokens are billed as output.
    output = (metadata.candidates_token_count or 0) + (metadata.thoughts_token_count or 0)
    return Usage(input_tokens=metadata.prompt_token_count or 0, output_tokens=output)


_call_responses: ContextVar[list[httpx2.Response] | None] = ContextVar(
    "aihub_gemini_responses", default=None
)


async def _track_response(response: httpx2.Response) -> None:
    responses = _call_responses.get()
    if responses is not None:
        responses.append(response)


async def _next_chunk(
    stream: AsyncIterator[types.GenerateContentResponse], responses: list[httpx2.Response]
) -> types.GenerateContentResponse | None:
    """The next chunk, recording into `responses` any HTTP response opened to get it."""
    token = _call_responses.set(responses)
    try:
        return await anext(stream, None)
    finally:
        _call_responses.reset(token)


async def _aclose(stream: AsyncIterator[types.GenerateContentResponse]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


def _content(message: Message) -> types.Content:
    role = "model" if message.role == "assistant" else "user"
    return types.Content(role=role, parts=[_part(part) for part in message.parts])


def _part(part: Part) -> types.Part:
    if isinstance(part, TextPart):
        return types.Part(text=part.text)
    if isinstance(part, MediaPart):
        return types.Part(inline_data=types.Blob(data=part.data, mime_type=part.mime_type))
    assert isinstance(part, FileRefPart)
    return types.Part(file_data=types.FileData(file_uri=part.uri, mime_type=part.mime_type))


def _config(request: TextRequest) -> types.GenerateContentConfig:
    config = types.GenerateContentConfig(
        system_instruction=request.system,
        temperature=request.temperature,
        max_output_tokens=request.max_output_tokens,
    )
    if request.json_schema is not None:
        config.response_mime_type = "application/json"
        config.response_json_schema = request.json_schema
    if request.grounding:
        config.tools = [types.Tool(google_search=types.GoogleSearch())]
    return config


def _api_error(exc: genai_errors.APIError) -> ProviderError:
    status = exc.code if isinstance(exc.code, int) else 502
    # Gemini answers a wrong key with 400 API_KEY_INVALID.
    invalid_key = status == 400 and _is_invalid_key(exc.details)
    return error_for_status(
        status,
        provider=GeminiProvider.name,
        label="Gemini",
        detail=str(exc.message or exc.status or "no detail"),
        retry_after=_retry_after(exc),
        kind=ProviderAuthError if invalid_key else None,
    )


def _error_details(details: Any) -> list[Mapping[str, Any]]:
    error = details.get("error", details) if isinstance(details, Mapping) else None
    found = error.get("details") if isinstance(error, Mapping) else None
    return [item for item in found or () if isinstance(item, Mapping)]


def _is_invalid_key(details: Any) -> bool:
    return any(item.get("reason") == "API_KEY_INVALID" for item in _error_details(details))


def _retry_after(exc: genai_errors.APIError) -> int | None:
    """Seconds to wait: the Retry-After header, else Google's `RetryInfo.retryDelay`."""
    headers = getattr(exc.response, "headers", None)
    if isinstance(headers, Mapping):
        for name, value in headers.items():
            if str(name).lower() == "retry-after":
                return parse_retry_after(str(value))
    for item in _error_details(exc.details):
        match = _SECONDS.match(str(item.get("retryDelay", "")))
        if match:
            return max(1, round(float(match.group(1))))
    return None
