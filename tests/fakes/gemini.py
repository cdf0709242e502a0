"""A loopback fake of the Gemini API (generativelanguage), in its documented wire format.

It answers `POST /{version}/models/{model}:streamGenerateContent?alt=sse` (server-sent `data:`
events of `GenerateContentResponse` JSON) and `:generateContent`, so the google-genai SDK works
against it unmodified with `HttpOptions(base_url=fake.base_url)`. Grounding sources come back in
`candidates[].groundingMetadata.groundingChunks[].web` when the request asks for the
`googleSearch` tool.

Standalone, for benchmarks::

    uv run python -m tests.fakes.gemini --port 9101 --tokens 100 --delay-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.openai import (
    DEFAULT_TEXT,
    FailMode,
    ReceivedRequest,
    ScriptedError,
    StreamStats,
    TrackedStream,
    paced,
    record,
    tokenize,
    tokens_of_length,
)
from tests.fakes.server import serve, serve_forever

_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    422: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class FakeGemini:
    """Scriptable fake of `models/*:streamGenerateContent`. Call `reset()` to restore defaults."""

    def __init__(self) -> None:
        self.base_url = ""
        """`http://127.0.0.1:PORT` once served: what `HttpOptions(base_url=...)` expects."""
        self.app = Starlette(
            routes=[Route("/{version}/models/{call:path}", self._models, methods=["POST"])]
        )
        self.reset()

    # --- scripting ------------------------------------------------------------------------------

    def reset(self) -> None:
        self.tokens: list[str] = tokenize(DEFAULT_TEXT)
        self.token_delay = 0.0
        """Seconds between two streamed tokens (one token per event)."""
        self.prompt_tokens = 17
        self.completion_tokens: int | None = None
        """None: the number of tokens streamed."""
        self.thoughts_tokens: int | None = None
        self.finish_reason = "STOP"
        self.citations: list[tuple[str, str | None]] = []
        """(uri, title) grounding sources, sent when the request enables `googleSearch`."""
        self.block_reason: str | None = None
        """When set, the prompt is blocked: one event with `promptFeedback`, no candidates."""
        self.require_api_key: str | None = None
        self.error: ScriptedError | None = None
        self.fail_after: int | None = None
        self.fail_mode: FailMode = "error"
        self.requests: list[ReceivedRequest] = []
        self.stats = StreamStats()

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
        """Answer the next `times` requests (all when None) with this HTTP error.

        With `retry_after`, a 429 also carries Google's `RetryInfo` detail, as the real API does.
        """
        if body is None:
            body = _error_body(status, retry_after=retry_after)
        after = None if retry_after is None else str(retry_after)
        self.error = ScriptedError(status, body, after, times)

    def fail_mid_stream(self, after_tokens: int, *, mode: FailMode = "error") -> None:
        """Stream `after_tokens` tokens, then send an error event or drop the connection."""
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

    async def _models(self, request: Request) -> Response:
        received = await record(request)
        self.requests.append(received)
        if self.require_api_key is not None and (
            received.headers.get("x-goog-api-key") != self.require_api_key
        ):
            return JSONResponse(_invalid_key_body(), 400)
        if self.error is not None and self.error.take():
            return self.error.response()
        model, _, method = request.path_params["call"].partition(":")
        body = received.json or {}
        grounded = any("googleSearch" in tool for tool in body.get("tools") or ())
        if method == "generateContent":
            return JSONResponse(self._whole_answer(model, grounded=grounded))
        if method != "streamGenerateContent":
            return JSONResponse(_error_body(404), 404)
        drop = self.fail_after is not None and self.fail_mode == "drop"
        return TrackedStream(self._events(model, grounded=grounded), stats=self.stats, drop=drop)

    def _usage(self, streamed: int) -> dict[str, int]:
        output = streamed if self.completion_tokens is None else self.completion_tokens
        usage = {
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": output,
            "totalTokenCount": self.prompt_tokens + output + (self.thoughts_tokens or 0),
        }
        if self.thoughts_tokens is not None:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        return usage

    def _grounding(self) -> dict[str, Any]:
        chunks = [{"web": {"uri": uri, "title": title}} for uri, title in self.citations]
        if chunks:
            chunks.append(chunks[0])  # real answers cite the same source more than once
        return {"groundingChunks": chunks, "webSearchQueries": ["fake search"]}

    def _whole_answer(self, model: str, *, grounded: bool) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": self.text}], "role": "model"},
            "finishReason": self.finish_reason,
            "index": 0,
        }
        if grounded and self.citations:
            candidate["groundingMetadata"] = self._grounding()
        return {
            "candidates": [candidate],
            "usageMetadata": self._usage(len(self.tokens)),
            "modelVersion": model,
            "responseId": uuid.uuid4().hex[:22],
        }

    async def _events(self, model: str, *, grounded: bool) -> AsyncIterator[bytes]:
        response_id = uuid.uuid4().hex[:22]
        if self.block_reason is not None:
            feedback = {"promptFeedback": {"blockReason": self.block_reason}}
            yield _sse({**feedback, "usageMetadata": self._usage(0), "responseId": response_id})
            return
        tokens = self.tokens[: self.fail_after] if self.fail_after is not None else self.tokens
        last = len(tokens) - 1
        async for index, token in paced(tokens, self.token_delay):
            candidate: dict[str, Any] = {
                "content": {"parts": [{"text": token}], "role": "model"},
                "index": 0,
            }
            if grounded and self.citations and index == last // 2:
                uri, title = self.citations[0]
                candidate["groundingMetadata"] = {"groundingChunks": [{"web": _web(uri, title)}]}
            if index == last and self.fail_after is None:
                candidate["finishReason"] = self.finish_reason
                if grounded and self.citations:
                    candidate["groundingMetadata"] = self._grounding()
            yield _sse(
                {
                    "candidates": [candidate],
                    "usageMetadata": self._usage(index + 1),
                    "modelVersion": model,
                    "responseId": response_id,
                }
            )
        if self.fail_after is not None and self.fail_mode == "error":
            yield _sse(_error_body(500))


def _web(uri: str, title: str | None) -> dict[str, Any]:
    return {"uri": uri, "title": title} if title is not None else {"uri": uri}


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\r\n\r\n"


def _error_body(status: int, *, retry_after: int | str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": status,
        "message": f"The fake answered {status}.",
        "status": _STATUS_NAMES.get(status, "UNKNOWN"),
    }
    if status == 429 and retry_after is not None:
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{retry_after}s"}
        ]
    return {"error": error}


def _invalid_key_body() -> dict[str, Any]:
    """What Gemini answers for a wrong key: a 400, not a 401."""
    return {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        }
    }


# --- pytest fixtures ----------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def fake_gemini_server() -> AsyncIterator[FakeGemini]:
    """One fake served for the whole test session."""
    fake = FakeGemini()
    async with serve(fake.app) as url:
        fake.base_url = url
        yield fake


@pytest_asyncio.fixture(loop_scope="session")
async def fake_gemini(fake_gemini_server: FakeGemini) -> FakeGemini:
    """The session's fake, reset to its defaults for this test."""
    fake_gemini_server.reset()
    return fake_gemini_server


# --- standalone ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description="Serve the fake Gemini API on a loopback port.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9101)
    parser.add_argument("--tokens", type=int, default=100, help="tokens per streamed answer")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="pause between tokens")
    args = parser.parse_args()
    fake = FakeGemini()
    fake.tokens = tokens_of_length(args.tokens)
    fake.token_delay = args.delay_ms / 1000
    serve_forever(fake.app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
