"""OpenAI (and OpenAI-compatible servers) through the official async SDK, over aiohttp.

The SDK opens the stream (its generic `post`, with `stream=True`) and its body is read raw, each
`data:` line parsed with orjson, instead of iterating the SDK's parsed chunk objects: at a few
hundred concurrent streams that is what keeps time to first token low (see
`bench/openai_stream_paths.py`).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import httpx2
import openai
import orjson

from aihub.providers.base import (
    Accepted,
    FileRefPart,
    Finish,
    MediaPart,
    Message,
    NoCookies,
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
from aihub.providers.http import aiohttp_transport, body_reader

IDLE_CONNECTION_SECONDS = 4.0
"""How long an idle connection to the upstream is kept: uvicorn, which most OpenAI-compatible
servers run on (vLLM, LiteLLM), closes them after 5 s, and a request sent on one it is closing
fails."""


def _http_client() -> httpx2.AsyncClient:
    """The SDK's aiohttp-backed client (`aiohttp_transport`), keeping no cookies at either
    layer (the SDK's default client keeps them: aiohttp's jar stores them, httpx2's too)."""
    limits = httpx2.Limits(
        max_connections=1000,
        max_keepalive_connections=100,
        keepalive_expiry=IDLE_CONNECTION_SECONDS,
    )
    ssl_context = httpx2.create_ssl_context()  # now, at start-up: it reads the CA bundle
    return openai.DefaultAioHttpClient(
        limits=limits,
        verify=ssl_context,
        cookies=NoCookies(),
        transport=aiohttp_transport(limits, ssl_context),
    )


_NO_TELEMETRY: dict[str, str | openai.Omit] = {
    name: openai.Omit()
    for name in (
        "X-Stainless-Lang",
        "X-Stainless-Package-Version",
        "X-Stainless-OS",
        "X-Stainless-Arch",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Async",
        "X-Stainless-Retry-Count",
        "X-Stainless-Read-Timeout",
    )
}
"""The SDK's telemetry headers, left out of every request: they tell the upstream (any
OpenAI-compatible server `OPENAI_BASE_URL` names) this machine's OS, architecture and runtime
versions, and they are most of the headers the SDK builds, copies and checks several times over
for each request (~0.1 ms of CPU a stream). The `User-Agent` stays."""

_REQUEST_KEYS = itertools.count()
_PROCESS_KEY = secrets.token_hex(8)


def _request_key() -> str:
    """A request's idempotency key, unique to this process and request, given so that the SDK
    does not make its own: its `uuid4()` reads the system's randomness with the GIL released,
    and the thread writing the stream's quota reservation, waiting for the GIL, then ran its job
    (0.2-0.35 ms) before the request went out. (At one stream the difference is within
    `bench/compare.py`'s noise; see bench/README.md.) The OpenAI client sends no idempotency
    header, so this only has to be unique should a version of the SDK send it."""
    return f"aihub-{_PROCESS_KEY}-{next(_REQUEST_KEYS)}"


_FINISH_REASONS = {"stop": "stop", "length": "length", "content_filter": "content_filter"}
_KEY_LIKE = re.compile(r"\b(sk|pk|rk)-[A-Za-z0-9_\-*]{6,}")


DRAIN_SECONDS = 0.5
"""How long a stream's reader waits, after `[DONE]`, for the end of its body."""


async def _drain(read: Callable[[], Awaitable[bytes]]) -> None:
    """Read the body to its end after `[DONE]` (the chunked body's last chunk, usually a few
    bytes behind it, often in a packet of its own), so that its connection goes back to the
    pool: a body left unread closes the connection, and the next request pays for a new one (on
    the internet, a TLS handshake). The answer is whole by now: a server that sends more, or
    does not end the body, only loses its connection."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while await read():
                pass
    except (TimeoutError, OSError, aiohttp.ClientError, httpx2.HTTPError):
        pass


OPENAI_API_URL = "https://api.openai.com/v1"
"""OpenAI's own API, named rather than left to the SDK: given no base URL, the SDK takes the
process's `OPENAI_BASE_URL`, which callers' own keys must not follow (`BYOK_BASE_URL`)."""


class OpenAIProvider(TextProvider):
    name = "openai"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
    ) -> None:
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            # A `Timeout`, not a number: httpx2 checks a number against the `SupportsFloat`
            # protocol for every request, and that check cost more than the rest of its
            # request's set-up.
            timeout=httpx2.Timeout(timeout),
            max_retries=max_retries,
            http_client=_http_client(),
        )
        self._api_key = api_key
        self._completions_url = f"{self._client.base_url}chat/completions"
        """Absolute (the client's base URL ends with a slash): the SDK parses a path, and then
        its base URL again to join them, for every request (17% of its request's build)."""
        self._headers: Mapping[str, str | openai.Omit] = _NO_TELEMETRY
        """Every request's headers over the client's own: no telemetry, and a caller's own key."""
        self._owns_client = True
        self._callers_key = False
        """Whether the key is a caller's own (`with_api_key`): OpenAI's words about it are
        theirs to read."""

    def with_api_key(self, api_key: str) -> OpenAIProvider:
        """The same provider with a caller's own key, sharing this one's client and pool.

        The key travels as the request's own `Authorization` header: a copy of the SDK client
        per request (`with_options`) cost a client's construction and a thread hop (the SDK
        looks up the platform once per client) on every bring-your-own-key request. Closing the
        copy does not close the pool; closing the original does.
        """
        copy = object.__new__(OpenAIProvider)
        copy._client = self._client
        copy._api_key = api_key
        copy._completions_url = self._completions_url
        copy._headers = {**_NO_TELEMETRY, "Authorization": f"Bearer {api_key}"}
        copy._owns_client = False
        copy._callers_key = True
        return copy

    def accepts(self, mime_type: str) -> bool:
        return mime_type.startswith("image/") or mime_type == "application/pdf"

    @property
    def base_url(self) -> str:
        return str(self._client.base_url)

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self.base_url!r})"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.close()

    async def stream_text(self, request: TextRequest, *, model: str) -> AsyncIterator[TextEvent]:
        params = _create_params(request, model=model)
        try:
            # The SDK's generic `post` (its documented way to send a body as is), not
            # `chat.completions.create`: `create` runs its typed arguments through a recursive
            # TypedDict transform (hashing the `Literal` of every model name on the way) that
            # cost ~0.5 ms of every request, and the dicts built here are already in the wire
            # format. The SDK still builds and authenticates the request, retries before the
            # first byte and raises its typed errors; the body is read raw (see the module).
            stream = await self._client.post(
                self._completions_url,
                cast_to=object,
                # Serialized here (the SDK sends `content` as is): its own JSON encoder is the
                # standard library's, in a class of its own, for every request.
                content=orjson.dumps(params),
                options={"headers": self._headers, "idempotency_key": _request_key()},
                stream=True,
                stream_cls=openai.AsyncStream[object],
            )
            async with stream:
                yield Accepted()  # the status was a success: the output may still be far off
                reader = _ChunkReader()
                read = body_reader(stream.response)
                # Server-sent events, read inline (every async iterator between the network
                # and here costs every chunk of every stream): the `data:` payloads of each
                # network read that completed at least one line, as one batch.
                buffer = b""
                while (chunk := await read()) or buffer:
                    # At the end, a last line without its newline is a line all the same.
                    *lines, buffer = (buffer + (chunk or b"\n")).split(b"\n")
                    payloads = [line[5:].strip() for line in lines if line.startswith(b"data:")]
                    if not payloads:
                        continue
                    events, error = reader.feed_batch(payloads, provider=self)
                    for event in events:
                        yield event
                    if error is not None:
                        raise error  # after the text that came before it
                    if reader.done:
                        break
                yield reader.finish(provider=self)
                if reader.done:
                    await _drain(read)
        except openai.APIStatusError as exc:
            raise self._status_error(exc) from exc
        except (openai.APIConnectionError, httpx2.RequestError, aiohttp.ClientError) as exc:
            raise ProviderUnavailable(
                f"OpenAI connection failed: {type(exc).__name__}", provider=self.name
            ) from exc
        except openai.APIError as exc:
            raise self._failure("OpenAI failed", exc.message) from exc

    def _status_error(self, exc: openai.APIStatusError) -> ProviderError:
        return error_for_status(
            exc.status_code,
            provider=self.name,
            label="OpenAI",
            detail=self._redact(_upstream_message(exc)),
            retry_after=_retry_after(exc.response.headers),
            callers_key=self._callers_key,
        )

    def _failure(
        self, message: str, detail: str, kind: type[ProviderError] = ProviderError
    ) -> ProviderError:
        """`message`, with OpenAI's own words added when the key is the caller's."""
        detail = self._redact(detail)
        if self._callers_key:
            message = f"{message}: {detail}"
        return kind(message, provider=self.name, detail=detail)

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "[redacted]")
        return _KEY_LIKE.sub("[redacted]", text)[:500]


