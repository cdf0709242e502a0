"""A loopback fake of OpenAI's Chat Completions API, in its documented wire format.

It answers `POST /v1/chat/completions` streamed (server-sent `data:` lines ending in
`data: [DONE]`, with the usage chunk when `stream_options.include_usage` is set) and not streamed,
so the official SDK works against it unmodified. Tests script the next answers (text, pacing,
usage, HTTP errors, failures in the middle of a stream) and read what the fake received, including
whether the client went away before a stream ended.

The streaming machinery here (`TrackedStream`, `tokenize`, `DEFAULT_TEXT`, `ReceivedRequest`) is
shared by the other provider fakes.

Standalone, for benchmarks::

    uv run python -m tests.fakes.openai --port 9100 --tokens 100 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.fakes.server import serve, serve_forever

DEFAULT_TEXT = (
    "# AgentDesk: an AI front desk for small clinics\n\n"
    "## The problem\n\n"
    "Small clinics miss **one call in three** while staff are with patients.\n\n"
    "## The idea\n\n"
    "- An agent answers every call, day and night\n"
    "- It books, moves and cancels appointments in the clinic's calendar\n"
    "- Hard cases go to a human, with a short summary\n\n"
    "## Why now\n\n"
    "Voice models are finally fast and cheap enough.\n"
)
"""Markdown with headings, blank lines and bullets, as the ideas product asks for."""

_TOKEN = re.compile(r"\n\n+|\n?[ \t]*\S+|\s")

FailMode = Literal["error", "drop"]


def tokenize(text: str) -> list[str]:
    """Split like a real tokenizer does: some tokens start with "\\n", some are only "\\n\\n"."""
    return _TOKEN.findall(text)


def tokens_of_length(count: int) -> list[str]:
    """`count` tokens cycled from `DEFAULT_TEXT` (for benchmarks)."""
    return list(itertools.islice(itertools.cycle(tokenize(DEFAULT_TEXT)), count))


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Lower-case names."""
    json: Any
    client_port: int | None = None
    """The client's port: which connection the request came on."""


async def record(request: Request) -> ReceivedRequest:
    body = await request.body()
    return ReceivedRequest(
        method=request.method,
        path=request.url.path,
        query=dict(request.query_params),
        headers={name.lower(): value for name, value in request.headers.items()},
        json=orjson.loads(body) if body else None,
        client_port=request.client.port if request.client else None,
    )


@dataclass(slots=True)
class ScriptedError:
    status: int
    body: Any
    retry_after: str | None
    remaining: int | None
    """How many more requests fail this way; None for all of them."""

    def take(self) -> bool:
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    def response(self) -> Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after is not None else None
        return JSONResponse(self.body, self.status, headers=headers)


