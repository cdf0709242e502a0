"""The HTTP stack of the SDKs that take an httpx2 client (openai, google-genai): httpx2's API
over aiohttp's connection pool and C HTTP parser, keeping no cookies at either layer.

The transport is the one the openai SDK ships for its `DefaultAioHttpClient`. httpx2's own
(httpcore2 over the pure-Python h11 parser) cost the chats benchmark ~15% more CPU per streamed
Gemini reply, and ~1 ms more time to first token (`bench/stream_overhead.py --product chats`).
Through httpx2's API the adapters keep what they rely on: response hooks, and a timeout that
bounds each read rather than the whole stream.

A response carries its aiohttp body under `extensions["aiohttp_body"]` (an `aiohttp.StreamReader`,
the way httpcore gives its `network_stream`): a stream read as it arrives (OpenAI's server-sent
events) can take each network read straight from aiohttp's buffer, without the four async
iterators that httpx2 and the transport put around every chunk (`body_reader`).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import aiohttp
import httpx2
from openai._vendor.httpx_aiohttp import transport as httpx_aiohttp

BODY = "aiohttp_body"
"""The response extension that holds the body's `aiohttp.StreamReader`."""


class AiohttpTransport(httpx_aiohttp.AiohttpTransport):
    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        response = await super().handle_async_request(request)
        if isinstance(response.stream, httpx_aiohttp.AiohttpResponseStream):
            response.extensions[BODY] = response.stream._aiohttp_response.content
        return response


def body_reader(response: httpx2.Response) -> Callable[[], Awaitable[bytes]]:
    """A function giving the body's next bytes as they arrive, `b""` at its end: each network
    read as aiohttp buffered it, when the body is not encoded (else through httpx2's decoder)."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    body: aiohttp.StreamReader | None = response.extensions.get(BODY)
    if body is not None and encoding == "identity":
        return body.readany
    chunks = response.aiter_bytes()

    async def read() -> bytes:
        return await anext(chunks, b"")

    return read


def aiohttp_transport(limits: httpx2.Limits, ssl_context: ssl.SSLContext) -> AiohttpTransport:
    """An httpx2 transport on an aiohttp session of its own, built on first use (inside the
    event loop) with `limits`, and without a cookie jar: one client serves every caller (and,
    with bring-your-own-key, every caller's key), so a cookie one answer sets (a load balancer's,
    a proxy's session) must not ride along on anybody else's request."""

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0,
            keepalive_timeout=limits.keepalive_expiry,
            ssl=ssl_context,
        )
        return aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    return AiohttpTransport(verify=ssl_context, limits=limits, client=session)