class _ChunkReader:
    """Turns decoded `chat.completion.chunk` payloads into events."""

    def __init__(self) -> None:
        self.finish_reason: str | None = None
        self.done = False
        self._events: list[TextEvent] = []
        self._text: list[str] = []
        """Text not yet in `_events`: consecutive text becomes one delta."""

    def feed_batch(
        self, payloads: list[bytes], *, provider: OpenAIProvider
    ) -> tuple[list[TextEvent], ProviderError | None]:
        """The events of the payloads that arrived together, consecutive text joined into one
        delta (under load one network read holds many tokens, and every event costs a trip
        through the stream and a write to the client), and the error that ended them, if any."""
        error: ProviderError | None = None
        for payload in payloads:
            if payload == b"[DONE]":
                self.done = True
                break
            try:
                self._feed(payload, provider=provider)
            except ProviderError as exc:
                error = exc
                break
        self._end_text()
        events, self._events = self._events, []
        return events, error

    def _end_text(self) -> None:
        if self._text:
            self._events.append(TextDelta("".join(self._text)))
            self._text = []

    def _feed(self, payload: bytes, *, provider: OpenAIProvider) -> None:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ProviderUnavailable(
                "OpenAI sent a malformed stream event", provider=provider.name
            ) from exc
        if not isinstance(chunk, dict):
            return
        if error := chunk.get("error"):
            raise _stream_error(error, provider=provider)
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            if (delta := choice.get("delta")) and (content := delta.get("content")):
                self._text.append(content)
            if reason := choice.get("finish_reason"):
                self.finish_reason = reason
        if usage := chunk.get("usage"):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self._end_text()
            self._events.append(Usage(input_tokens=prompt or 0, output_tokens=completion or 0))

    def finish(self, *, provider: OpenAIProvider) -> Finish:
        if self.finish_reason is None:
            # A stream that stops without a finish reason was cut: it must not look complete.
            raise ProviderUnavailable("OpenAI's stream ended early", provider=provider.name)
        return Finish(_FINISH_REASONS.get(self.finish_reason, self.finish_reason))