@dataclass(slots=True)
class StreamStats:
    """What happened to the streamed responses since the last `reset()`."""

    started: int = 0
    completed: int = 0
    disconnects: int = 0
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a client closed a stream before its end."""


class TrackedStream(Response):
    """A streamed response that notices a client going away, even between two slow chunks.

    uvicorn (ASGI spec 2.3) silently drops writes to a closed connection, so the fake listens for
    `http.disconnect` itself and stops producing as soon as it arrives. With `drop=True` the
    response is left unfinished, and uvicorn closes the connection without the final chunk.
    """

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        stats: StreamStats,
        media_type: str = "text/event-stream",
        drop: bool = False,
    ) -> None:
        super().__init__(status_code=200, media_type=media_type)
        self.raw_headers = [h for h in self.raw_headers if h[0] != b"content-length"]
        self.raw_headers.append((b"cache-control", b"no-cache"))
        self._chunks = chunks
        self._stats = stats
        self._drop = drop
        self._finished = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._stats.started += 1
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        producer = asyncio.ensure_future(self._produce(send))
        listener = asyncio.ensure_future(_wait_for_disconnect(receive))
        done, _ = await asyncio.wait({producer, listener}, return_when=asyncio.FIRST_COMPLETED)
        if producer in done:
            listener.cancel()
            producer.result()
            return
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
        if not self._finished:
            self._stats.disconnects += 1
            self._stats.disconnected.set()

    async def _produce(self, send: Send) -> None:
        async for chunk in self._chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self._drop:
            return
        self._finished = True
        self._stats.completed += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def paced(tokens: list[str], delay: float) -> AsyncIterator[tuple[int, str]]:
    for index, token in enumerate(tokens):
        if delay and index:
            await asyncio.sleep(delay)
        yield index, token


class FakeOpenAI:
    """Scriptable fake of `POST /v1/chat/completions`. Call `reset()` to restore the defaults."""

    def __init__(self) -> None:
        self.base_url = ""
        """`http://127.0.0.1:PORT/v1` once served: what `AsyncOpenAI(base_url=...)` expects."""
        self.app = Starlette(routes=[Route("/v1/chat/completions", self._chat, methods=["POST"])])
        self.reset()

    # --- scripting ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.tokens: list[str] = tokenize(DEFAULT_TEXT)
        self.token_delay = 0.0
        """Seconds between two streamed tokens."""
        self.first_token_delay = 0.0
        """Seconds of "thinking" between the role chunk and the first token."""
        self.end_delay = 0.0
        """Seconds between `data: [DONE]` and the end of the body, which then comes in a packet
        of its own (as it may from a real server)."""
        self.prompt_tokens = 17
        self.completion_tokens: int | None = None
        """None: the number of tokens streamed."""
        self.finish_reason = "stop"
        self.require_api_key: str | None = None
        """When set, any other bearer token gets OpenAI's 401 (which echoes part of the key)."""
        self.error: ScriptedError | None = None
        self.fail_after: int | None = None
        self.fail_mode: FailMode = "error"
        self.requests: list[ReceivedRequest] = []
        self.stats = StreamStats()
        self.answers: list[str] = []
        """Texts for the next requests, one each, in order; then `text` again."""
        self.set_cookie: str | None = None
        """A `Set-Cookie` for every streamed answer (as Cloudflare in front of OpenAI sends)."""
        self.gzip = False
        """Compress streamed answers (`Content-Encoding: gzip`, flushed at every event), as a
        proxy in front of an OpenAI-compatible server may."""
        self.unterminated = False
        """End streamed answers with their last line unterminated and no `[DONE]`, as some
        OpenAI-compatible servers do."""

    @property
    def text(self) -> str:
        return "".join(self.tokens)

    @text.setter
    def text(self, value: str) -> None:
        self.tokens = tokenize(value)

    def fail_with(
        self,
        status: int,
        body: Any = None,
        *,
        retry_after: int | str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer the next `times` requests (all when None) with this HTTP error."""
        if body is None:
            body = _error_body(status)
        after = None if retry_after is None else str(retry_after)
        self.error = ScriptedError(status, body, after, times)

    def fail_mid_stream(self, after_tokens: int, *, mode: FailMode = "error") -> None:
        """Stream `after_tokens` tokens, then send an error payload or drop the connection."""
        self.fail_after = after_tokens
        self.fail_mode = mode

    # --- records --------------------------------------------------------------------------------

    @property
    def last_request(self) -> ReceivedRequest:
        return self.requests[-1]

    @property
    def disconnects(self) -> int:
        return self.stats.disconnects

    @property
    def disconnected(self) -> asyncio.Event:
        return self.stats.disconnected

    # --- HTTP -----------------------------------------------------------------------------------

    async def _chat(self, request: Request) -> Response:
        received = await record(request)
        self.requests.append(received)
        if self.require_api_key is not None:
            key = received.headers.get("authorization", "").removeprefix("Bearer ")
            if key != self.require_api_key:
                return JSONResponse(_invalid_key_body(key), 401)
        if self.error is not None and self.error.take():
            return self.error.response()
        body = received.json or {}
        model = str(body.get("model", "gpt-fake"))
        tokens = tokenize(self.answers.pop(0)) if self.answers else self.tokens
        if not body.get("stream"):
            return JSONResponse(self._completion(model, tokens))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = self._chunks(model, tokens, include_usage=include_usage)
        if self.unterminated:
            chunks = _unterminated(chunks)
        if self.gzip:
            chunks = _gzipped(chunks)
        drop = self.fail_after is not None and self.fail_mode == "drop"
        stream = TrackedStream(chunks, stats=self.stats, drop=drop)
        if self.set_cookie is not None:
            stream.raw_headers.append((b"set-cookie", self.set_cookie.encode()))
        if self.gzip:
            stream.raw_headers.append((b"content-encoding", b"gzip"))
        return stream

    def _usage(self, streamed: int) -> dict[str, int]:
        completion = streamed if self.completion_tokens is None else self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _completion(self, model: str, tokens: list[str]) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(tokens), "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "usage": self._usage(len(tokens)),
        }

    async def _chunks(
        self, model: str, tokens: list[str], *, include_usage: bool
    ) -> AsyncIterator[bytes]:
        chunk = _ChunkTemplate(model, include_usage=include_usage)
        yield chunk.delta({"role": "assistant", "content": "", "refusal": None})
        if self.first_token_delay:
            await asyncio.sleep(self.first_token_delay)
        if self.fail_after is not None:
            tokens = tokens[: self.fail_after]
        async for _, token in paced(tokens, self.token_delay):
            yield chunk.delta({"content": token})
        if self.fail_after is not None:
            if self.fail_mode == "error":
                yield _sse({"error": _error_body(500)["error"]})
            return
        yield chunk.delta({}, finish_reason=self.finish_reason)
        if include_usage:
            yield chunk.usage(self._usage(len(tokens)))
        yield b"data: [DONE]\n\n"
        if self.end_delay:
            await asyncio.sleep(self.end_delay)


class _ChunkTemplate:
    def __init__(self, model: str, *, include_usage: bool) -> None:
        self._base: dict[str, Any] = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        self._include_usage = include_usage

    def delta(self, delta: dict[str, Any], *, finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        payload = {**self._base, "choices": [choice]}
        if self._include_usage:
            payload["usage"] = None
        return _sse(payload)

    def usage(self, usage: dict[str, int]) -> bytes:
        return _sse({**self._base, "choices": [], "usage": usage})


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


async def _unterminated(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream without its `[DONE]`, its last line without its line break."""
    last = None
    async for chunk in chunks:
        if chunk == b"data: [DONE]\n\n":
            break
        if last is not None:
            yield last
        last = chunk
    if last is not None:
        yield last.rstrip(b"\n")


async def _gzipped(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """One gzip stream, flushed after every chunk so that each arrives as it is produced."""
    compressor = zlib.compressobj(wbits=31)
    async for chunk in chunks:
        yield compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
    yield compressor.flush()


_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", None),
    429: ("requests", "rate_limit_exceeded"),
}


def _error_body(status: int) -> dict[str, Any]:
    kind, code = _ERROR_TYPES.get(status, ("server_error", None))
    message = f"The fake answered {status}."
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _invalid_key_body(key: str) -> dict[str, Any]:
    masked = key[:3] + "*" * max(len(key) - 7, 0) + key[-4:]
    message = (
        f"Incorrect API key provided: {masked}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
    )
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


# --- pytest fixtures ----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fake_openai_server() -> AsyncIterator[FakeOpenAI]:
    """One fake served for the whole test session."""
    fake = FakeOpenAI()
    async with serve(fake.app) as url:
        fake.base_url = f"{url}/v1"
        yield fake


@pytest_asyncio.fixture(loop_scope="session")
async def fake_openai(fake_openai_server: FakeOpenAI) -> FakeOpenAI:
    """The session's fake, reset to its defaults for this test."""
    fake_openai_server.reset()
    return fake_openai_server


# --- standalone ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI API on a loopback port.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per streamed answer")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="pause between tokens")
    args = parser.parse_args()
    fake = FakeOpenAI()
    fake.tokens = tokens_of_length(args.tokens)
    fake.token_delay = args.delay_ms / 1000
    serve_forever(fake.app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
