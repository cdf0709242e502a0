"""Gemini through the official async SDK (google-genai), over an httpx2 client of our own.

The SDK streams through several nested async generators, one of them in a reference cycle, so
closing the outermost one leaves the HTTP response open until the garbage collector runs. The
adapter therefore hands the SDK its own `httpx2.AsyncClient`, whose response hook records each
streamed response of the current call (through a context variable set only around each `anext`),
and closes those responses itself when the consumer stops listening. With an httpx client the
SDK's timeout is also a per-read timeout rather than a deadline for the whole stream. The client
runs on aiohttp (`aihub.providers.http`), as the OpenAI adapter's does.

Files too large to send inline go through Gemini's file API (`upload_file`): the SDK opens a
resumable upload session, sends the bytes (from memory) in 8 MB chunks, and the adapter then
polls the file until Gemini has processed it (videos take a while) and hands back a
`FileRefPart` to put in a message.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import anyio
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
    NoCookies,
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
from aihub.providers.http import aiohttp_transport

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
_DOCUMENT_TYPES = frozenset({"application/pdf", "application/json"})
_SECONDS = re.compile(r"^(\d+(?:\.\d+)?)s$")
_MISSING_FILE = re.compile(r"permission to access the File \S+ or it may not exist")
"""Gemini's 403 for a `fileData` part naming a file it does not hold."""
_LIMITS = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
_DISPLAY_NAME_LIMIT = 512
"""Characters of a file's display name Gemini keeps."""
_POLL_MAX_INTERVAL = 4.0
"""Seconds: the longest pause between two looks at a file Gemini is still processing."""
_CONNECTION_ERRORS = (
    aiohttp.ClientError,
    TimeoutError,
    httpx.TransportError,
    httpx2.TransportError,
    genai_errors.UnknownApiResponseError,
)

logger = logging.getLogger("aihub.providers.gemini")


@dataclass(frozen=True, slots=True)
class GeminiFileRef(FileRefPart):
    """A file in Gemini's file API: the `FileRefPart` to send, with what Gemini said of it."""

    name: str = ""
    """Gemini's resource name ("files/..."), for `files.get` or `files.delete`."""
    expires_at: datetime | None = None
    """When Gemini deletes the file (48 hours after the upload); a message referring to it
    after then fails."""


class GeminiProvider(TextProvider):
    name = "gemini"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        file_ready_timeout: float = 120.0,
        file_poll_interval: float = 0.5,
    ) -> None:
        """`file_ready_timeout`: seconds an uploaded file may stay PROCESSING before
        `upload_file` gives up; `file_poll_interval`: the first pause between two looks at it
        (doubling, up to 4 s)."""
        self._base_url = base_url
        self._file_ready_timeout = file_ready_timeout
        self._file_poll_interval = file_poll_interval
        self._http = httpx2.AsyncClient(
            timeout=timeout,
            limits=_LIMITS,
            cookies=NoCookies(),
            event_hooks={"response": [_track_response]},
            # It reads the CA bundle: now, at start-up (providers are built off the loop).
            transport=aiohttp_transport(_LIMITS, httpx2.create_ssl_context()),
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

    def accepts(self, mime_type: str) -> bool:
        family = mime_type.split("/", 1)[0]
        return family in ("image", "audio", "video", "text") or mime_type in _DOCUMENT_TYPES

    def __repr__(self) -> str:
        return "GeminiProvider()"

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        await self._http.aclose()

    async def upload_file(self, data: bytes, mime_type: str, *, display_name: str) -> GeminiFileRef:
        """Upload `data` to Gemini's file API and wait until Gemini can use it.

        Raises `ProviderUnavailable` when Gemini is unreachable, or still processing the file
        after `file_ready_timeout`; `ProviderBadRequest` when Gemini could not process it; the
        error of its HTTP status otherwise, as `stream_text` does.
        """
        config = types.UploadFileConfig(
            mime_type=mime_type,
            display_name=display_name[:_DISPLAY_NAME_LIMIT] or None,
            # Gemini hands out upload URLs on its own host: with a base URL (a proxy, the fake),
            # the SDK sends the bytes to the same scheme and host as everything else.
            http_options=types.HttpOptions(base_url=self._base_url),
        )
        try:
            # Reading a BytesIO is no I/O: the SDK reads it chunk by chunk between its awaits.
            file = await self._client.aio.files.upload(file=io.BytesIO(data), config=config)
            try:
                file = await self._until_processed(file)
            except BaseException:
                await self._discard(file)
                raise
        except genai_errors.APIError as exc:
            raise _api_error(exc) from exc
        except _CONNECTION_ERRORS as exc:
            raise ProviderUnavailable(
                f"Gemini connection failed: {type(exc).__name__}", provider=self.name
            ) from exc
        except (KeyError, ValueError) as exc:
            # The SDK's own checks of the upload protocol (no upload URL, an upload that never
            # became final) and answers it could not read.
            raise ProviderUnavailable(
                "Gemini's file upload failed", provider=self.name, detail=str(exc)
            ) from exc
        if not file.uri:
            raise ProviderError("Gemini returned a file without a URI", provider=self.name)
        return GeminiFileRef(
            uri=file.uri,
            mime_type=mime_type,
            name=file.name or "",
            expires_at=file.expiration_time,
        )

    async def _discard(self, file: types.File) -> None:
        """Delete an upload nobody will use (Gemini could not process it, we gave up waiting,
        or the caller left): it would count against the project's file storage until Gemini
        expires it, two days later. Best effort, and bounded."""
        if not file.name:
            return
        try:
            with anyio.CancelScope(shield=True):
                async with asyncio.timeout(5):
                    await self._client.aio.files.delete(name=file.name)
        except Exception as exc:
            logger.warning("could not delete an unused Gemini file: %s", type(exc).__name__)

    async def _until_processed(self, file: types.File) -> types.File:
        """`file` once it is no longer PROCESSING: polled with a doubling pause, up to a
        deadline. A FAILED file is a `ProviderBadRequest` (Gemini cannot read it)."""
        pause = self._file_poll_interval
        try:
            async with asyncio.timeout(self._file_ready_timeout) as deadline:
                while file.state == types.FileState.PROCESSING:
                    if not file.name:
                        raise ProviderError(
                            "Gemini returned a file without a name", provider=self.name
                        )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, _POLL_MAX_INTERVAL)
                    file = await self._client.aio.files.get(name=file.name)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise ProviderUnavailable(
                f"Gemini was still processing the file after {self._file_ready_timeout:g} s",
                provider=self.name,
            ) from exc
        if file.state == types.FileState.FAILED:
            reason = file.error.message if file.error and file.error.message else "no detail"
            raise ProviderBadRequest(
                f"Gemini could not process the file: {reason}", provider=self.name
            )
        return file

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
    detail = str(exc.message or exc.status or "no detail")
    kind: type[ProviderError] | None = None
    if status == 400 and _is_invalid_key(exc.details):
        kind = ProviderAuthError  # Gemini answers a wrong key with 400 API_KEY_INVALID
    elif status == 403 and _MISSING_FILE.search(detail):
        # A message naming a file that expired (48 hours) or never was: not a key problem.
        kind = ProviderBadRequest
    return error_for_status(
        status,
        provider=GeminiProvider.name,
        label="Gemini",
        detail=detail,
        retry_after=_retry_after(exc),
        kind=kind,
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