def _stream_error(error: Any, *, provider: OpenAIProvider) -> ProviderError:
    message = error.get("message") if isinstance(error, dict) else None
    detail = message if isinstance(message, str) else "no detail"
    return provider._failure("OpenAI failed mid-stream", detail, ProviderUnavailable)


def _create_params(request: TextRequest, *, model: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.extend(_message(message) for message in request.messages)
    params: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # Only what is set: gpt-5 and o-series models reject `temperature`.
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.max_output_tokens is not None:
        params["max_completion_tokens"] = request.max_output_tokens
    if request.json_schema is not None:
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": request.json_schema, "strict": False},
        }
    return params


def _message(message: Message) -> dict[str, Any]:
    parts = message.parts
    if message.role == "assistant":
        texts = [
            {"type": "text", "text": part.text} for part in parts if isinstance(part, TextPart)
        ]
        return {"role": "assistant", "content": texts[0]["text"] if len(texts) == 1 else texts}
    if len(parts) == 1 and isinstance(parts[0], TextPart):
        return {"role": "user", "content": parts[0].text}
    return {"role": "user", "content": [_content_part(part) for part in parts]}


def _content_part(part: TextPart | MediaPart | FileRefPart) -> dict[str, Any]:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, FileRefPart):
        raise ProviderBadRequest(
            "OpenAI cannot read files held by another provider", provider=OpenAIProvider.name
        )
    data_url = f"data:{part.mime_type};base64,{base64.b64encode(part.data).decode('ascii')}"
    if part.mime_type.startswith("image/"):
        return {"type": "image_url", "image_url": {"url": data_url}}
    if part.mime_type == "application/pdf":
        return {"type": "file", "file": {"file_data": data_url, "filename": "document.pdf"}}
    raise ProviderBadRequest(
        f"OpenAI chat does not accept {part.mime_type} input", provider=OpenAIProvider.name
    )


def _upstream_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])
    return exc.response.reason_phrase or "no detail"


def _retry_after(headers: Mapping[str, str]) -> int | None:
    """Seconds to wait, from `retry-after-ms` (OpenAI's own) or `Retry-After` (seconds or date)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(1, round(float(milliseconds) / 1000))
        except ValueError:
            pass
    return parse_retry_after(headers.get("retry-after"))
